"""`r2ray bench stats`: per (model, budget) statistics, hand-computed, and the printed report."""

import json

import pyarrow as pa
import pytest

from r2ray.bench.io import write_table
from r2ray.bench.schema import BenchError
from r2ray.bench.stats import (bench_stats, bench_stats_report, catalog_uri_beside, combine_partials,
                               finalise_stats, partial_sums)
from r2ray.catalog import catalog_from_dict, save_catalog
from r2ray.cli import main

NAN = None
ROWS = [  # query, model, budget, input, output, quality, truncated, cost_usd
    ("q1", "A", 10, 100, 8, 1.0, False, NAN),
    ("q2", "A", 10, 100, 12, 0.0, True, NAN),
    ("q1", "A", 0, 100, 300, 1.0, False, NAN),
    ("q2", "A", 0, 100, 500, 0.5, False, NAN),
    ("q1", "B", 10, 100, 11, 0.6, False, 0.5),   # recorded cost wins over prices
    ("q2", "B", 10, 100, 20, 0.2, True, NAN),
    ("q1", "C", 0, 100, 100, 0.3, False, NAN),   # C is not in the catalogue
]


def tiny_bench() -> pa.Table:
    names = ["query_id", "model", "budget", "input_tokens", "output_tokens", "quality", "truncated",
             "cost_usd"]
    columns = {name: [row[i] for row in ROWS] for i, name in enumerate(names)}
    columns["query"] = [f"text of {q}" for q in columns["query_id"]]
    columns["category"] = ["demo"] * len(ROWS)
    return pa.table(columns)


@pytest.fixture
def catalog():
    return catalog_from_dict({"budgets": [10, "default"], "models": [
        {"name": "A", "input_per_m": 1.0, "output_per_m": 2.0, "context": 1000},
        {"name": "B", "input_per_m": 10.0, "output_per_m": 20.0, "context": 1000}]})


def test_hand_computed_statistics(catalog):
    rows = bench_stats(tiny_bench(), catalog).to_pylist()
    assert [(r["model"], r["budget"]) for r in rows] == [("A", 10), ("A", 0), ("B", 10), ("C", 0)]
    a10, a_default, b10, c_default = rows
    assert a10["count"] == 2 and a10["mean_quality"] == pytest.approx(0.5)
    assert a10["mean_output_tokens"] == pytest.approx(10.0)
    assert a10["share_within_1_1x"] == pytest.approx(0.5)       # 8 ≤ 11, 12 > 11
    assert a10["share_truncated"] == pytest.approx(0.5)
    # 100·1 + 8·2, 100·1 + 12·2, each + the length instruction's 11 estimated tokens × 1
    assert a10["mean_cost_usd"] == pytest.approx((116e-6 + 124e-6) / 2 + 11e-6)
    assert a_default["share_within_1_1x"] is None
    assert a_default["mean_quality"] == pytest.approx(0.75)
    assert a_default["mean_cost_usd"] == pytest.approx((700e-6 + 1100e-6) / 2)
    assert b10["share_within_1_1x"] == pytest.approx(0.5)       # 11 is exactly 1.1 × 10: within
    assert b10["mean_cost_usd"] == pytest.approx((0.5 + 1400e-6 + 110e-6) / 2)
    assert c_default["mean_cost_usd"] is None and c_default["count"] == 1


def test_a_row_without_cost_is_billed_as_routing_prices_it(catalog):
    """A row recording no cost_usd is priced by routing.call_cost_usd: the prompt sent carries a
    budgeted arm's length instruction (11 estimated tokens at budget 10), which the old formula
    left out; a (model, budget) the catalogue does not offer has no price."""
    table = tiny_bench().slice(0, 1)                       # A at budget 10: 100 in, 8 out
    assert bench_stats(table, catalog).column("mean_cost_usd")[0].as_py() == pytest.approx(
        (100 + 11) * 1e-6 + 8 * 2e-6)
    off_grid = table.set_column(table.schema.get_field_index("budget"), "budget",
                                pa.array([7], pa.int32()))
    assert bench_stats(off_grid, catalog).column("mean_cost_usd")[0].as_py() is None


