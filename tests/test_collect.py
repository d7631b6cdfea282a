"""``r2ray bench collect`` against the fault-injecting stub: graders, arms, judge, spend, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from r2ray.bench.io import read_bench
from r2ray.bench.schema import BenchError
from r2ray.catalog import load_catalog
from r2ray.cli import main
from r2ray.execution import graders
from r2ray.execution.collect import assign_arms, read_queries
from r2ray.execution.stub import StubServer
from r2ray.predictor.data import bench_arrays
from r2ray.prompting import estimate_tokens

REPO = Path(__file__).resolve().parents[1]


def write_catalog(path: Path, url: str, judge: bool = False) -> str:
    models = [{"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
               "endpoint": url, "max_output_tokens": 24},
              {"name": "large", "input_per_m": 10.0, "output_per_m": 30.0, "context": 4096,
               "endpoint": url, "max_output_tokens": 24}]
    path.write_text(yaml.safe_dump({"budgets": [4, 12, "default"], "models": models}))
    if judge:
        Path(str(path) + ".judge.yaml").write_text(yaml.safe_dump({"budgets": ["default"], "models": [
            {"name": "judge", "input_per_m": 0.5, "output_per_m": 1.0, "context": 8192,
             "endpoint": url}]}))
    return str(path)


def write_queries(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


QUERIES = [
    {"query_id": "add", "query": "What is 2+3? [say:5]", "reference": "5", "grader": "numeric",
     "category": "math"},
    {"query_id": "half", "query": "Half of 1? [say:0.5]", "reference": "1/2", "grader": "math",
     "category": "math"},
    {"query_id": "wrong", "query": "What is 6*7? [say:The answer is 41]", "reference": "42",
     "grader": "numeric", "category": "math"},
    {"query_id": "mc", "query": "Pick the fruit: A) car B) apple [say:Answer: B]",
     "reference": "B", "grader": "choice", "category": "mc"},
    {"query_id": "city", "query": "Capital of France? [say:Paris.]", "reference": "paris",
     "category": "facts"},
    {"query_id": "long", "query": "Count. [say:" + " ".join(map(str, range(40))) + "]",
     "reference": "0", "grader": "exact", "category": "facts"},
]


# ---- pure ----------------------------------------------------------------------------------------
def test_graders():
    assert graders.grade("exact", "Paris.", "paris") == 1.0
    assert graders.grade("exact", "I think so.\nAnswer: Paris", "Paris") == 1.0
    assert graders.grade("exact", "Lyon", "Paris") == 0.0
    assert graders.grade("choice", "Answer: B", "B") == 1.0
    assert graders.grade("choice", "(C) is right", "(C)") == 1.0
    assert graders.grade("choice", "A) car\n\nThe correct answer is D) chair.", "B") == 0.0
    assert graders.grade("numeric", "17 + 25 = 42", "42") == 1.0
    assert graders.grade("numeric", "It is 0.5", "1/2") == 1.0
    assert graders.grade("math", "$\\frac{3}{4}$", "0.75") == 1.0
    assert graders.grade("numeric", "41", "42") == 0.0
    assert graders.grade("numeric", "no idea", "42") == 0.0
    assert graders.parse_judge_score("Score: 0.75") == 0.75
    assert graders.parse_judge_score(" 1 ") == 1.0
    assert graders.parse_judge_score("Score: 7") is None and graders.parse_judge_score("good") is None
    assert graders.agreement([1.0, 0.2, 0.9], [1.0, 1.0, 1.0]) == {
        "rows": 3, "agreement": 0.6667, "mean_abs_diff": 0.3}
    with pytest.raises(graders.GraderError, match="unknown grader"):
        graders.grade("fuzzy", "a", "b")


def test_arms_are_dealt_evenly():
    dealt = assign_arms(n_queries=10, n_arms=6, k=2, seed=3)
    assert all(len(set(arms)) == 2 for arms in dealt)
    counts = Counter(a for arms in dealt for a in arms)
    assert set(counts) == set(range(6)) and max(counts.values()) - min(counts.values()) <= 1


def test_bad_queries_name_row_and_field(tmp_path):
    bad = write_queries(tmp_path / "q.jsonl", [{"query_id": "a", "query": "x", "grader": "exact"}])
    with pytest.raises(BenchError, match=r"row 1, field 'reference'"):
        read_queries(bad, None, judge=False)
    dup = write_queries(tmp_path / "d.jsonl", [{"query_id": "a", "query": "x", "reference": "1"}] * 2)
    with pytest.raises(BenchError, match=r"row 2, field 'query_id': duplicate"):
        read_queries(dup, None, judge=False)
    judge = write_queries(tmp_path / "j.jsonl", [{"query_id": "a", "query": "x", "grader": "judge"}])
    with pytest.raises(BenchError, match="needs --judge-model"):
        read_queries(judge, None, judge=False)
    for reference in ("", "  ", "?"):   # an empty answer would grade 1.0 against these
        empty = write_queries(tmp_path / "e.jsonl",
                              [{"query_id": "a", "query": "x", "reference": reference}])
        with pytest.raises(BenchError, match=r"row 1, field 'reference'.*not empty"):
            read_queries(empty, None, judge=False)


@pytest.mark.parametrize("query", [{"text": "x"}, 7])
def test_a_query_that_is_not_text_is_refused_at_the_boundary(tmp_path, capsys, query):
    """A struct or number in `query` was an AttributeError traceback from the token estimate of
    ``--dry-run``; it is an error naming the row and field, exit 2."""
    catalog = write_catalog(tmp_path / "pool.yaml", "http://127.0.0.1:9/v1")
    queries = write_queries(tmp_path / "q.jsonl", [{"query_id": "a", "query": query,
                                                    "reference": "1"}])
    assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                 str(tmp_path / "bench.parquet"), "--executor", "local", "--dry-run"]) == 2
    assert "row 1, field 'query': is " in capsys.readouterr().err


# ---- against the stub --------------------------------------------------------------------------------
def test_collect_grades_every_arm(tmp_path, capsys):
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl",
                                QUERIES + [{"query_id": "broken", "query": "[fault:400]",
                                            "reference": "1"}])
        out = tmp_path / "bench.parquet"
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(out), "--executor", "local", "--dry-run"]) == 0
        assert "42 answer calls to make" in capsys.readouterr().out
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(out), "--executor", "local", "--max-attempts", "2"]) == 0
    printed = capsys.readouterr().out
    bench = read_bench(str(out)).to_pylist()
    assert len(bench) == 36                          # 6 queries × 2 models × 3 budgets
    quality = {(r["query_id"], r["model"], r["budget"]): r["quality"] for r in bench}
    for arm in [("small", 4), ("large", 12), ("large", 0)]:
        assert quality[("add", *arm)] == quality[("half", *arm)] == quality[("mc", *arm)] == 1.0
        assert quality[("city", *arm)] == 1.0 and quality[("wrong", *arm)] == 0.0
    long = {(r["model"], r["budget"]): r for r in bench if r["query_id"] == "long"}
    assert long[("small", 4)]["truncated"] and long[("small", 4)]["output_tokens"] == 12  # 4 + 8
    assert long[("small", 12)]["output_tokens"] == 20 and long[("small", 0)]["output_tokens"] == 24
    sent = {(r["query_id"], r["model"], r["budget"]): r["input_tokens"]   # the API's count
            for r in pq.read_table(tmp_path / "bench.work" / "answers" / "parts").to_pylist()}
    for r in bench:
        price_in, price_out = (1e-6, 2e-6) if r["model"] == "small" else (10e-6, 30e-6)
        assert r["cost_usd"] == pytest.approx(sent[(r["query_id"], r["model"], r["budget"])]
                                              * price_in + r["output_tokens"] * price_out)
    assert not any(r["query_id"] == "broken" for r in bench)   # a failure is no quality-0 row
    work = tmp_path / "bench.work"
    failures = pq.read_table(work / "answers" / "failures").to_pylist()
    assert len(failures) == 6 and all("HTTP 400" in f["error"] for f in failures)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["counts"]["bench_rows"] == 36 and manifest["spend"]["total_usd"] > 0
    assert (tmp_path / "bench.catalog.yaml").exists()
    assert "calls/s" in printed and "failures" in printed


def test_input_tokens_are_the_querys_own_on_every_arm(tmp_path):
    """A row's input_tokens is the query's own prompt as routing estimates it, not the API's count
    of the prompt sent (instruction included, per arm): ĉ adds the instruction itself, so that
    count priced it twice, and bench_arrays read whichever arm's row came first."""
    query = "Capital of France, the country in Europe? [say:Paris is the capital.]"
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl", [{"query_id": "city", "query": query,
                                                        "reference": "paris"}])
        out = tmp_path / "bench.parquet"
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(out), "--executor", "local"]) == 0
    bench = read_bench(str(out))
    assert set(bench.column("input_tokens").to_pylist()) == {estimate_tokens(query)}
    pool = load_catalog(catalog)
    reversed_rows = bench.take(pa.array(range(bench.num_rows - 1, -1, -1)))
    arrays = [bench_arrays(table, pool) for table in (bench, reversed_rows)]
    assert arrays[0].input_tokens.tolist() == arrays[1].input_tokens.tolist() \
        == [estimate_tokens(query)]


