"""`r2ray bench convert`: every adapter on its tests/data copy, through the CLI."""

import csv
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from r2ray.bench.formats import ADAPTERS, default_catalog_out
from r2ray.bench.formats.pricing import fit_prices
from r2ray.bench.io import read_bench
from r2ray.catalog import DEFAULT_BUDGET, load_catalog
from r2ray.cli import main
from r2ray.prompting import estimate_tokens

from conftest import TEST_DATA

GRID = [10, 20, 30, 40, 50, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 4000]
PB, RA = TEST_DATA / "paretobandit", TEST_DATA / "routerarena"
FIXTURES = {
    "long": None,  # made from the routerbench output in the test
    "r2bench": [TEST_DATA / "r2bench" / "GLM-4.6.csv", TEST_DATA / "r2bench" / "Qwen3-0.6B.csv"],
    "routerbench": [TEST_DATA / "routerbench" / "routerbench_sample.csv"],
    "paretobandit": [PB / "test_k4.jsonl"],
    "routerarena": [RA / "gemini-2.0-flash-001.jsonl", RA / "claude-3-haiku-20240307.jsonl"],
}


@pytest.fixture
def convert(tmp_path, capsys):
    """Run `r2ray bench convert`; returns (bench, catalogue, summary) or fails with stderr."""
    def run(fmt, inputs, *extra, out="bench.parquet"):
        out_path = tmp_path / out
        code = main(["bench", "convert", "--format", fmt, *map(str, inputs), "--out", str(out_path),
                     *map(str, extra)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return (read_bench(str(out_path)), load_catalog(default_catalog_out(str(out_path))),
                captured.out)
    return run


def test_every_adapter_writes_a_valid_bench_and_its_catalogue(convert, tmp_path):
    assert set(ADAPTERS) == set(FIXTURES)
    for fmt, inputs in FIXTURES.items():
        if inputs is None:
            inputs = [tmp_path / "long_input.jsonl"]
            convert("routerbench", FIXTURES["routerbench"], out="long_input.jsonl")
        bench, catalog, summary = convert(fmt, inputs, out=f"{fmt}.parquet")
        models = set(pc.unique(bench.column("model")).to_pylist())
        assert set(catalog.model_names) == models, fmt
        budgets = set(pc.unique(bench.column("budget")).to_pylist())
        assert set(catalog.budgets) == budgets, fmt
        assert summary.startswith(f"{fmt}: {bench.num_rows} rows"), fmt


def test_paretobandit_rewards_costs_and_tokens(convert):
    bench, catalog, summary = convert("paretobandit", FIXTURES["paretobandit"])
    assert bench.num_rows == 4 * 301 and set(bench.column("budget").to_pylist()) == {0}
    first = json.loads((PB / "test_k4.jsonl").read_text().splitlines()[0])
    rows = {r["model"]: r for r in bench.to_pylist() if r["query"] == first["prompt"]}
    for model, arm in first["arms"].items():
        assert rows[model]["quality"] == arm["reward"] and rows[model]["cost_usd"] == arm["cost"]
        assert rows[model]["category"] == first["source"]
    measured = {r["prompt"]: r for r in map(json.loads, (PB / "flash_token_counts.jsonl")
                                          .read_text().splitlines())}
    flash = rows["google/gemini-2.5-flash"]
    assert (flash["input_tokens"], flash["output_tokens"]) == (
        measured[first["prompt"]]["input_tokens"], measured[first["prompt"]]["output_tokens"])
    llama = rows["meta-llama/llama-3.1-8b-instruct"]  # 0.1 USD/M in and out
    assert llama["input_tokens"] == estimate_tokens(first["prompt"])
    assert llama["output_tokens"] == round(first["arms"]["meta-llama/llama-3.1-8b-instruct"]["cost"]
                                           * 1e6 / 0.1 - llama["input_tokens"])
    pro = catalog.model("google/gemini-2.5-pro")
    assert (pro.input_per_m, pro.output_per_m, pro.context) == (1.25, 10.0, 1048576)
    assert "measured for 300 row(s)" in summary and "904 row(s) backed out" in summary


def test_paretobandit_without_side_files_backs_out_every_row(convert, tmp_path):
    (tmp_path / "pb").mkdir()
    shutil.copy(PB / "test_k4.jsonl", tmp_path / "pb")
    catalog = tmp_path / "prices.yaml"
    models = json.loads((PB / "models_k4.json").read_text())["models"]
    catalog.write_text("budgets: [default]\nmodels:\n" + "".join(
        f"  - {{name: {m['model_id']}, input_per_m: {m['input_cost_per_m']}, "
        f"output_per_m: {m['output_cost_per_m']}, context: 8192}}\n" for m in models))
    bench, found, summary = convert("paretobandit", [tmp_path / "pb" / "test_k4.jsonl"],
                                    "--catalog", catalog)
    assert "measured for 0 row(s) (flash_token_counts.jsonl not found)" in summary
    assert "1204 row(s) backed out" in summary
    assert found.model("google/gemini-2.5-flash").context == 8192
    assert "(--catalog)" in summary


def test_routerarena_default_and_hard_cap_rows(convert):
    bench, catalog, summary = convert("routerarena", FIXTURES["routerarena"])
    assert bench.num_rows == 204 * 2 * (len(GRID) + 1)
    assert catalog.budgets == GRID + [DEFAULT_BUDGET]
    rows = bench.to_pylist()
    default = {(r["query_id"], r["model"]): r for r in rows if r["budget"] == DEFAULT_BUDGET}
    source = json.loads((RA / "gemini-2.0-flash-001.jsonl").read_text().splitlines()[0])
    first = default[(source["global_index"], "gemini-2.0-flash-001")]
    assert first["quality"] == source["evaluation_result"]["score"]
    assert first["cost_usd"] == source["evaluation_result"]["inference_cost"]
    assert first["category"] == "AIME"
    assert default[("NarrativeQA_4102", "claude-3-haiku-20240307")]["quality"] == 0.0  # -0.033
    prices = {"gemini-2.0-flash-001": (0.1, 0.4), "claude-3-haiku-20240307": (0.25, 1.25)}
    for r in rows:
        if r["budget"] == DEFAULT_BUDGET:
            continue
        full = default[(r["query_id"], r["model"])]
        assert r["output_tokens"] == min(full["output_tokens"], r["budget"])
        assert r["truncated"] == (full["output_tokens"] > r["budget"])
        p_in, p_out = prices[r["model"]]
        expected_usd = (r["input_tokens"] * p_in + r["output_tokens"] * p_out) * 1e-6
        assert r["cost_usd"] == pytest.approx(expected_usd)
        if not r["truncated"]:
            assert r["quality"] == full["quality"] and r["response"] == full["response"]
    mean = {b: np.mean([r["quality"] for r in rows if r["budget"] == b]) for b in (10, 4000)}
    assert mean[10] < mean[4000]  # cutting at 10 tokens loses answers
    assert "1 meteor score(s) clipped" in summary and "195/195" in summary


def test_routerbench_blanks_are_missing_and_prices_are_fitted(convert, tmp_path):
    bench, catalog, summary = convert("routerbench", FIXTURES["routerbench"])
    wide = pacsv.read_csv(FIXTURES["routerbench"][0],
                          convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    models = ["gpt-4-1106-preview", "mistralai/mixtral-8x7b-chat", "meta/llama-2-70b-chat"]
    present = sum(wide.num_rows - wide.column(m).null_count for m in models)
    assert bench.num_rows == present < 3 * wide.num_rows
    assert (f"{3 * wide.num_rows - present} (prompt, model) cell(s) with a blank correctness "
            "left out") in summary      # counted, not dropped without a word
    gpt4 = catalog.model("gpt-4-1106-preview")
    assert gpt4.input_per_m == pytest.approx(10.0) and gpt4.output_per_m == pytest.approx(30.0)
    assert "fitted to realised costs" in summary
    row = bench.filter(pc.equal(bench.column("model"), "gpt-4-1106-preview")).to_pylist()[0]
    assert row["output_tokens"] == estimate_tokens(row["response"])
    pq.write_table(wide, tmp_path / "wide.parquet")  # the same table as parquet
    again, _, _ = convert("routerbench", [tmp_path / "wide.parquet"], out="again.parquet")
    assert again.select(["query_id", "model", "quality", "output_tokens"]).equals(
        bench.select(["query_id", "model", "quality", "output_tokens"]))


def test_routerbench_integer_ids_in_a_float_column_keep_their_text(convert, tmp_path):
    """pandas stores an integer column as float64 (as soon as it ever held a NaN): sample_id 3.0
    is query "3", as the same table written as CSV reads, not "3.0"."""
    wide = pacsv.read_csv(FIXTURES["routerbench"][0])
    ids = [float(100 + i) for i in range(wide.num_rows)]
    pq.write_table(wide.set_column(0, "sample_id", pa.array(ids, pa.float64())),
                   tmp_path / "wide.parquet")
    bench, _, _ = convert("routerbench", [tmp_path / "wide.parquet"])
    assert set(bench.column("query_id").to_pylist()) == {str(100 + i)
                                                         for i in range(wide.num_rows)}


@pytest.mark.parametrize("true, false", [("True", "False"), ("true", "false")])
def test_routerbench_csv_correctness_as_booleans(convert, tmp_path, true, false):
    """pandas writes a bool column to CSV as True/False; it reads as 1.0/0.0."""
    records = list(csv.reader(io.StringIO(FIXTURES["routerbench"][0].read_text())))
    models = ["gpt-4-1106-preview", "mistralai/mixtral-8x7b-chat", "meta/llama-2-70b-chat"]
    for column in [records[0].index(m) for m in models]:
        for record in records[1:]:
            record[column] = {"1.0": true, "0.0": false}.get(record[column], record[column])
    path = tmp_path / "rb.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(records)
    bench, _, _ = convert("routerbench", [path])
    plain, _, _ = convert("routerbench", FIXTURES["routerbench"], out="plain.parquet")
    assert bench.column("quality").equals(plain.column("quality"))


def test_paretobandit_null_rewards_are_counted(convert, tmp_path):
    shutil.copytree(PB, tmp_path / "pb")
    path = tmp_path / "pb" / "test_k4.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[4])
    record["arms"]["google/gemini-2.5-pro"]["reward"] = None
    path.write_text("\n".join(lines[:4] + [json.dumps(record)] + lines[5:]) + "\n")
    bench, _, summary = convert("paretobandit", [path])
    assert bench.num_rows == 4 * 301 - 1 and "1 arm(s) with a null reward left out" in summary


def test_r2bench_blank_scores_are_counted(convert, tmp_path):
    records = list(csv.reader(io.StringIO(FIXTURES["r2bench"][0].read_text())))
    records[1][records[0].index("unlimited_score")] = ""
    path = tmp_path / FIXTURES["r2bench"][0].name
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(records)
    bench, _, summary = convert("r2bench", [path])
    plain, _, _ = convert("r2bench", FIXTURES["r2bench"][:1], out="plain.parquet")
    assert bench.num_rows == plain.num_rows - 1
    assert "1 (prompt, budget) cell(s) with a blank score left out" in summary


def test_r2bench_models_from_file_names_or_option(convert, tmp_path):
    bench, catalog, _ = convert("r2bench", FIXTURES["r2bench"])
    assert catalog.model("GLM-4.6").output_per_m == 1.76  # from the default catalogue
    assert bench.num_rows == 2 * 20 * 16 - 8  # Qwen3-0.6B leaves 10 and 20 blank on 4 prompts
    glm = bench.filter(pc.and_(pc.equal(bench.column("model"), "GLM-4.6"),
                               pc.equal(bench.column("budget"), 10))).to_pylist()[0]
    assert (glm["query_id"], glm["category"], glm["output_tokens"]) == ("gsm8k:0", "gsm8k", 10)
    shutil.copy(FIXTURES["r2bench"][0], tmp_path / "run-7.csv")
    renamed, _, _ = convert("r2bench", [tmp_path / "run-7.csv"], "--model", "GLM-4.6",
                            out="renamed.parquet")
    assert renamed.column("model").unique().to_pylist() == ["GLM-4.6"]


def test_long_format_round_trips(convert, tmp_path):
    first, _, _ = convert("routerarena", FIXTURES["routerarena"][:1], out="first.jsonl")
    again, _, _ = convert("long", [tmp_path / "first.jsonl"], out="again.parquet")
    assert again.equals(first)


def test_fit_prices_recovers_prices_and_never_goes_negative():
    rng = np.random.default_rng(0)
    tokens_in, tokens_out = rng.integers(10, 2000, 50), rng.integers(1, 900, 50)
    fit = fit_prices(tokens_in, tokens_out, (tokens_in * 0.5 + tokens_out * 1.5) * 1e-6)
    assert (fit.input_per_m, fit.output_per_m) == (pytest.approx(0.5), pytest.approx(1.5))
    assert fit.median_rel_error < 1e-9
    # cost falling with input tokens would need a negative input price: clipped to 0
    fit = fit_prices(tokens_in, tokens_out, np.maximum(tokens_out * 2e-6 - tokens_in * 1e-7, 0))
    assert fit.input_per_m == 0.0 and fit.output_per_m > 0


def test_default_catalog_out_sits_beside_the_bench():
    assert default_catalog_out("s3://b/x/bench.parquet") == "s3://b/x/bench.catalog.yaml"
    assert default_catalog_out("bench.jsonl") == "bench.catalog.yaml"


def test_a_folder_input_skips_side_files_and_catalog_out_is_honoured(tmp_path, capsys):
    out, catalog_out = tmp_path / "pb.jsonl", tmp_path / "prices" / "pb.yaml"
    code = main(["bench", "convert", "--format", "paretobandit", str(PB), "--out", str(out),
                 "--catalog-out", str(catalog_out)])
    assert code == 0, capsys.readouterr().err
    assert read_bench(str(out)).num_rows == 4 * 301  # flash_token_counts.jsonl is not a bench file
    assert load_catalog(str(catalog_out)).model("google/gemini-2.5-flash").output_per_m == 2.5
    assert not (tmp_path / "pb.catalog.yaml").exists()


def test_fit_prices_shrugs_off_wild_costs_and_flags_them():
    rng = np.random.default_rng(1)
    tokens_in, tokens_out = rng.integers(10, 2000, 200), rng.integers(1, 900, 200)
    cost = (tokens_in * 0.5 + tokens_out * 1.5) * 1e-6
    wild = rng.choice(200, 40, replace=False)  # 20% of the rows
    cost[wild[:10]] = 1e9       # a typo
    cost[wild[10:20]] = 0.0     # a failed call, billed as nothing
    cost[wild[20:30]] *= 100    # cents, not dollars
    cost[wild[30:]] /= 1000     # per thousand calls
    fit = fit_prices(tokens_in, tokens_out, cost)
    assert (fit.input_per_m, fit.output_per_m) == (pytest.approx(0.5), pytest.approx(1.5))
    assert set(np.flatnonzero(fit.outliers)) == set(wild)


def test_a_wild_cost_row_is_reported_and_cleared_not_priced(convert, tmp_path):
    rows = [{"query_id": f"q{i}", "query": "2+2?", "category": "math", "model": "mystery",
             "budget": 0, "input_tokens": 100 + i, "output_tokens": 50 + 3 * i, "quality": 1.0,
             "truncated": None, "cost_usd": ((100 + i) * 1.0 + (50 + 3 * i) * 2.0) * 1e-6}
            for i in range(10)]
    rows[6]["cost_usd"] = 1e9
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench, catalog, summary = convert("long", [tmp_path / "mine.jsonl"])
    mystery = catalog.model("mystery")
    assert (mystery.input_per_m, mystery.output_per_m) == (pytest.approx(1.0), pytest.approx(2.0))
    assert "mine.jsonl row 7" in summary and "1 row(s)" in summary and "10x" in summary
    costs = {r["query_id"]: r["cost_usd"] for r in bench.to_pylist()}
    assert costs["q6"] is None and costs["q5"] == rows[5]["cost_usd"]  # the rest kept as given


def test_routerarena_caps_at_the_budgets_the_catalog_offers_the_model(convert, tmp_path):
    catalog = tmp_path / "mine.yaml"
    catalog.write_text("budgets: [10, 20, default]\nmodels:\n  - {name: gemini-2.0-flash-001, "
                       "input_per_m: 0.1, output_per_m: 0.4, context: 8192, "
                       "budgets: [10, default]}\n")
    bench, found, _ = convert("routerarena", FIXTURES["routerarena"][:1], "--catalog", catalog)
    assert set(bench.column("budget").to_pylist()) == {10, DEFAULT_BUDGET}
    assert found.budgets == [10, DEFAULT_BUDGET]


# ---- review s19/A: valid files the adapters must read ----------------------------------------
def test_jsonl_with_raw_line_separators_inside_strings(convert, tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw in strings; only \\n ends a JSON Lines line."""
    shutil.copytree(RA, tmp_path / "ra")
    path = tmp_path / "ra" / "gemini-2.0-flash-001.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["question"] += "\u2028line two\u2029para\x85next"
    lines[0] = json.dumps(record, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bench, _, _ = convert("routerarena", [path])
    assert record["question"] in bench.column("query").to_pylist()


def test_byte_order_marks_are_dropped(convert, tmp_path):
    """Excel's "CSV UTF-8" and some Windows tools start a file with a BOM."""
    (tmp_path / "r2").mkdir()
    bom_csv = tmp_path / "r2" / "GLM-4.6.csv"
    bom_csv.write_bytes(b"\xef\xbb\xbf" + FIXTURES["r2bench"][0].read_bytes())
    bench, _, _ = convert("r2bench", [bom_csv], out="r2.parquet")
    plain, _, _ = convert("r2bench", FIXTURES["r2bench"][:1], out="plain.parquet")
    assert bench.equals(plain)
    shutil.copytree(PB, tmp_path / "pb")
    bom_jsonl = tmp_path / "pb" / "test_k4.jsonl"
    bom_jsonl.write_bytes(b"\xef\xbb\xbf" + (PB / "test_k4.jsonl").read_bytes())
    bench, _, _ = convert("paretobandit", [bom_jsonl], out="pb.parquet")
    assert bench.num_rows == 4 * 301


@pytest.mark.parametrize("answer", ["N/A", "NA", "null", "NaN", "nan", "NULL"])
def test_csv_text_that_looks_like_a_null_is_kept(convert, tmp_path, answer):
    """Only an empty field is missing: a model may well answer "N/A"."""
    records = list(csv.reader(io.StringIO(FIXTURES["routerbench"][0].read_text())))
    column = records[0].index("gpt-4-1106-preview|model_response")
    records[1][column] = answer
    path = tmp_path / "rb.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(records)
    bench, _, _ = convert("routerbench", [path])
    row = [r for r in bench.to_pylist() if r["query_id"] == records[1][0]
           and r["model"] == "gpt-4-1106-preview"][0]
    assert row["response"] == answer and row["output_tokens"] == estimate_tokens(answer)


# ---- review s22/H: one jsonl line rule for the adapters, the bench reader and the batch job ---
@pytest.mark.parametrize("filler", ["\f", "\u00a0"])
def test_a_line_of_only_a_form_feed_or_nbsp_is_a_bad_row_not_skipped(tmp_path, capsys, filler):
    """JSON whitespace is space, tab, CR and LF only: as the bench reader and the batch job do,
    an adapter refuses such a line, naming it, rather than dropping it unseen."""
    shutil.copytree(RA, tmp_path / "ra")
    path = tmp_path / "ra" / "gemini-2.0-flash-001.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join([lines[0], filler, *lines[1:]]), encoding="utf-8")
    code = main(["bench", "convert", "--format", "routerarena", str(path),
                 "--out", str(tmp_path / "bench.parquet")])
    assert code != 0
    assert f"{path}, row 2: invalid JSON" in capsys.readouterr().err
