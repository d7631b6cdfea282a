"""Backlog reading and validation: every bad row is quarantined with a reason naming it."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray.batch.backlog import (ROW_BITS, plan_units, read_and_validate, read_stage, unit_items,
                                 validated_slices)

CONTEXT = 1000
DIM = 3


def _validate_all(folder, embedding_required=False):
    units, unreadable = plan_units(str(folder))
    goods, bads = [], [unreadable]
    for unit in units:
        good, bad = read_and_validate(unit, CONTEXT, DIM, embedding_required)
        goods.append(good)
        bads.append(bad)
    return pa.concat_tables(goods), pa.concat_tables(bads)


def _reasons(bad: pa.Table) -> dict:
    return {(r["row"], r["query_id"]): r["reason"] for r in bad.to_pylist()}


def test_each_bad_row_gets_its_reason(tmp_path):
    rows = [
        {"query_id": "ok", "query": "What is 2+2?", "embedding": [0.1, 0.2, 0.3]},  # line 1
        {"query": "no id here"},                                                     # 2
        {"query_id": "blank", "query": "  \t "},                                      # 3
        {"query_id": "number", "query": 42},                                          # 4
        {"query_id": "long", "query": "x", "input_tokens": 5000},                     # 5
        {"query_id": "dim", "query": "y", "embedding": [0.1, 0.2]},                   # 6
        {"query_id": "nan", "query": "z", "embedding": [0.1, float("nan"), 0.3]},     # 7
        {"query_id": "neg", "query": "w", "input_tokens": -1},                        # 8
        {"query_id": 7, "query": "integer ids are fine"},                             # 9
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{broken json\n"
    (tmp_path / "a.jsonl").write_text(text)
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["ok", "7"]
    assert good.column("input_tokens").to_pylist()[0] >= 3
    reasons = _reasons(bad)
    assert reasons[(2, None)] == "missing query_id"
    assert reasons[(3, "blank")] == "empty or whitespace-only query"
    assert "query is a int, not a str" in reasons[(4, "number")]
    assert "no model's context window" in reasons[(5, "long")]
    assert reasons[(6, "dim")] == "embedding has 2 values; the model expects 3"
    assert reasons[(7, "nan")] == "embedding holds NaN or infinite values"
    assert "input_tokens -1" in reasons[(8, "neg")]
    assert reasons[(10, None)].startswith("invalid JSON line")
    assert good.num_rows + bad.num_rows == len(rows) + 1  # nothing silently dropped
    raw = json.loads(bad.filter(pa.compute.equal(bad.column("query_id"), "dim"))
                     .column("raw")[0].as_py())
    assert raw["embedding"] == [0.1, 0.2]  # the row as read is kept


def test_corrupt_parquet_among_good_files_is_quarantined_whole(tmp_path):
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["q a", "q b"]}),
                   tmp_path / "good.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    good, bad = _validate_all(tmp_path)
    assert sorted(good.column("query_id").to_pylist()) == ["a", "b"]
    (record,) = bad.to_pylist()
    assert record["source"].endswith("bad.parquet") and record["row"] is None
    assert record["reason"].startswith("unreadable parquet file")


def test_parquet_column_types_and_row_groups(tmp_path):
    table = pa.table({"query_id": [f"q{i}" for i in range(10)],
                      "query": [f"question {i}" for i in range(10)],
                      "input_tokens": pa.array([5] * 9 + [None], pa.int64()),
                      "tenant": ["t1"] * 10})
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=4)
    units, _ = plan_units(str(tmp_path))
    assert [u.row_group for u in units] == [0, 1, 2] and [u.first_row for u in units] == [0, 4, 8]
    good, bad = _validate_all(tmp_path)
    assert bad.num_rows == 0 and good.num_rows == 10
    orders = good.column("order").to_numpy()
    assert list(orders & ((1 << ROW_BITS) - 1)) == list(range(10))  # row numbers survive groups
    assert good.column("input_tokens").to_pylist()[-1] >= 2  # missing count estimated
    pq.write_table(pa.table({"query_id": ["x"], "query": pa.array([3], pa.int64())}),
                   tmp_path / "typed.parquet")
    _, bad = _validate_all(tmp_path)
    assert bad.column("reason").to_pylist() == ["query is int64, not a string"]


def test_embedding_required_when_the_model_has_no_encoder(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"query_id": "a", "query": "text only"}) + "\n")
    good, bad = _validate_all(tmp_path, embedding_required=True)
    assert good.num_rows == 0
    assert "every query needs one" in bad.column("reason")[0].as_py()


def test_embeddings_are_kept_as_float32_lists(tmp_path):
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["x", "y"],
                             "embedding": pa.array(list(vectors), pa.list_(pa.float32(), 3))}),
                   tmp_path / "e.parquet")
    good, _ = _validate_all(tmp_path)
    assert good.column("embedding").to_pylist() == vectors.tolist()


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    good, bad = _validate_all(tmp_path)
    assert good.num_rows == 0 and bad.num_rows == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_units(str(tmp_path / "missing"))


def _one_row_group(path, n: int, bad_every: int = 0):
    """A parquet file of ``n`` rows in one row group; every ``bad_every``-th row has an empty
    query (quarantined)."""
    rows = [{"query_id": f"q{i}", "query": " " if bad_every and i % bad_every == 0 else f"q {i}",
             "embedding": [0.1, 0.2, 0.3]} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=n)
    units, _ = plan_units(str(path))
    assert len(units) == 1
    return units[0]


def test_a_row_group_read_in_slices_gives_the_rows_of_reading_it_whole(tmp_path):
    unit = _one_row_group(tmp_path / "a.parquet", 250, bad_every=7)
    whole_good, whole_bad = read_and_validate(unit, CONTEXT, DIM)
    pieces = list(validated_slices(unit, CONTEXT, DIM, slice_rows=64))
    assert [g.num_rows + b.num_rows for g, b in pieces] == [64, 64, 64, 58]
    assert pa.concat_tables([g for g, _ in pieces]).equals(whole_good)
    assert pa.concat_tables([b for _, b in pieces]).equals(whole_bad)
    assert whole_bad.column("row").to_pylist() == list(range(1, 251, 7))   # 1-based rows
    assert whole_good.num_rows + whole_bad.num_rows == 250


def test_a_row_group_that_fails_part_way_keeps_what_was_read_and_names_the_rest(
        tmp_path, monkeypatch):
    from r2ray.batch import backlog

    unit = _one_row_group(tmp_path / "a.parquet", 100)
    read = backlog.read_unit

    def fails_after_two(unit, slice_rows=None):
        pieces = read(unit, slice_rows)
        yield next(pieces)
        yield next(pieces)
        raise OSError("connection reset")

    monkeypatch.setattr(backlog, "read_unit", fails_after_two)
    pieces = list(validated_slices(unit, CONTEXT, DIM, slice_rows=30))
    good = pa.concat_tables([g for g, _ in pieces])
    bad = pa.concat_tables([b for _, b in pieces]).to_pylist()
    assert good.column("query_id").to_pylist() == [f"q{i}" for i in range(60)]
    assert len(bad) == 1 and bad[0]["row"] is None   # a unit-level record, as for a whole unit
    assert bad[0]["reason"] == ("unreadable input from row 61 on (the rows before it were "
                                "read), 40 rows not read: connection reset")
    assert bad[0]["unread_rows"] == 40   # from the footer: the row group's 100 less 60 read
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"query_id": f"j{i}", "query": "x"})
                                              + "\n" for i in range(100)))
    units, _ = plan_units(str(tmp_path / "b.jsonl"))
    pieces = list(validated_slices(units[0], CONTEXT, DIM, slice_rows=30))
    assert sum(g.num_rows for g, _ in pieces) == 60
    assert [b for _, b in pieces if b.num_rows][0].column("reason").to_pylist() == [
        "unreadable input from row 61 on (the rows before it were read): connection reset"]


def _corrupt_row_group(path, group: int) -> None:
    """Overwrite bytes in the middle of row group ``group``'s ``query`` column chunk, so that
    reading it fails part-way (the footer, and so the row counts, stay readable)."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(1)
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_rows_a_damaged_file_leaves_unread_are_counted_from_its_footer(tmp_path):
    """A row group that fails part-way is one record with ``row`` null: its unread rows are in
    no count, so the record carries how many the footer says were left (before: none, and the
    manifest's only trace was one "unreadable file"); a file with two failed row groups is one
    unreadable file, not two."""
    from r2ray.batch.job import quarantine_counts, summarise_manifest

    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir()
    n = 1000
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(n)],
                             "query": [f"question number {i} " * 3 for i in range(n)]}),
                   path, row_group_size=250, compression="none", use_dictionary=False,
                   data_page_size=2000)
    _corrupt_row_group(path, 1)
    _corrupt_row_group(path, 3)
    units, _ = plan_units(str(path))
    quarantine = tmp_path / "quarantine"
    items = unit_items(units)
    batch = {k: np.array([item[k] for item in items]) for k in items[0]}
    read = sum(t.num_rows for t in read_stage(batch, str(quarantine), CONTEXT, DIM, False,
                                              slice_rows=50))
    records = pq.read_table(quarantine).to_pylist()
    assert [r["row"] for r in records] == [None, None]
    unread = sum(r["unread_rows"] for r in records)
    assert read + unread == n and 0 < unread < 500   # part of each damaged row group was read
    counts = quarantine_counts(str(quarantine))
    assert (counts["files"], counts["rows"], counts["unread_rows"]) == (1, 0, unread)
    manifest = {"run_id": "r", "committed_at": "t", "output": {"routed": "o/r/a/routed"},
                "counts": {"rows_in": read, "routed": read, "quarantined": 0, "duplicates": 0,
                           "deferred": 0, "unreadable_files": counts["files"],
                           "unread_rows": counts["unread_rows"]},
                "spend": {"predicted_usd": 0.0, "usable_usd": 1.0, "budget_usd": 1.0,
                          "by_model": {}}, "solve": None, "timings": {}}
    assert (f"1 unreadable file(s) ({unread:,} rows in them not read, not in the counts)"
            in summarise_manifest(manifest))