def test_collect_with_a_judge_and_k_arms(tmp_path):
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url, judge=True)
        rows = QUERIES[:4] + [{"query_id": "essay", "query": "Why? [say:because]",
                               "grader": "judge"}]
        queries = write_queries(tmp_path / "q.jsonl", rows)
        out = tmp_path / "bench.jsonl"
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(out), "--executor", "local", "--arms", "2", "--judge-model", "judge",
                     "--judge-catalog", catalog + ".judge.yaml"]) == 0
    bench = read_bench(str(out)).to_pylist()
    assert len(bench) == 10 and Counter(r["query_id"] for r in bench) == Counter(
        {q["query_id"]: 2 for q in rows})
    assert all(r["quality"] == 0.5 for r in bench if r["query_id"] == "essay")
    manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
    judge_calls = [c for c in stub.calls if c["model"] == "judge"]
    assert len(judge_calls) == 10
    assert manifest["judge_agreement"]["rows"] == 8 and manifest["counts"]["judge_unscored"] == 0
    # the stub judge looks for the reference's text: it fails "0.5" against "1/2", math-verify
    # does not — 2 of the 8 referenced rows disagree
    assert manifest["judge_agreement"]["agreement"] == 0.75
    assert manifest["spend"]["total_usd"] == pytest.approx(
        manifest["answers"]["spend"]["realised_usd"] + manifest["judge"]["spend"]["realised_usd"])


