"""Bad inputs to `r2ray bench convert`: exit status 2 and a message naming file, row and field."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray.cli import main

from conftest import TEST_DATA

PB, RA, R2 = TEST_DATA / "paretobandit", TEST_DATA / "routerarena", TEST_DATA / "r2bench"
ROUTERBENCH = TEST_DATA / "routerbench" / "routerbench_sample.csv"


@pytest.fixture
def fails(tmp_path, capsys):
    """Run `r2ray bench convert`, expect exit status 2; returns the error message."""
    def run(fmt, inputs, *extra):
        code = main(["bench", "convert", "--format", fmt, *map(str, inputs),
                     "--out", str(tmp_path / "out" / "bench.parquet"), *map(str, extra)])
        captured = capsys.readouterr()
        assert code == 2, captured.out
        assert not (tmp_path / "out" / "bench.parquet").exists()
        return captured.err
    return run


def copy_with(tmp_path, source, edit, name=None):
    """A copy of ``source`` (in a fresh folder, with its side files), its lines passed through
    ``edit``."""
    folder = tmp_path / "in"
    shutil.copytree(source.parent, folder, dirs_exist_ok=True)
    target = folder / (name or source.name)
    lines = source.read_text().splitlines()
    target.write_text("\n".join(edit(lines)) + "\n")
    return target


def edit_json_line(index, change):
    def edit(lines):
        record = json.loads(lines[index])
        change(record)
        return lines[:index] + [json.dumps(record)] + lines[index + 1:]
    return edit


def edit_csv(change):
    """An edit for :func:`copy_with` that rewrites the CSV records [header, row 1, ...]."""
    def edit(lines):
        records = change(list(csv.reader(io.StringIO("\n".join(lines)))))
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(records)
        return out.getvalue().splitlines()
    return edit


def write_long(tmp_path, rows):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def long_row(**change):
    row = {"query_id": "q1", "query": "2+2?", "category": "math", "model": "GLM-4.6",
           "budget": 0, "input_tokens": 4, "output_tokens": 9, "quality": 1.0, "truncated": None}
    return {**row, **change}


# ---- missing column ------------------------------------------------------------------------
def test_missing_column(fails, tmp_path):
    source = R2 / "GLM-4.6.csv"
    drop = source.read_text().splitlines()[0].split(",").index("200_count")
    without_200_count = edit_csv(lambda rows: [r[:drop] + r[drop + 1:] for r in rows])
    err = fails("r2bench", [copy_with(tmp_path, source, without_200_count)])
    assert "GLM-4.6.csv" in err and "field '200_count'" in err and "missing column" in err
    row = long_row()
    del row["quality"]
    err = fails("long", [write_long(tmp_path, [row])])
    assert "mine.jsonl" in err and "field 'quality'" in err and "missing column" in err


# ---- quality outside [0, 1] ------------------------------------------------------------------
def test_quality_outside_unit_interval(fails, tmp_path):
    bad = copy_with(tmp_path, PB / "test_k4.jsonl", edit_json_line(
        2, lambda r: r["arms"]["google/gemini-2.5-pro"].update(reward=1.5)))
    err = fails("paretobandit", [bad])
    assert "test_k4.jsonl, row 3, field 'arms.google/gemini-2.5-pro.reward'" in err
    assert "outside [0.0, 1.0]" in err
    err = fails("long", [write_long(tmp_path, [long_row(), long_row(query_id="q2", quality=-0.1)])])
    assert "mine.jsonl, row 2, field 'quality'" in err
    assert "quality -0.1 is outside [0, 1]" in err and "np.float64" not in err


# ---- negative tokens -------------------------------------------------------------------------
def test_negative_tokens(fails, tmp_path):
    bad = copy_with(tmp_path, RA / "gemini-2.0-flash-001.jsonl", edit_json_line(
        4, lambda r: r["token_usage"].update(output_tokens="-5")))  # values may be strings
    err = fails("routerarena", [bad])
    assert "gemini-2.0-flash-001.jsonl, row 5, field 'token_usage.output_tokens'" in err
    assert "negative" in err
    err = fails("long", [write_long(tmp_path, [long_row(output_tokens=-1)])])
    assert "mine.jsonl, row 1, field 'output_tokens'" in err and "negative" in err


def test_token_count_past_int64_names_the_row(fails, tmp_path):
    """A parquet uint64 count past int64's range is the row's error, not an OverflowError."""
    rows = [long_row(query_id="q1"), long_row(query_id="q2")]
    table = pa.Table.from_pylist(rows).set_column(
        5, "input_tokens", pa.array([4, 2**63 + 5], pa.uint64()))
    pq.write_table(table, tmp_path / "mine.parquet")
    err = fails("long", [tmp_path / "mine.parquet"])
    assert "mine.parquet, row 2, field 'input_tokens'" in err and "cannot read as int64" in err


# ---- duplicate (query, model, budget) --------------------------------------------------------
def test_duplicate_rows_name_the_source_line(fails, tmp_path):
    repeat_line_2 = lambda lines: lines[:4] + [lines[1]] + lines[4:]  # noqa: E731
    bad = copy_with(tmp_path, PB / "test_k4.jsonl", repeat_line_2)
    err = fails("paretobandit", [bad])
    assert "test_k4.jsonl, row 5, field 'query_id'" in err and "duplicate" in err
    err = fails("long", [write_long(tmp_path, [long_row(), long_row(query="again")])])
    assert "mine.jsonl, row 2, field 'query_id'" in err and "duplicate" in err


def test_duplicate_rows_across_files(fails, tmp_path):
    shutil.copy(R2 / "Qwen3-0.6B.csv", tmp_path / "second.csv")
    err = fails("r2bench", [R2 / "Qwen3-0.6B.csv", tmp_path / "second.csv"],
                "--model", "Qwen3-0.6B", "--model", "Qwen3-0.6B")
    assert "second.csv, row 1, field 'query_id'" in err and "duplicate" in err


# ---- unknown model ---------------------------------------------------------------------------
def test_unknown_model_lists_the_known_ones(fails, tmp_path):
    shutil.copy(R2 / "GLM-4.6.csv", tmp_path / "mystery-7b.csv")
    err = fails("r2bench", [tmp_path / "mystery-7b.csv"])
    assert "mystery-7b.csv, row 1, field 'model'" in err and "unknown model 'mystery-7b'" in err
    assert "Qwen3-0.6B" in err and "GLM-4.6" in err and "--catalog" in err
    catalog = tmp_path / "mine.yaml"
    catalog.write_text("budgets: [default]\nmodels:\n"
                       "  - {name: other, input_per_m: 1, output_per_m: 2, context: 4096}\n")
    err = fails("long", [write_long(tmp_path, [long_row()])], "--catalog", catalog)
    assert "mine.jsonl, row 1, field 'model'" in err and "unknown model 'GLM-4.6'" in err
    assert "has only: other" in err


def test_model_counts_must_match_inputs(fails):
    err = fails("r2bench", [R2 / "GLM-4.6.csv", R2 / "Qwen3-0.6B.csv"], "--model", "GLM-4.6")
    assert "--model was given 1 time(s) for 2 input file(s)" in err


# ---- garbled files ---------------------------------------------------------------------------
def test_bad_json_line(fails, tmp_path):
    bad = copy_with(tmp_path, RA / "claude-3-haiku-20240307.jsonl",
                    lambda lines: lines[:1] + [lines[1][:80]] + lines[2:])
    err = fails("routerarena", [bad])
    assert "claude-3-haiku-20240307.jsonl, row 2" in err and "invalid JSON" in err


def test_non_parquet_bytes(fails, tmp_path):
    (tmp_path / "wide.parquet").write_bytes(b"sample_id,prompt\nnot,parquet\n")
    err = fails("routerbench", [tmp_path / "wide.parquet"])
    assert "wide.parquet" in err and "not a readable parquet file" in err


def test_truncated_csv(fails, tmp_path):
    text = (R2 / "Qwen3-0.6B.csv").read_text()
    (tmp_path / "Qwen3-0.6B.csv").write_text(text[: len(text) - 150])  # cut in the last record
    err = fails("r2bench", [tmp_path / "Qwen3-0.6B.csv"])
    assert "Qwen3-0.6B.csv, row 20" in err and "truncated or garbled CSV" in err


def test_routerbench_score_without_response(fails, tmp_path):
    def blank_response(rows):
        rows[3][rows[0].index("gpt-4-1106-preview|model_response")] = ""
        return rows

    err = fails("routerbench", [copy_with(tmp_path, ROUTERBENCH, edit_csv(blank_response))])
    assert "routerbench_sample.csv, row 3, field 'gpt-4-1106-preview|model_response'" in err


def test_routerarena_unknown_metric(fails, tmp_path):
    bad = copy_with(tmp_path, RA / "gemini-2.0-flash-001.jsonl", edit_json_line(
        0, lambda r: r["evaluation_result"].update(metric="bleu")))
    err = fails("routerarena", [bad])
    assert "row 1, field 'evaluation_result.metric'" in err and "unknown metric 'bleu'" in err


def test_the_installed_command_exits_non_zero(tmp_path):
    bad = copy_with(tmp_path, PB / "test_k4.jsonl", lambda lines: lines[:2] + ["{not json"])
    command = [str(Path(sys.executable).parent / "r2ray"), "bench", "convert",
               "--format", "paretobandit", str(bad), "--out", str(tmp_path / "x.parquet")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "test_k4.jsonl, row 3: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


# ---- hostile costs, budgets and output names (issue 9, items 9 and 10) ------------------------
def test_budget_the_catalog_does_not_offer_names_the_row(fails, tmp_path):
    catalog = tmp_path / "mine.yaml"
    catalog.write_text("budgets: [10, default]\nmodels:\n"
                       "  - {name: GLM-4.6, input_per_m: 1, output_per_m: 2, context: 4096}\n"
                       "  - {name: small, input_per_m: 1, output_per_m: 2, context: 4096, "
                       "budgets: [default]}\n")
    rows = [long_row(), long_row(budget=10), long_row(budget=77)]
    err = fails("long", [write_long(tmp_path, rows)], "--catalog", catalog)
    assert "mine.jsonl, row 3, field 'budget'" in err and "77" in err and "10, default" in err
    rows = [long_row(model="small"), long_row(model="small", budget=10)]  # its own list
    err = fails("long", [write_long(tmp_path, rows)], "--catalog", catalog)
    assert "mine.jsonl, row 2, field 'budget'" in err and "'small'" in err


def test_read_bench_names_the_file_and_line_of_a_budget_the_catalog_does_not_offer(tmp_path):
    """read_bench (train, evaluate) refuses an arm the catalogue lacks at its file and line; it
    passed, and the pivot after it named a row of all files joined (here row 3), in no file."""
    from r2ray.bench.io import read_bench
    from r2ray.bench.schema import BenchError
    from r2ray.catalog import load_catalog

    (tmp_path / "a.jsonl").write_text(json.dumps(long_row()) + "\n")
    (tmp_path / "b.jsonl").write_text("\n\n" + json.dumps(long_row(query_id="q2")) + "\n"
                                      + json.dumps(long_row(query_id="q3", budget=77)) + "\n")
    with pytest.raises(BenchError, match=r"b\.jsonl, row 4, field 'budget': model 'GLM-4\.6' "
                                         r"offers no budget 77; it offers \['10', '20'"):
        read_bench(str(tmp_path), load_catalog())


def test_read_bench_names_the_file_and_line_of_a_row_repeated_across_files(tmp_path):
    """A repeat across files is named in the file that repeats it, at its line (as
    `r2ray bench stats` names it), not at a row of the files joined ("bench (all files)")."""
    from r2ray.bench.io import read_bench
    from r2ray.bench.schema import BenchError

    (tmp_path / "a.jsonl").write_text(json.dumps(long_row()) + "\n")
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(long_row(query_id="q2")) + "\n"
                                      + json.dumps(long_row(quality=0.0)) + "\n")
    with pytest.raises(BenchError, match=r"b\.jsonl, row 3, field 'query_id': duplicate "
                                         r"\(query_id, model, budget\) = \('q1', 'GLM-4\.6', 0\)"):
        read_bench(str(tmp_path))


def test_a_bench_read_with_an_infinite_cost_names_the_row():
    """read_bench's check, not only the converters': a bench written by another tool with an
    infinite realised cost would pass into statistics and pricing fits."""
    import pyarrow as pa

    from r2ray.bench.schema import BenchError, validate_bench

    rows = [long_row(query_id=f"q{i}", cost_usd=2e-5) for i in range(3)]
    rows[2]["cost_usd"] = float("inf")   # -inf: refused as negative
    with pytest.raises(BenchError, match=r"row 3.*cost_usd.*not a finite number"):
        validate_bench(pa.Table.from_pylist(rows), "other.parquet")


@pytest.mark.parametrize("cost", [float("inf"), float("nan")])
def test_non_finite_cost_names_the_row(fails, tmp_path, cost):
    rows = [long_row(query_id=f"q{i}", cost_usd=2e-5) for i in range(3)]
    rows[1]["cost_usd"] = cost
    err = fails("long", [write_long(tmp_path, rows)])
    assert "mine.jsonl, row 2, field 'cost_usd'" in err and "not a finite number" in err


def test_implausible_fitted_price_is_refused(fails, tmp_path):
    # costs in cents and per thousand rows: 4 + 9 tokens cost 2 USD, ~150,000 USD per M tokens
    rows = [long_row(query_id=f"q{i}", model="mystery", cost_usd=2.0) for i in range(5)]
    err = fails("long", [write_long(tmp_path, rows)])
    assert "mine.jsonl" in err and "'mystery'" in err and "implausible" in err
    assert "field 'cost_usd'" in err


@pytest.mark.parametrize("out", ["bench", "bench.json", "bench.csv", "bench.PARQUET"])
def test_convert_output_names_must_be_readable(tmp_path, capsys, out):
    code = main(["bench", "convert", "--format", "long", str(write_long(tmp_path, [long_row()])),
                 "--out", str(tmp_path / out)])
    assert code == 2 and "name a .parquet or .jsonl file" in capsys.readouterr().err
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("argv", [
    ["bench", "convert", "--format", "long", "IN", "--out", "FOLDER"],
    ["bench", "convert", "--format", "long", "IN", "--out", "OUT", "--catalog-out", "FOLDER"],
    ["bench", "synth", "--queries", "3", "--backlog", "FOLDER"]])
def test_an_output_file_named_by_a_folder_is_refused_up_front(tmp_path, capsys, argv):
    """A folder at an output's name was an IsADirectoryError traceback from the final rename,
    after the work was done; it is refused first, naming the option."""
    folder = tmp_path / "part.parquet"
    folder.mkdir()
    given = {"IN": str(write_long(tmp_path, [long_row()])), "OUT": str(tmp_path / "b.parquet"),
             "FOLDER": str(folder)}
    code = main([given.get(arg, arg) for arg in argv])
    option = argv[argv.index("FOLDER") - 1]
    assert code == 2 and f"{option} {folder} is a folder" in capsys.readouterr().err
    assert not (tmp_path / "b.parquet").exists()


# ---- review s19/A: empty inputs, nulls read as text, repeated headers, huge numbers ------------
def test_an_input_with_no_rows_is_an_error_naming_it(fails, tmp_path):
    header_only = copy_with(tmp_path, R2 / "GLM-4.6.csv", lambda lines: lines[:1])
    err = fails("r2bench", [header_only])
    assert "GLM-4.6.csv: no bench rows" in err and "catalogue" not in err
    empty = copy_with(tmp_path, PB / "test_k4.jsonl", lambda lines: [])
    err = fails("paretobandit", [empty])
    assert "test_k4.jsonl: no bench rows" in err
    (tmp_path / "second").mkdir()  # one empty file among good ones is not silently skipped
    (tmp_path / "second" / "Qwen3-0.6B.csv").write_text(
        (R2 / "Qwen3-0.6B.csv").read_text().splitlines()[0] + "\n")
    err = fails("r2bench", [R2 / "GLM-4.6.csv", tmp_path / "second" / "Qwen3-0.6B.csv"])
    assert "Qwen3-0.6B.csv: no bench rows" in err


@pytest.mark.parametrize("field", ["global_index", "generated_answer"])
def test_routerarena_null_is_not_the_text_none(fails, tmp_path, field):
    bad = copy_with(tmp_path, RA / "gemini-2.0-flash-001.jsonl", edit_json_line(
        1, lambda r: r.update({field: None})))
    err = fails("routerarena", [bad])
    assert f"gemini-2.0-flash-001.jsonl, row 2, field '{field}'" in err and "None" in err


def test_repeated_csv_header_names_the_column(fails, tmp_path):
    repeat_prompt = edit_csv(lambda rows: [r + [r[1]] for r in rows])
    err = fails("routerbench", [copy_with(tmp_path, ROUTERBENCH, repeat_prompt)])
    assert "routerbench_sample.csv, field 'prompt'" in err and "more than once" in err


def test_integer_beyond_float64_is_not_a_crash(fails, tmp_path):
    bad = copy_with(tmp_path, RA / "gemini-2.0-flash-001.jsonl", edit_json_line(
        2, lambda r: r["token_usage"].update(output_tokens=10 ** 400)))
    err = fails("routerarena", [bad])
    assert "row 3, field 'token_usage.output_tokens'" in err and "not a number" in err


@pytest.mark.parametrize("tokens", ["1_000", "1_0.5", "\u0663", "\uff11", "0x10", "1,5"])
def test_numbers_python_reads_but_a_file_does_not_mean(fails, tmp_path, tokens):
    """float() takes digit separators and non-ASCII digits: "1_000" is not a CSV number."""
    def set_count(rows):
        rows[2][rows[0].index("unlimited_count")] = tokens
        return rows

    err = fails("r2bench", [copy_with(tmp_path, R2 / "GLM-4.6.csv", edit_csv(set_count))])
    assert "GLM-4.6.csv, row 2, field 'unlimited_count'" in err and "not a number" in err


def test_long_jsonl_field_of_another_json_kind_names_its_line(fails, tmp_path):
    """A quality "0.5" under numbers: pyarrow's own message names its row in a block, 0-based,
    blank lines skipped (here "row 2"); the error names the line and the field."""
    from r2ray.bench.io import read_bench
    from r2ray.bench.schema import BenchError

    lines = ["", json.dumps(long_row()), "", json.dumps(long_row(query_id="q2", truncated=False)),
             json.dumps(long_row(query_id="q3", quality="0.5"))]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = r"mine\.jsonl, row 5, field 'quality': a JSON string where the rows before hold a number"
    with pytest.raises(BenchError, match=message):
        read_bench(str(path))
    assert "mine.jsonl, row 5, field 'quality'" in fails("long", [path])


def test_long_jsonl_bad_line_after_a_raw_line_separator(fails, tmp_path):
    """A raw U+2028 inside a string does not end a line: the broken line is the one named."""
    good = json.dumps(long_row(query="a\u2028b"), ensure_ascii=False)
    (tmp_path / "mine.jsonl").write_text(good + "\n" + json.dumps(long_row(query_id="q2")) + "\n"
                                         + '{"query_id": "q3",\n', encoding="utf-8")
    err = fails("long", [tmp_path / "mine.jsonl"])
    assert "mine.jsonl, row 3: invalid JSON" in err


def test_long_jsonl_bad_line_after_a_byte_order_mark(fails, tmp_path):
    """A leading BOM is not part of line 1 (pyarrow skips it): the broken line is the one named."""
    lines = [json.dumps(long_row(query_id="q1")), json.dumps(long_row(query_id="q2")),
             '{"query_id": "q3",']
    (tmp_path / "mine.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    err = fails("long", [tmp_path / "mine.jsonl"])
    assert "mine.jsonl, row 3: invalid JSON" in err


def test_long_jsonl_line_of_a_form_feed_is_the_line_named(fails, tmp_path):
    """pyarrow refuses a line of a form feed (or a no-break space) that Python's strip() calls
    blank: the locator looked past it and the message named pyarrow's own row count instead."""
    lines = [json.dumps(long_row(query_id="q1")), json.dumps(long_row(query_id="q2")), "\x0c",
             json.dumps(long_row(query_id="q3"))]
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    err = fails("long", [tmp_path / "mine.jsonl"])
    assert "mine.jsonl, row 3: invalid JSON" in err