def test_the_read_stage_yields_each_slice_and_quarantines_a_unit_once(tmp_path):
    unit = _one_row_group(tmp_path / "a.parquet", 100, bad_every=10)
    quarantine = tmp_path / "quarantine"
    item = {k: np.array([v]) for k, v in unit_items([unit])[0].items()}
    out = list(read_stage(item, str(quarantine), CONTEXT, DIM, False, slice_rows=25))
    assert [t.num_rows for t in out] == [22, 23, 22, 23]   # rows 0, 10, ... 90 quarantined
    written = sorted(quarantine.iterdir())
    assert [p.name for p in written] == ["part-f000000-g000000.parquet"]
    assert pq.read_table(written[0]).column("row").to_pylist() == list(range(1, 101, 10))
    empty = {k: np.array([v]) for k, v in unit_items([_one_row_group(tmp_path / "b.parquet", 3,
                                                                     bad_every=1)])[0].items()}
    only = list(read_stage(empty, str(quarantine), CONTEXT, DIM, False, slice_rows=25))
    assert [t.num_rows for t in only] == [0] and only[0].schema.names[:2] == ["query_id", "query"]


def test_a_jsonl_file_read_in_slices_gives_the_rows_of_reading_it_whole(tmp_path):
    lines = []
    for i in range(200):
        if i % 9 == 0:
            lines.append("{broken")
        elif i % 13 == 0:
            lines.append("   ")                                         # blank: skipped
        else:
            lines.append(json.dumps({"query_id": f"q{i}", "query": f"q {i}\u2028x"}))
    (tmp_path / "a.jsonl").write_bytes(("\r\n".join(lines) + "\n").encode())
    units, _ = plan_units(str(tmp_path))
    whole_good, whole_bad = read_and_validate(units[0], CONTEXT, DIM)
    pieces = list(validated_slices(units[0], CONTEXT, DIM, slice_rows=40))
    assert len(pieces) > 4 and all(g.num_rows + b.num_rows <= 40 for g, b in pieces)
    assert pa.concat_tables([g for g, _ in pieces]).equals(whole_good)
    assert pa.concat_tables([b for _, b in pieces]).equals(whole_bad)
    assert whole_bad.column("row").to_pylist() == list(range(1, 201, 9))   # 1-based lines
    assert whole_good.column("query").to_pylist()[0] == "q 1\u2028x"       # \r\n stripped
    assert whole_good.num_rows + whole_bad.num_rows == 200 - len([i for i in range(200)
                                                                  if i % 13 == 0 and i % 9])