def test_without_a_catalogue_only_recorded_costs_count():
    rows = {(r["model"], r["budget"]): r for r in bench_stats(tiny_bench()).to_pylist()}
    assert rows[("A", 10)]["mean_cost_usd"] is None
    assert rows[("B", 10)]["mean_cost_usd"] == pytest.approx(0.5)  # the one row with a cost
    assert rows[("A", 10)]["mean_quality"] == pytest.approx(0.5)


def test_partial_sums_combine_to_the_whole(catalog):
    table = tiny_bench()
    parts = [partial_sums(table.slice(0, 3), catalog), partial_sums(table.slice(3), catalog)]
    assert finalise_stats(combine_partials(parts), catalog).equals(bench_stats(table, catalog))


def test_catalogue_beside_the_bench():
    assert catalog_uri_beside("s3://b/x/bench.parquet") == "s3://b/x/bench.catalog.yaml"
    assert catalog_uri_beside("out/bench.jsonl") == "out/bench.catalog.yaml"


def test_report_uses_the_catalogue_beside_and_notes_unpriced_models(catalog, tmp_path):
    bench = tmp_path / "bench.jsonl"
    write_table(tiny_bench(), str(bench))
    save_catalog(catalog, catalog_uri_beside(str(bench)))
    report = bench_stats_report([str(bench)])
    lines = report.splitlines()
    assert lines[0] == f"bench: 1 file(s), 7 rows; prices: {tmp_path / 'bench.catalog.yaml'}"
    assert lines[1].split() == ["model", "budget", "count", "quality", "out_tokens", "within_1.1x",
                                "truncated", "cost_usd"]
    assert lines[2].split() == ["A", "10", "2", "0.500", "10.0", "50.0%", "50.0%", "1.310e-04"]
    assert lines[3].split()[:2] == ["A", "default"] and lines[3].split()[5] == "-"
    assert lines[5].split() == ["C", "default", "1", "0.300", "100.0", "-", "0.0%"]
    assert "no prices for C" in lines[-1]


def test_report_defaults_to_the_default_catalogue(tmp_path):
    bench = tmp_path / "bench.parquet"
    write_table(tiny_bench(), str(bench))
    report = bench_stats_report(str(bench))
    assert "prices: the default catalogue" in report
    assert "no prices for A, C" in report  # B has a recorded cost on one row


def test_cli_stats_prints_the_table_and_rejects_bad_rows(catalog, tmp_path, capsys):
    bench = tmp_path / "bench.parquet"
    write_table(tiny_bench(), str(bench))
    yaml_path = tmp_path / "prices.yaml"
    save_catalog(catalog, str(yaml_path))
    assert main(["bench", "stats", str(bench), "--catalog", str(yaml_path)]) == 0
    assert "1.310e-04" in capsys.readouterr().out
    bad = tiny_bench().set_column(5, "quality", pa.array([0.1, 0.2, 1.5, 0.0, 0.0, 0.0, 0.0]))
    write_table(bad, str(tmp_path / "bad.parquet"))
    assert main(["bench", "stats", str(tmp_path / "bad.parquet")]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet, row 3, field 'quality'" in err and "1.5" in err


def test_report_names_the_line_of_a_bad_jsonl_row_after_blank_lines(tmp_path):
    """pyarrow skips blank lines: the bad row is table row 3 but line 5, the line read_bench
    names; the report named row 3 (in a batch, and across batches)."""
    bad = tiny_bench().set_column(5, "quality", pa.array([0.1, 0.2, 1.5, 0.0, 0.0, 0.0, 0.0]))
    rows = [json.dumps(row) for row in bad.to_pylist()]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(["", rows[0], "", *rows[1:]]) + "\n")
    for batch_rows in (1 << 20, 2):
        with pytest.raises(BenchError, match=r"bad\.jsonl, row 5, field 'quality'.*1\.5"):
            bench_stats_report(str(path), batch_rows=batch_rows)
    rows = [json.dumps(row) for row in tiny_bench().to_pylist()]
    rows.append(rows[1])   # a repeat of line 4, on line 10
    path.write_text("\n".join(["", rows[0], "", *rows[1:]]) + "\n")
    with pytest.raises(BenchError, match=r"bad\.jsonl, row 10, field 'query_id'.*duplicate"):
        bench_stats_report(str(path), batch_rows=3)