def test_kill_mid_collection_then_resume(tmp_path):
    """SIGKILL while parts are being written; the rerun sends only what is missing."""
    n = 30
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl", [
            {"query_id": f"q{i}", "query": f"{i}+0? [say:{i}] [slow:0.05]", "reference": str(i),
             "grader": "numeric"} for i in range(n)])
        out = tmp_path / "bench.parquet"
        args = ["bench", "collect", "--queries", queries, "--catalog", catalog, "--out", str(out),
                "--executor", "local", "--batch-rows", "4"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        child = subprocess.Popen([sys.executable, "-m", "r2ray.cli", *args], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parts = tmp_path / "bench.work" / "answers" / "parts"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(parts.glob("*.parquet"))) < 5:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        done_before = len(list(parts.glob("*.parquet")))
        assert 5 <= done_before < n * 6 / 4, "the kill came too late to test a resume"
        assert not out.exists() and not (tmp_path / "bench.work" / "manifest.json").exists()
        time.sleep(0.5)   # the killed batch's calls still being answered land in the log first
        sent_before = len(stub.answered())
        assert main(args) == 0
        sent_after = len(stub.answered()) - sent_before
    bench = read_bench(str(out))   # validates (query_id, model, budget) unique
    assert bench.num_rows == n * 6
    assert sent_after <= n * 6 - 4 * done_before       # done parts were not sent again
    assert sent_before + sent_after <= n * 6 + 4       # at most one killed batch was sent twice
    manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
    assert manifest["answers"]["duplicates_dropped"] == 0
    assert manifest["answers"]["calls_done_before"] == 4 * done_before


def test_spend_cap_through_the_cli(tmp_path, capsys):
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl", QUERIES)
        out = tmp_path / "bench.parquet"
        cap = 0.0005
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(out), "--executor", "local", "--max-spend-usd", str(cap)]) == 0
    manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
    assert 0 < manifest["spend"]["total_usd"] <= cap
    assert manifest["answers"]["failure_reasons"] == {
        "spend cap: issuing it could pass --max-spend-usd": 36 - manifest["counts"]["bench_rows"]}
    assert manifest["counts"]["bench_rows"] < 36