def test_raw_rows_of_a_jsonl_file_are_its_lines_as_stored(tmp_path):
    from r2ray.batch.backlog import raw_rows

    lines = ['{"query_id": "a", "query": "x"}', "", '{"query_id": "b", "query": "y\u2028z"}']
    (tmp_path / "a.jsonl").write_bytes("\r\n".join(lines).encode())
    assert raw_rows(str(tmp_path / "a.jsonl"), [3, 1, 3]) == {1: lines[0], 3: lines[2]}


# ---- rows the validation lost or crashed on (found in a review, 2026-12-05) --------------------
OK_ROW = {"query_id": "a", "query": "hello"}


def _jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def test_jsonl_rows_without_any_known_field_are_quarantined_not_dropped(tmp_path):
    # e.g. a backlog exported with the wrong column names: {"id", "text"}
    _jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "hello"}, {}])
    good, bad = _validate_all(tmp_path)
    assert good.num_rows + bad.num_rows == 2        # before the fix: 0 + 0, both rows vanish
    assert json.loads(bad.column("raw")[0].as_py()) == {"id": "x", "text": "hello"}


def test_jsonl_quarantine_raw_keeps_every_field_as_read(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"query_id": "b", "query": " ", "meta": {"user": 7}}])
    _, bad = _validate_all(tmp_path)
    # before the fix: "meta" was dropped from the record
    assert json.loads(bad.column("raw")[0].as_py())["meta"] == {"user": 7}


