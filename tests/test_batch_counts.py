"""The commit's counts of the quarantine and deferred folders (no Ray)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from r2ray.batch.assign import assign_stage
from r2ray.batch.backlog import QUARANTINE_SCHEMA
from r2ray.batch.job import _count_rows, check_assigned_parts, quarantine_counts
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
