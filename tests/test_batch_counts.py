"""The commit's counts of the quarantine and deferred folders (no Ray)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray.batch.assign import assign_stage
from r2ray.batch.backlog import QUARANTINE_SCHEMA, footer_rows, plan_units, read_stage, unit_items
from r2ray.batch.dedupe import drop_rows_stage, repeated_ids
from r2ray.batch.job import (_count_rows, check_assigned_parts, check_rows_accounted,
                             quarantine_counts, rows_check_words)
from r2ray.bench.io import write_table
from r2ray.catalog import catalog_from_dict
from r2ray.solver import DEFER_ARM


def test_counts_of_absent_empty_and_filled_folders(tmp_path):
    absent, empty = tmp_path / "absent", tmp_path / "empty"
    empty.mkdir()   # a write a killed task never finished: only its temporary file is left
    (empty / "part-0.parquet.tmp-123-abcd").write_bytes(b"PAR1 half")
    for folder in (absent, empty):   # before the fix: the empty one raised FileNotFoundError
        assert _count_rows(str(folder)) == 0
        assert quarantine_counts(str(folder)) == {"records": 0, "rows": 0, "duplicates": 0,
                                                  "files": 0, "unread_rows": 0}
    records = [{"source": "a.jsonl", "row": 2, "query_id": "q", "reason": "duplicate of row 1",
                "raw": "{}"},
               {"source": "b.parquet", "row": None, "query_id": None, "reason": "unreadable",
                "raw": None}]
    write_table(pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA),
                str(empty / "part-1.parquet"))
    assert _count_rows(str(empty)) == 2
    assert quarantine_counts(str(empty)) == {"records": 2, "rows": 1, "duplicates": 1, "files": 1,
                                             "unread_rows": 0}   # b.parquet's footer: unread


def test_quarantine_counts_do_not_read_the_raw_rows(tmp_path):
    """A night's bad rows are mostly their ``raw`` text (here 20,000 rows of 5 kB: 100 MB); the
    driver counts them without the raw text. Before: Arrow's peak was the raw column,
    100 MB+ (in a fresh process, so no earlier allocation sets the peak)."""
    n, width = 20_000, 5_000
    write_table(pa.table({"source": ["a.jsonl"] * n, "row": pa.array(range(1, n + 1), pa.int64()),
                          "query_id": pa.nulls(n, pa.string()), "reason": ["query is blank"] * n,
                          "raw": [str(i).rjust(width, "x") for i in range(n)],
                          "unread_rows": pa.nulls(n, pa.int64())},
                         schema=QUARANTINE_SCHEMA), str(tmp_path / "part-0.parquet"))
    probe = ("import sys, pyarrow as pa; from r2ray.batch.job import quarantine_counts; "
             "print(quarantine_counts(sys.argv[1])['rows'], pa.default_memory_pool().max_memory())")
    rows, peak = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], check=True,
                                capture_output=True, text=True).stdout.split()
    assert int(rows) == n
    assert int(peak) < n * width / 10, f"Arrow peaked at {int(peak) / 1e6:.0f} MB"


def _assigned_block(orders: list[int]) -> pa.Table:
    """A solved block of one-arm queries (arm 0 of the catalogue below), rows named by order."""
    n = len(orders)
    return pa.table({"query_id": [f"q{j}" for j in orders],
                     "query": [f"question {j}" for j in orders],
                     "input_tokens": pa.array(np.full(n, 10), pa.int64()),
                     "tenant_name": pa.nulls(n, pa.string()),
                     "order": pa.array(orders, pa.int64()), "arm": pa.array(np.zeros(n, np.int64)),
                     "lambda_star": np.full(n, 1.0), "base_q": np.full(n, 0.5),
                     "base_c": np.full(n, 1e-5),
                     "step_arm": pa.array([[]] * n, pa.large_list(pa.int32())),
                     "dq": pa.array([[]] * n, pa.large_list(pa.float64())),
                     "dc": pa.array([[]] * n, pa.large_list(pa.float64())),
                     "hull_tokens": pa.array([[20.0]] * n, pa.large_list(pa.float32()))})


def test_a_retry_over_other_blocks_is_caught_before_the_commit(tmp_path):
    catalog = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}]}, "test")
    routed, deferred = str(tmp_path / "routed"), str(tmp_path / "deferred")
    for orders in ([0, 1], [2, 3]):   # a first run of the stage over two blocks ...
        assign_stage(_assigned_block(orders), catalog.to_yaml(), routed, deferred, "v", "r")
    check_assigned_parts(routed, 4)
    # ... then again over the same rows in one block: part-0 is overwritten, part-2 is left
    stats = assign_stage(_assigned_block([0, 1, 2, 3]), catalog.to_yaml(), routed, deferred,
                         "v", "r")
    kept = int(np.sum(stats.column("queries").to_numpy()))
    assert kept == 4 and _count_rows(routed) == 6   # q2, q3 twice on storage
    with pytest.raises(RuntimeError, match="holds 6 routed rows but the assign stage routed 4"):
        check_assigned_parts(routed, kept)   # before the fix: committed, rows routed twice


def test_a_retry_that_leaves_deferred_parts_is_caught_before_the_commit(tmp_path):
    """The same retry over other blocks where a block's rows were deferred: its routed parts
    add up, but the earlier run's deferred part stays beside the new one (each row deferred
    twice, the manifest's deferred count and rows_in too high); and a retry whose arms differ
    leaves a row both routed and deferred."""
    catalog = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}]}, "test")

    def block(orders, deferred_orders):
        arms = [DEFER_ARM if j in deferred_orders else 0 for j in orders]
        return _assigned_block(orders).set_column(5, "arm", pa.array(arms, pa.int64()))

    routed, deferred = str(tmp_path / "routed"), str(tmp_path / "deferred")
    for orders in ([0, 1], [2, 3]):   # q2, q3 deferred: block [2, 3] writes no routed part
        assign_stage(block(orders, {2, 3}), catalog.to_yaml(), routed, deferred, "v", "r")
    stats = assign_stage(block([0, 1, 2, 3], {2, 3}), catalog.to_yaml(), routed, deferred,
                         "v", "r")
    kept = int(np.sum(stats.column("queries").to_numpy()))
    assert kept == 2 and _count_rows(routed) == 2 and _count_rows(deferred) == 4
    with pytest.raises(RuntimeError, match="holds 4 deferred rows but the assign stage deferred 2"):
        check_assigned_parts(routed, kept, deferred, 4 - kept)   # before the fix: committed

    other = tmp_path / "other"   # the same block, first q1 deferred, then (other arms) routed
    assign_stage(block([0, 1], {1}), catalog.to_yaml(), str(other / "routed"),
                 str(other / "deferred"), "v", "r")
    stats = assign_stage(block([0, 1], set()), catalog.to_yaml(), str(other / "routed"),
                         str(other / "deferred"), "v", "r")
    kept = int(np.sum(stats.column("queries").to_numpy()))
    with pytest.raises(RuntimeError, match="holds 1 deferred rows but the assign stage deferred 0"):
        check_assigned_parts(str(other / "routed"), kept, str(other / "deferred"), 2 - kept)


def test_a_routed_row_carries_its_arms_request_and_the_worst_case_of_the_prompt_sent(tmp_path):
    """The assign stage's row is ``routing.routed_request`` of its arm, ĉ in float64, and its
    worst case (in the stats) bounds the bill at the cap of the prompt sent, length instruction
    included: the block's input tokens (10) are the query's UTF-8 bytes, which bound its tokens.
    Before the fix the worst case priced the 10 query tokens alone, not the 51 bytes sent."""
    import pyarrow.parquet as pq

    from r2ray.routing import routed_request

    catalog = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}]}, "test")
    routed = tmp_path / "routed"
    stats = assign_stage(_assigned_block([0, 1]), catalog.to_yaml(), str(routed),
                         str(tmp_path / "deferred"), "v", "r").to_pylist()
    rows = pq.read_table(next(routed.rglob("*.parquet"))).to_pylist()
    assert len(rows) == 2 and len(stats) == 1
    bill = 0.0
    for row in rows:
        request = routed_request(f"question {row['query_id'][1:]}", 0, catalog, 10)
        assert {k: row[k] for k in request} == request
        assert row["c_hat_usd"] == 1e-5 and row["t_hat"] == 20.0   # the chain's ĉ and t̂
        sent = len(request["messages"][0]["content"].encode())
        bill += catalog.cost_usd("a", sent, request["max_tokens"])
    assert stats[0]["spend_usd"] == 2e-5
    assert stats[0]["worst_case_usd"] >= bill * (1 - 1e-12), (stats[0], bill)


def test_a_deferred_part_reads_back_as_a_backlog_with_its_tenant_and_tokens(tmp_path):
    """Deferred rows are tomorrow's input: read back through the batch reader, they validate
    whole, with each row's tenant and input tokens (before: only query_id, query and reason,
    so a re-queue per tenant needed a join back to the input)."""
    from r2ray.batch.backlog import plan_units, read_and_validate

    catalog = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}]}, "test")
    block = _assigned_block([0, 1, 2])
    block = block.set_column(3, "tenant_name", pa.array(["acme", None, "beta"]))
    block = block.set_column(2, "input_tokens", pa.array([7, 11, 13], pa.int64()))
    block = block.set_column(5, "arm", pa.array([DEFER_ARM, -1, 0], pa.int64()))
    deferred = tmp_path / "deferred"
    assign_stage(block, catalog.to_yaml(), str(tmp_path / "routed"), str(deferred), "v", "r")
    units, unreadable = plan_units(str(deferred))
    assert unreadable.num_rows == 0 and len(units) == 1
    good, bad = read_and_validate(units[0], max_context_tokens=4096, embedding_dim=4)
    assert bad.num_rows == 0
    assert good.select(["query_id", "query", "input_tokens", "tenant"]).to_pylist() == [
        {"query_id": "q0", "query": "question 0", "input_tokens": 7, "tenant": "acme"},
        {"query_id": "q1", "query": "question 1", "input_tokens": 11, "tenant": None}]
    # no embedding among them (README): a model without a text encoder quarantines each row
    good, bad = read_and_validate(units[0], max_context_tokens=4096, embedding_dim=4,
                                  embedding_required=True)
    assert good.num_rows == 0 and bad.column("reason").to_pylist() == [
        "no embedding; the model names no text encoder, so every query needs one"] * 2


def _night(folder) -> None:
    """A parquet backlog of every kind of row the accounting must see: 300 rows in row groups of
    100 (a blank query and a repeated id among them, the second row group damaged part-way so
    its footer counts rows never read), a second file repeating two of its ids, and a file whose
    footer cannot be read."""
    folder.mkdir()
    ids = [f"q{i}" for i in range(300)]
    ids[7] = "q3"                                              # a repeat within the file
    queries = [f"question number {i} " * 3 for i in range(300)]
    queries[11] = "   "                                        # a bad row
    pq.write_table(pa.table({"query_id": ids, "query": queries}), folder / "a.parquet",
                   row_group_size=100, compression="none", use_dictionary=False,
                   data_page_size=2000)
    chunk = pq.ParquetFile(folder / "a.parquet").metadata.row_group(1).column(1)
    data = bytearray((folder / "a.parquet").read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xff" * 64                   # row group 1 fails part-way
    (folder / "a.parquet").write_bytes(bytes(data))
    pq.write_table(pa.table({"query_id": ["q1", "q250", "b0"], "query": ["x", "y", "z"]}),
                   folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"not a parquet file at all")


def _read_and_dedupe(folder, drop_from_unit: int | None = None) -> tuple[int, dict, list]:
    """The job's read → dedupe stages in process over ``folder``: (rows left for the solve, the
    quarantine counts, the read units). ``drop_from_unit``: lose that unit's first good row, as
    a retried read task that did not emit a slice again would."""
    from r2ray.bench.io import write_table as write

    units, unreadable = plan_units(str(folder))
    quarantine = folder.parent / "quarantine"
    if unreadable.num_rows:
        write(unreadable, str(quarantine / "part-unreadable.parquet"))
    good = []
    for index, item in enumerate(unit_items(units)):
        batch = {k: np.array([v]) for k, v in item.items()}
        tables = [t for t in read_stage(batch, str(quarantine), 1000, 3, False, slice_rows=40)
                  if t.num_rows]
        if index == drop_from_unit:
            tables[0] = tables[0].slice(1)
        good += tables
    sources = {u.file_index: u.source for u in units}
    first_seen = repeated_ids([t.select(["query_id", "order"]) for t in good])
    solvable = sum(drop_rows_stage(t, first_seen, sources, str(quarantine)).num_rows
                   for t in good)
    return solvable, quarantine_counts(str(quarantine)), units


def test_every_planned_row_is_solved_quarantined_or_left_unread(tmp_path):
    """The identity the commit checks: the parquet footers' count = rows the solve sees (after
    dedupe) + rows quarantined one by one (duplicates included) + rows damaged units left
    unread; an unreadable footer's file is in neither side."""
    _night(tmp_path / "in")
    solvable, quarantine, units = _read_and_dedupe(tmp_path / "in")
    assert footer_rows(units) == 303 and rows_check_words(units) == "passed"
    assert (quarantine["rows"], quarantine["duplicates"], quarantine["files"]) == (4, 3, 2)
    assert 0 < quarantine["unread_rows"] < 100   # part of row group 1 was read
    assert solvable + quarantine["rows"] + quarantine["unread_rows"] == 303
    check_rows_accounted(footer_rows(units), solvable, quarantine)


def test_a_row_lost_between_the_read_and_the_solve_is_refused(tmp_path):
    """Before, ``rows_in`` was derived from the same counts, so a lost row only made it smaller
    and the run committed."""
    _night(tmp_path / "in")
    solvable, quarantine, units = _read_and_dedupe(tmp_path / "in", drop_from_unit=2)
    with pytest.raises(RuntimeError, match=r"footers count 303 rows but the run accounts for "
                                           r"302 \(.*nothing was committed"):
        check_rows_accounted(footer_rows(units), solvable, quarantine)


def test_a_jsonl_file_in_the_input_skips_the_check_and_says_so(tmp_path):
    _night(tmp_path / "in")
    (tmp_path / "in" / "d.jsonl").write_text('{"query_id": "j1", "query": "hi"}\n{"query": 1}\n')
    solvable, quarantine, units = _read_and_dedupe(tmp_path / "in", drop_from_unit=2)
    assert footer_rows(units) is None
    assert rows_check_words(units) == ("skipped: 1 jsonl file(s) in the input, whose rows are "
                                       "counted only as read")
    check_rows_accounted(footer_rows(units), solvable, quarantine)   # a lost row goes unseen
    assert footer_rows([]) == 0   # every file unreadable: nothing planned, nothing to account