def test_deeply_nested_jsonl_line_is_quarantined_not_a_crash(tmp_path):
    # before the fix: RecursionError
    _jsonl(tmp_path / "a.jsonl", [OK_ROW, "[" * 100_000 + "]" * 100_000])
    good, bad = _validate_all(tmp_path)
    assert good.num_rows == 1 and bad.column("row").to_pylist() == [2]


def test_huge_integer_input_tokens_in_jsonl_is_quarantined(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [OK_ROW, {"query_id": "b", "query": "x", "input_tokens": 2 ** 60},
                                  {"query_id": "c", "query": "x", "input_tokens": 10 ** 30}])
    good, bad = _validate_all(tmp_path)   # before the fix: ArrowInvalid, the whole unit (job) fails
    assert good.num_rows == 1 and bad.column("row").to_pylist() == [2, 3]


def test_huge_integer_embedding_value_in_jsonl_is_quarantined(tmp_path):
    _jsonl(tmp_path / "a.jsonl",
           [OK_ROW, {"query_id": "b", "query": "x", "embedding": [1, 2, 2 ** 60]}])
    good, bad = _validate_all(tmp_path)   # before the fix: ArrowInvalid
    assert good.num_rows == 1 and bad.column("row").to_pylist() == [2]


def test_huge_integer_input_tokens_in_parquet_is_quarantined(tmp_path):
    pq.write_table(pa.table({"query_id": ["a", "b", "c"], "query": ["x", "y", "z"],
                             "input_tokens": pa.array([3, 2 ** 60, 2 ** 63 + 1], pa.uint64())}),
                   tmp_path / "a.parquet")
    good, bad = _validate_all(tmp_path)   # before the fix: ArrowInvalid "not in range"
    assert good.column("query_id").to_pylist() == ["a"] and bad.num_rows == 2


def test_integer_embedding_values_past_2_24_in_parquet_do_not_crash(tmp_path):
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["x", "y"],
                             "embedding": pa.array([[1, 2, 3], [1, 2, 20_000_000]])}),
                   tmp_path / "a.parquet")
    # before the fix: ArrowInvalid "not in range: -16777216 to 16777216"
    good, bad = _validate_all(tmp_path)
    # 20,000,000 is a float32 exactly: both rows are good, their values kept (not quarantined)
    assert bad.num_rows == 0, bad.to_pylist()
    assert good.column("embedding").to_pylist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 20_000_000.0]]


def test_parquet_embedding_of_strings_or_nested_lists_is_quarantined(tmp_path):
    pq.write_table(pa.table({"query_id": ["a"], "query": ["x"],
                             "embedding": pa.array([["1", "2", "c"]])}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"query_id": ["b"], "query": ["y"],
                             "embedding": pa.array([[[1.0], [2.0], [3.0]]])}),
                   tmp_path / "n.parquet")
    good, bad = _validate_all(tmp_path)   # before the fix: ArrowInvalid / ArrowNotImplementedError
    assert good.num_rows == 0 and bad.num_rows == 2
    assert all("not a list of numbers" in r for r in bad.column("reason").to_pylist())