def test_a_collect_that_graded_nothing_says_why(tmp_path, capsys):
    """A cap of $0 issues no call: the error was 'missing column(s) [query_id, ...]' from
    validating an empty table; it says what happened to the answers and keeps the work folder."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl", QUERIES)
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(tmp_path / "bench.parquet"), "--executor", "local",
                     "--max-spend-usd", "0"]) != 0
    err = capsys.readouterr().err
    assert ("no bench row to write: of 36 answer request(s), 0 were answered (0 of them without "
            "a grade) and 36 failed (36 spend cap: issuing it could pass --max-spend-usd)") in err
    assert "missing column" not in err
    assert not (tmp_path / "bench.parquet").exists()
    assert (tmp_path / "bench.work").is_dir()


@pytest.mark.parametrize("cap", ["nan", "inf", "-1"])
def test_a_spend_cap_that_is_no_amount_is_refused(tmp_path, capsys, cap):
    """--max-spend-usd nan was taken, and the cap let every call through (36 calls, $0.0071)."""
    assert main(["bench", "collect", "--queries", "q.jsonl", "--catalog", "pool.yaml", "--out",
                 str(tmp_path / "bench.parquet"), "--max-spend-usd", cap]) != 0
    assert f"--max-spend-usd {float(cap)}: give a finite, non-negative amount (USD)" in \
        capsys.readouterr().err
    assert not (tmp_path / "bench.work").exists()



@pytest.mark.parametrize("flag, value, message", [
    ("--timeout-s", "nan", "--timeout-s nan: give a finite number of seconds above 0"),
    ("--timeout-s", "0", "--timeout-s 0.0: give a finite number of seconds above 0"),
    ("--workers", "-3", "--workers -3: give a whole number of at least 1"),
    ("--batch-rows", "0", "--batch-rows 0: give a whole number of at least 1"),
    ("--max-attempts", "0", "--max-attempts 0: give a whole number of at least 1"),
])
def test_engine_flags_out_of_range_are_refused(tmp_path, capsys, flag, value, message):
    """--timeout-s nan was an anyio traceback and 0 timed every call out; a count below 1 was
    quietly taken as 1."""
    assert main(["bench", "collect", "--queries", "q.jsonl", "--catalog", "pool.yaml", "--out",
                 str(tmp_path / "bench.parquet"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.work").exists()

# ---- graders: signs, the article "a", scores out of ten (a review, 2026-12-05) ----------------
def test_exact_keeps_the_sign():
    # before the fix: 1.0 — normalise() strips "-" as punctuation, so "5" matches reference "-5"
    assert graders.grade("exact", "5", "-5") == 0.0
    assert graders.grade("exact", "-5", "5") == 0.0
    assert graders.grade("exact", "The answer is -5.", "-5") == 1.0
    assert graders.grade("exact", "Paris.", "paris") == 1.0


def test_choice_ignores_the_article_a():
    # before the fix: "A" — the IGNORECASE pattern took the article "a" after "answer is" as the
    # option A
    assert graders.choice_letter("The answer is a bit unclear, but it is (B)") != "A"
    assert graders.grade("choice", "My answer is a guess: B", "A") == 0.0
    assert graders.grade("choice", "Answer: b)", "B") == 1.0       # a lowercase option still counts
    assert graders.grade("choice", "the answer is c.", "C") == 1.0


def test_judge_score_out_of_ten_is_not_full_marks():
    # before the fix: 1.0 for "Score: 1/10" and "Score: 10" — the regex reads the leading "1"
    assert graders.parse_judge_score("Score: 1/10") is None
    assert graders.parse_judge_score("Score: 10") is None
    assert graders.parse_judge_score("Score: 0.75") == 0.75
    assert graders.parse_judge_score("Score: 1") == 1.0
    assert graders.parse_judge_score("Score: **0.5**") == 0.5


# ---- graders: a second review (2026-12-06) ---------------------------------------------------
@pytest.mark.parametrize("reply, score", [
    ("Score: 1 out of 10", None), ("Score: 1 / 10", None), ("Score: 0,5", None),
    ("Score: 1e-1", None), ("Score: 0.8 out of 1", 0.8), ('{"score": 0.8}', 0.8),
    ("Score: 1.", 1.0)])
def test_judge_score_in_words_decimal_comma_and_json(reply, score):
    # before the fix: "1 out of 10" -> 1.0 (full marks for 1/10), "0,5" -> 0.0, JSON -> None
    assert graders.parse_judge_score(reply) == score


def test_choice_reads_the_letter_finally_stated():
    # before the fix: A (the first "answer"), I (the pronoun), and None for the rest
    assert graders.choice_letter("To find the answer: A is wrong, it ignores friction. "
                                 "Answer: C") == "C"
    assert graders.choice_letter("The answer is A? No wait, the answer is C.") == "C"
    assert graders.choice_letter("Answer: I think it is B") != "I"
    assert graders.choice_letter("Answer: I'd say C") != "I"
    assert graders.choice_letter("The answer is: J") == "J"
    assert graders.choice_letter("**B**\n\nBecause Paris is the capital.") == "B"
    assert graders.choice_letter("so $\\boxed{\\text{B}}$") == "B"
    assert graders.grade("choice", "b", "B") == 1.0
    assert graders.choice_letter("Answer: I") == "I"                  # option I still counts
    assert graders.choice_letter("Answer: I. It is the only one.") == "I"


@pytest.mark.parametrize("grader, response, reference, grade", [
    ("numeric", "4.2e1", "42", 1.0), ("numeric", "c is about 3e8 m/s", "300000000", 1.0),
    ("numeric", "1.5E-3", "0.0015", 1.0), ("numeric", "The answer is ４２.", "42", 1.0),
    ("numeric", "4.2e1", "4.2", 0.0), ("exact", "４２", "42", 1.0),
    ("exact", "\ufb01sh", "fish", 1.0), ("exact", "cafe\u0301", "caf\u00e9", 1.0),
    ("exact", "４３", "42", 0.0)])
def test_e_notation_and_unicode_forms(grader, response, reference, grade):
    # before the fix: 0.0 — math-verify reads "4.2e1" as 4.2 and no number in "４２"; exact
    # compared full-width digits, a ligature and a decomposed accent as other text
    assert graders.grade(grader, response, reference) == grade


@pytest.mark.parametrize("grader, response, reference, grade", [
    ("numeric", "\u22125", "-5", 1.0), ("numeric", "Answer: \u22123", "-3", 1.0),
    ("numeric", "-5", "\u22125", 1.0), ("numeric", "\u22125", "5", 0.0),
    ("exact", "\u22125", "-5", 1.0), ("exact", "\u22125", "5", 0.0),
    ("math", "\\dfrac{3}{4}", "3/4", 1.0), ("math", "$\\frac{3}{4}$", "\\dfrac{3}{4}", 1.0),
    ("math", "\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0), ("math", "\\sqrt{3}", "\\sqrt{2}", 0.0),
    ("math", "The answer is $\\frac{3}{5}$", "\\dfrac{3}{4}", 0.0)])
def test_unicode_minus_and_bare_latex(grader, response, reference, grade):
    # before the fix: a right answer scored 0.0 — math-verify finds no number in "\u22125" (the
    # minus sign), NFKC keeps it apart from "-", and math-verify reads LaTeX only between
    # delimiters, so a bare reference such as "\\sqrt{2}" (MATH's form) parsed to nothing
    assert graders.grade(grader, response, reference) == grade


@pytest.mark.parametrize("grader, response, reference, grade", [
    ("exact", "\\boxed{Paris}", "Paris", 1.0),
    ("exact", "So it is $\\boxed{\\text{Paris}}$.", "Paris", 1.0),
    ("exact", "\\boxed{Paris} no, \\boxed{Lyon}", "Paris", 0.0),
    ("exact", "\\boxed{Lyon}", "Paris", 0.0),
    ("exact", "Reasoning.\n**Answer**: Paris", "Paris", 1.0),
    ("exact", "**Final Answer**: Paris\nas it is the capital", "Paris", 1.0),
    ("choice", "Reasoning.\n\n**Answer:** C", "C", 1.0), ("choice", "**Answer**: (d)", "D", 1.0),
    ("choice", "**Answer:** C", "A", 0.0), ("choice", "**Answer**: I think so, B", "I", 0.0)])
def test_boxed_and_bold_answers(grader, response, reference, grade):
    # before the fix: exact never looked inside \\boxed{..}, and neither exact nor choice read an
    # answer after a bold label ("**Answer:** C", "**Answer**: Paris"), so right answers scored 0.0
    assert graders.grade(grader, response, reference) == grade


def test_dry_run_bounds_the_judge(tmp_path):
    """The dry run's judge worst case is at least what the judge's requests reserve: an answer of
    max_tokens tokens can be 4 UTF-8 bytes a token (more for long tokens), and the judge's bound
    counts bytes, so counting the answer at one byte a token put the bound under the spend."""
    from r2ray.catalog import load_catalog
    from r2ray.execution import collect as c
    from r2ray.execution.requests import worst_case_usd

    catalog = write_catalog(tmp_path / "cat.yaml", "http://127.0.0.1:1/v1")
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "q1", "query": "Name a word.", "reference": "x"})
                       + "\n")
    config = c.CollectConfig(queries=str(queries), catalog=catalog, out=str(tmp_path / "b.jsonl"),
                             judge_model="small", arms="1")
    said = c.dry_run(config)
    bound = float(re.search(r"judge calls, worst case \$([0-9.e+-]+)", said).group(1))
    rows = c.read_queries(str(queries), None, True)
    requests = c.answer_requests(rows, load_catalog(catalog), "1", 0)
    answers = requests.select(["key", "query_id", "model", "budget"]).append_column(
        "response", pa.array(["\U0001F600" * requests["max_tokens"][0].as_py()]))
    judged = c.judge_requests(answers, {r["query_id"]: r for r in rows}, load_catalog(catalog),
                              "small")
    assert worst_case_usd(judged) <= bound


def test_the_dry_run_prints_a_small_worst_case_readably(tmp_path):
    """A cheap model's collection: ``.6f`` printed a worst case of $7.7e-07 as $0.000001. The
    printed worst case reads back as the requests' own (USD), however small."""
    from r2ray.execution import collect as c
    from r2ray.execution.requests import worst_case_usd

    catalog = yaml.safe_load(Path(write_catalog(tmp_path / "cat.yaml", "http://127.0.0.1:1/v1"))
                             .read_text())
    for model in catalog["models"]:
        model.update(input_per_m=model["input_per_m"] * 1e-4,
                     output_per_m=model["output_per_m"] * 1e-4)
    (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(catalog))
    queries = write_queries(tmp_path / "q.jsonl", QUERIES[:2])
    config = c.CollectConfig(queries=queries, catalog=str(tmp_path / "cheap.yaml"),
                             out=str(tmp_path / "b.jsonl"))
    said = c.dry_run(config)
    worst = worst_case_usd(c.answer_requests(c.read_queries(queries, None, False),
                                             load_catalog(config.catalog), config.arms, 0))
    assert 0 < worst < 1e-6
    printed = float(re.search(r"worst case \$([0-9.e+-]+) at the caps", said).group(1))
    assert printed == pytest.approx(worst, rel=1e-5)