def test_paretobandit_arm_without_a_reward_is_an_error(fails, tmp_path):
    """A renamed key would otherwise drop the model's rows without a word."""
    bad = copy_with(tmp_path, PB / "test_k4.jsonl", edit_json_line(
        4, lambda r: r["arms"]["google/gemini-2.5-pro"].pop("reward")))
    err = fails("paretobandit", [bad])
    assert "test_k4.jsonl, row 5, field 'arms.google/gemini-2.5-pro.reward': is missing" in err


def test_long_jsonl_bad_row_after_a_blank_line_names_its_line(fails, tmp_path):
    """pyarrow skips a blank line, so the bad row is table row 2 but line 4 of the file: the
    error names the line, in `bench convert` and in read_bench (train, evaluate) alike."""
    from r2ray.bench.io import read_bench
    from r2ray.bench.schema import BenchError

    lines = [json.dumps(long_row()), "", "  \t", json.dumps(long_row(query_id="q2", quality=7.0))]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert "mine.jsonl, row 4, field 'quality'" in fails("long", [path])
    with pytest.raises(BenchError, match=r"mine\.jsonl, row 4, field 'quality'"):
        read_bench(str(path))
    # two rows on one line (pyarrow reads both): the bad one after them is on line 2
    path.write_text(json.dumps(long_row()) + " " + json.dumps(long_row(query_id="q2")) + "\n"
                    + json.dumps(long_row(query_id="q3", quality=7.0)) + "\n")
    assert "mine.jsonl, row 2, field 'quality'" in fails("long", [path])


def test_routerbench_jsonl_bad_row_after_a_blank_line_names_its_line(fails, tmp_path):
    import pyarrow.csv as pacsv

    rows = pacsv.read_csv(ROUTERBENCH).to_pylist()
    rows[1]["gpt-4-1106-preview"] = 2.0   # correctness outside [0, 1], on line 3 below
    lines = [json.dumps(rows[0]), "", *map(json.dumps, rows[1:])]
    (tmp_path / "rb.jsonl").write_text("\n".join(lines) + "\n")
    err = fails("routerbench", [tmp_path / "rb.jsonl"])
    assert "rb.jsonl, row 3, field 'gpt-4-1106-preview'" in err and "outside" in err


def test_routerbench_sample_id_that_is_not_a_whole_number_is_an_error(fails, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wide = pacsv.read_csv(ROUTERBENCH)
    ids = pa.array([2.5 if i == 2 else float(i) for i in range(wide.num_rows)])
    pq.write_table(wide.set_column(0, "sample_id", ids), tmp_path / "rb.parquet")
    err = fails("routerbench", [tmp_path / "rb.parquet"])
    assert "rb.parquet, row 3, field 'sample_id'" in err and "whole number" in err and "2.5" in err