def test_dictionary_encoded_string_columns_are_read_as_strings(tmp_path):
    # pandas 'category' columns are stored dictionary-encoded
    pq.write_table(pa.table({"query_id": pa.array(["a", "b"]).dictionary_encode(),
                             "query": pa.array(["x", "y"]).dictionary_encode(),
                             "tenant": pa.array(["t", "t"]).dictionary_encode()}),
                   tmp_path / "a.parquet")
    # before the fix: every row quarantined "query is dictionary<...>"
    good, bad = _validate_all(tmp_path)
    assert bad.num_rows == 0 and good.column("tenant").to_pylist() == ["t", "t"]


def test_nan_input_tokens_is_quarantined_in_parquet_and_jsonl_alike(tmp_path):
    # null = "estimate it"; NaN is a bad count (as -1 or inf are), whichever format carries it
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["hello there", "x"],
                             "input_tokens": pa.array([None, float("nan")], pa.float64())}),
                   tmp_path / "a.parquet")
    _jsonl(tmp_path / "b.jsonl", ['{"query_id": "c", "query": "hi", "input_tokens": null}',
                                  '{"query_id": "d", "query": "hi", "input_tokens": NaN}'])
    good, bad = _validate_all(tmp_path)   # before the fix: b and d estimated from the text
    assert good.column("query_id").to_pylist() == ["a", "c"]
    assert all(n >= 1 for n in good.column("input_tokens").to_pylist())
    assert _reasons(bad) == {(2, "b"): "input_tokens nan is not a positive integer",
                             (2, "d"): "input_tokens nan is not a positive integer"}


def test_zero_input_tokens_is_quarantined_as_serve_refuses_it(tmp_path):
    """A count of 0 for a query with text priced its prompt as free, where Serve refuses it
    (``input_tokens`` > 0): the batch and Serve priced the same query differently."""
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["hello there", "x"],
                             "input_tokens": pa.array([0, 3], pa.int64())}),
                   tmp_path / "a.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["b"]
    assert good.column("input_tokens").to_pylist() == [3]
    assert _reasons(bad) == {(1, "a"): "input_tokens 0 is not a positive integer"}


def test_a_utf8_byte_order_mark_does_not_cost_the_first_jsonl_row(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(OK_ROW).encode() + b"\n"
                                       + json.dumps({**OK_ROW, "query_id": "b"}).encode() + b"\n")
    good, bad = _validate_all(tmp_path)   # before the fix: row 1 "Unexpected UTF-8 BOM"
    assert bad.num_rows == 0 and good.column("query_id").to_pylist() == ["a", "b"]


def test_the_bench_and_the_backlog_give_a_jsonl_row_the_same_line(tmp_path):
    """One rule (r2ray.bench.io.jsonl_lines) for both: a byte order mark, blank and whitespace
    lines, CRLF endings and a last line without its newline."""
    from r2ray.batch.backlog import read_unit
    from r2ray.bench.io import read_table_rows

    rows = [json.dumps({**OK_ROW, "query_id": f"q{i}"}).encode() for i in range(4)]
    data = (b"\xef\xbb\xbf" + rows[0] + b"\r\n\r\n \t\r\n" + rows[1] + b"\n\n" + rows[2] + b"\r\n"
            + b"   \n" + rows[3])
    (tmp_path / "a.jsonl").write_bytes(data)
    units, _ = plan_units(str(tmp_path))
    (backlog, failures), = read_unit(units[0])
    _, bench_lines = read_table_rows(str(tmp_path / "a.jsonl"))
    assert failures == [] and [r["__line"] for r in backlog] == bench_lines.tolist() == [1, 4, 6, 8]


def test_a_line_of_non_json_whitespace_is_quarantined_not_skipped(tmp_path):
    """A form feed or U+00A0 is no JSON whitespace (pyarrow refuses the bench line): the backlog
    skipped such a line as blank (str.strip), silently."""
    (tmp_path / "a.jsonl").write_bytes(json.dumps(OK_ROW).encode() + b"\n\x0c\n\xc2\xa0\n")
    good, bad = _validate_all(tmp_path)
    assert good.num_rows == 1 and bad.column("row").to_pylist() == [2, 3]
    assert all(r.startswith("invalid JSON line") for r in bad.column("reason").to_pylist())