def test_another_judge_model_in_the_same_work_folder_is_asked_again(tmp_path):
    """A judge call's key is the judged answer's, the same whoever judges: the second judge's
    scores were the first's, unasked, while the manifest named the second; now it is asked, and
    what the first was paid stays in the judge's spend."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        judges = tmp_path / "judges.yaml"
        judges.write_text(yaml.safe_dump({"budgets": ["default"], "models": [
            {"name": name, "input_per_m": 0.5, "output_per_m": 1.0, "context": 8192,
             "endpoint": stub.url} for name in ("judge_a", "judge_b")]}))
        queries = write_queries(tmp_path / "q.jsonl", QUERIES[:2])
        spend = {}
        for judge in ("judge_a", "judge_b"):
            assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                         str(tmp_path / "bench.jsonl"), "--executor", "local", "--arms", "1",
                         "--judge-model", judge, "--judge-catalog", str(judges)]) == 0
            manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
            spend[judge] = manifest["judge"]["spend"]["realised_usd"]
        asked = Counter(c["model"] for c in stub.calls)
    assert asked["judge_a"] == 2 and asked["judge_b"] == 2
    assert manifest["judge"]["calls_planned"] == 2 and manifest["judge"]["calls_done_before"] == 0
    assert spend["judge_b"] == pytest.approx(2 * spend["judge_a"])


def test_a_work_folder_answered_at_other_prices_is_refused(tmp_path, capsys):
    """A work folder reused with a catalogue whose prices changed: its answers were reused
    unsent, so the bench's ``cost_usd`` stayed at the old prices while the catalogue saved beside
    it gives the new ones (100× here). Refused, naming both; the same prices resume."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        queries = write_queries(tmp_path / "q.jsonl", QUERIES[:2])
        work = ["--work", str(tmp_path / "work"), "--executor", "local"]
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(tmp_path / "b1.parquet"), *work]) == 0
        repriced = yaml.safe_load(Path(catalog).read_text())
        repriced["models"][0].update(input_per_m=100.0, output_per_m=200.0)
        (tmp_path / "repriced.yaml").write_text(yaml.safe_dump(repriced))
        capsys.readouterr()
        for dry in ([], ["--dry-run"]):
            assert main(["bench", "collect", "--queries", queries, "--catalog",
                         str(tmp_path / "repriced.yaml"), "--out", str(tmp_path / "b2.parquet"),
                         *work, *dry]) == 2
            assert ("'large 10.0/30.0, small 1.0/2.0' there, 'large 10.0/30.0, small "
                    "100.0/200.0' here" in capsys.readouterr().err)
        assert not (tmp_path / "b2.parquet").exists()
        calls = len(stub.calls)
        assert main(["bench", "collect", "--queries", queries, "--catalog", catalog, "--out",
                     str(tmp_path / "b1.parquet"), *work]) == 0   # same prices: resumes
        assert len(stub.calls) == calls