def test_report_refuses_an_arm_repeated_across_files_or_batches(tmp_path):
    """read_bench refuses such a bench; the streamed report must not count the rows twice."""
    (tmp_path / "two").mkdir()
    write_table(tiny_bench(), str(tmp_path / "two" / "a.parquet"))
    write_table(tiny_bench().slice(4, 1), str(tmp_path / "two" / "b.parquet"))
    with pytest.raises(BenchError, match=r"b\.parquet, row 1, field 'query_id'.*duplicate"):
        bench_stats_report(str(tmp_path / "two"))
    doubled = pa.concat_tables([tiny_bench(), tiny_bench().slice(1, 1)])
    write_table(doubled, str(tmp_path / "one.parquet"))
    with pytest.raises(BenchError, match=r"one\.parquet, row 8, field 'query_id'.*duplicate"):
        bench_stats_report(str(tmp_path / "one.parquet"), batch_rows=4)
    assert "bench: 1 file(s), 7 rows" in bench_stats_report(str(tmp_path / "two" / "a.parquet"),
                                                            batch_rows=2)


@pytest.mark.parametrize("name, content, message", [
    ("garbled.parquet", b"hello", "garbled.parquet: not a readable parquet file"),
    ("blank.jsonl", b"", "blank.jsonl, field 'query_id': missing column(s)"),
])
def test_cli_stats_names_a_garbled_or_empty_file_in_one_line(tmp_path, capsys, name, content,
                                                             message):
    """These were pyarrow tracebacks (a footer too short; concatenating no tables)."""
    (tmp_path / name).write_bytes(content)
    assert main(["bench", "stats", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_stats_of_a_bench_without_rows_prints_an_empty_table(tmp_path, capsys):
    write_table(tiny_bench().slice(0, 0), str(tmp_path / "none.parquet"))
    assert main(["bench", "stats", str(tmp_path / "none.parquet")]) == 0
    assert "1 file(s), 0 rows" in capsys.readouterr().out


@pytest.mark.parametrize("catalog_arg", ["folder", "missing.yaml", "bench.parquet"])
def test_cli_stats_names_a_catalogue_it_cannot_read_in_one_line(tmp_path, capsys, catalog_arg):
    """A folder, a missing file or a binary file given as --catalog: one line naming it, exit 2
    (a folder and a binary file were tracebacks)."""
    bench = tmp_path / "bench.parquet"
    write_table(tiny_bench(), str(bench))
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / catalog_arg)
    assert main(["bench", "stats", str(bench), "--catalog", path]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the catalogue {path}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["bench", "stats", ""], ["bench", "stats", "b.parquet",
                                                           "--catalog", " "]])
def test_cli_refuses_an_empty_text_argument(capsys, argv):
    """An empty --bench read the whole current folder (every .json file below it) as the bench."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "give a value, not an empty string" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """``r2ray bench stats B | head``: the reader gone, printing the table raised BrokenPipeError
    and Python printed its traceback; it exits as a tool whose pipe closed (128 + SIGPIPE)."""
    import signal
    import subprocess
    import sys

    bench = tmp_path / "bench.parquet"
    write_table(tiny_bench(), str(bench))
    child = subprocess.Popen([sys.executable, "-m", "r2ray.cli", "bench", "stats", str(bench)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()   # the reader leaves before a line is printed
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