def test_string_view_columns_as_polars_writes_them_are_strings(tmp_path):
    """Polars 1.38 wrote string columns to parquet as string_view, which pyarrow has no take,
    filter or string kernels for: every row was quarantined as "query is string_view, not a
    string", and taking the bad rows (and a duplicate's raw row) crashed the task."""
    from r2ray.batch.backlog import raw_rows

    views = {"query_id": ["a", "b", "a"], "query": ["What is 2+2?", "  ", "again"],
             "tenant": ["t", None, "t"], "note": ["kept", "in the", "raw rows"]}
    table = pa.table({**{k: pa.array(v, pa.string_view()) for k, v in views.items()},
                      "blob": pa.array([b"x", b"y", b"z"], pa.binary_view())})
    pq.write_table(table, tmp_path / "polars.parquet")
    assert pq.read_schema(tmp_path / "polars.parquet").field("query").type == pa.string_view()
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["a", "a"]   # the repeat: the dedupe's
    assert good.column("tenant").to_pylist() == ["t", "t"]
    assert _reasons(bad) == {(2, "b"): "empty or whitespace-only query"}
    assert json.loads(bad.column("raw")[0].as_py())["note"] == "in the"
    assert json.loads(raw_rows(str(tmp_path / "polars.parquet"), [3])[3])["note"] == "raw rows"


def test_a_lone_surrogate_in_a_jsonl_field_is_quarantined_not_a_crash(tmp_path):
    """``"\\ud800"`` is valid JSON but half a UTF-16 pair: Arrow could not hold the decoded str,
    and the UnicodeEncodeError failed the whole file's read task on every retry."""
    _jsonl(tmp_path / "a.jsonl", [OK_ROW, '{"query_id": "b", "query": "x\\ud800y"}',
                                  '{"query_id": "\\udc00", "query": "q"}',
                                  '{"query_id": "d", "query": "q", "tenant": "\\ud800"}',
                                  '{"query_id": "e", "query": "\\ud83d\\ude00 a pair is fine"}'])
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == [OK_ROW["query_id"], "e"]
    assert _reasons(bad) == {
        (2, "b"): "query holds a lone surrogate ('\\ud800' at character 1)",
        (3, None): "query_id holds a lone surrogate ('\\udc00' at character 0)",
        (4, "d"): "tenant holds a lone surrogate ('\\ud800' at character 0)"}
    assert json.loads(bad.column("raw")[1].as_py())["query_id"] == "\udc00"   # kept as read


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding ``values`` as they are, valid UTF-8 or not (as a foreign parquet
    writer may store them; pyarrow reads them back unchecked)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [
        None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])


@pytest.mark.parametrize("column", ["query_id", "query", "tenant", "note"])
def test_invalid_utf8_in_a_parquet_string_column_is_quarantined_not_a_crash(tmp_path, column):
    """Arrow's string kernels raised ArrowInvalid on the bad bytes (query_id, query) out of the
    read task on every retry; a bad tenant passed into the routed rows, where listing it raised
    UnicodeDecodeError; and listing the raw record of a row quarantined for its blank query
    raised it for the bytes of any other column (``note``)."""
    columns = {"query_id": ["a", "b"], "query": ["x", " "], "tenant": ["t", "t"],
               "note": ["n", "n"]}
    table = pa.table({name: _invalid_utf8([b"ok", b"b\xffad"]) if name == column
                      else pa.array(values) for name, values in columns.items()})
    pq.write_table(table, tmp_path / "a.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.num_rows == 1 and good.column("order").to_pylist() == [0]
    (record,) = bad.to_pylist()
    assert record["row"] == 2 and record["reason"] == f"invalid UTF-8 in {column} (byte 1)"
    assert json.loads(record["raw"])[column] == "b\\xffad"   # the bytes kept, escaped
    good.validate(full=True)


def test_a_bad_row_with_an_integer_id_is_quarantined_under_that_id(tmp_path):
    """An integer id is a valid id (routed as its digits), so its bad row's record names it too:
    before, a jsonl number id with a mistyped field, and every bad row of a parquet int64
    ``query_id`` column, were quarantined with no id."""
    (tmp_path / "a.jsonl").write_text(
        '{"query_id": 7, "query": "x", "input_tokens": "5"}\n'
        '{"query_id": 8, "query": "x", "embedding": ["a", "b", "c"]}\n'
        '{"query_id": true, "query": "x"}\n')
    pq.write_table(pa.table({"query_id": pa.array([9, 10], pa.int64()), "query": ["ok", "  "]}),
                   tmp_path / "b.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["9"]
    assert sorted(bad.column("query_id").to_pylist(), key=str) == ["10", "7", "8", None]


def test_a_repeated_column_quarantines_its_file_and_a_line_column_is_read(tmp_path):
    """A parquet file that holds ``query`` twice (pyarrow writes one) is quarantined whole with
    its row count, and one with a column named ``__line`` is read like any other: before, either
    raised a KeyError out of the read task on every retry, and the whole run failed."""
    two_queries = pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["x", "y"]),
                                        pa.array(["u", "v"])], names=["query_id", "query", "query"])
    pq.write_table(two_queries, tmp_path / "a.parquet")
    pq.write_table(pa.table({"query_id": ["c", "d"], "query": ["x", "y"], "__line": [5, 6]}),
                   tmp_path / "b.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["c", "d"]
    assert good.column("order").to_pylist() == [1 << ROW_BITS, (1 << ROW_BITS) | 1]
    (record,) = bad.to_pylist()
    assert record["source"].endswith("a.parquet") and record["row"] is None
    assert record["unread_rows"] == 2 and "more than one column named query" in record["reason"]


def test_a_column_python_cannot_hold_is_listed_in_raw_not_a_crash(tmp_path):
    """A string under a list or struct is not checked where the file is read, and a timestamp
    past Python's range (an export's "infinity", the largest int64) is no datetime: listing the
    raw record of a row quarantined for another reason (its blank query), or of a repeated id,
    raised UnicodeDecodeError or OverflowError on every retry and failed the whole run. Such a
    column is listed with its strings as bytes, or as Arrow prints it; the others as they are."""
    from r2ray.batch.backlog import raw_rows

    bad_bytes = _invalid_utf8([b"ok", b"b\xffad"])
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), bad_bytes)
    meta = pa.StructArray.from_arrays([bad_bytes], names=["note"])
    until = pa.array([0, 2 ** 63 - 1], pa.timestamp("us"))
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["fine", " "], "tags": tags,
                             "meta": meta, "until": until}), tmp_path / "a.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["a"]
    (record,) = bad.to_pylist()
    raw = json.loads(record["raw"])
    assert record["row"] == 2 and raw["query_id"] == "b" and raw["query"] == " "
    assert raw["tags"] == ["b'b\\xffad'"] and raw["meta"] == {"note": "b'b\\xffad'"}
    assert raw["until"] == "<value out of range: 9223372036854775807>"
    listed = raw_rows(str(tmp_path / "a.parquet"), [2])   # a repeated id's record
    assert json.loads(listed[2])["tags"] == ["b'b\\xffad'"]


def test_a_parquet_footer_with_a_latin1_column_name_is_quarantined_whole(tmp_path):
    """pyarrow's parquet reader raises UnicodeDecodeError on a column name that is not UTF-8 (a
    latin-1 writer's ``café``): before, it escaped the plan (and a unit's read) and failed the
    whole run, good files and all."""
    from r2ray.batch.backlog import ReadUnit

    pq.write_table(pa.table({"query_id": ["a"], "query": ["x"], "caf\u00e9X": ["y"]}),
                   tmp_path / "latin1.parquet")
    data = (tmp_path / "latin1.parquet").read_bytes()
    (tmp_path / "latin1.parquet").write_bytes(
        data.replace("caf\u00e9X".encode(), "caf\u00e9".encode("latin-1") + b"XX"))
    pq.write_table(pa.table({"query_id": ["b"], "query": ["x"]}), tmp_path / "good.parquet")
    good, bad = _validate_all(tmp_path)
    assert good.column("query_id").to_pylist() == ["b"]
    (record,) = bad.to_pylist()
    assert record["source"].endswith("latin1.parquet") and record["row"] is None
    assert record["reason"].startswith("unreadable parquet file: 'utf-8' codec can't decode")
    # a file that turned so between the plan and its read: the unit is quarantined, counted
    unit = ReadUnit(str(tmp_path / "latin1.parquet"), 0, row_group=0, first_row=0, rows=1)
    ((read, unread),) = validated_slices(unit, CONTEXT, DIM)
    assert read.num_rows == 0 and unread.column("unread_rows").to_pylist() == [1]
