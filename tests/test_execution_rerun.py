"""Re-running the engine and collect over a work folder that holds parts of other requests (a query
removed since, another run's rows): only this run's keys are its results; what every row was
billed stays in its spend and cap."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from r2ray.bench.io import read_bench
from r2ray.catalog import catalog_from_dict, load_catalog
from r2ray.execution.client import RESULT_SCHEMA
from r2ray.execution.collect import CollectConfig, collect, judge_spent_usd
from r2ray.execution.engine import EngineConfig, _write, run_requests
from r2ray.execution.requests import arm_request, request_row, requests_table
from r2ray.execution.stub import StubServer

URL = "http://127.0.0.1:9/v1"   # never called: every request below is already answered


def _catalog(tmp: Path) -> str:
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump({"budgets": ["default"], "models": [
        {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
         "endpoint": URL, "max_output_tokens": 24}]}))
    return str(path)


def _answered(req: dict, response: str) -> dict:
    row = {f.name: None for f in RESULT_SCHEMA}
    row.update(key=req["key"], purpose=req["purpose"], query_id=req["query_id"],
               model=req["model"], budget=req["budget"], ok=True, response=response,
               input_tokens=3, output_tokens=1, usage_estimated=False, finish_reason="stop",
               truncated=False, max_tokens=req["max_tokens"], latency_s=0.1, cost_usd=5e-6,
               attempts=1, endpoint="127.0.0.1:9", started_s=1.0, ended_s=2.0)
    return row


def _req(catalog, qid: str, text: str) -> dict:
    return request_row(catalog, "answer", qid, "small", 0,
                       [{"role": "user", "content": text}], 24)


# ---- engine: results of other requests leak into a run -----------------------------------------
def test_run_returns_only_the_requested_keys(tmp_path):
    # before the fix: 2 results — the part of request "old" (not asked for in this run: a query
    # dropped from the queries file, or another run's row) came back as answered; expected 1.
    # Its answer was paid into this output, so it stays in the spend (a later review, 2026-12-06:
    # this asserted 5e-6, the requested key's only)
    cat = load_catalog(_catalog(tmp_path))
    work = str(tmp_path / "work")
    old, new = _req(cat, "old", "hi"), _req(cat, "new", "hello")
    _write(pa.Table.from_pylist([_answered(old, "x"), _answered(new, "y")], schema=RESULT_SCHEMA),
           work + "/parts")
    run = run_requests(requests_table([new]), work, cat, EngineConfig(executor="local"),
                       progress=lambda line: None)
    assert run.results.column("key").to_pylist() == [new["key"]]
    assert run.spend["realised_usd"] == pytest.approx(1e-5)


def test_a_removed_querys_paid_answer_stays_in_the_spend_and_the_cap(tmp_path):
    # before the fix: realised_before $0 (only the keys asked for now were counted), so the cap
    # admitted a call past the $1e-5 already paid into the folder for queries since removed
    with StubServer() as stub:
        cat = _stub_catalog(stub.url)
        work = str(tmp_path / "work")
        gone = [_answered(_req(cat, qid, "hi"), "x") for qid in ("a", "b")]
        _write(pa.Table.from_pylist(gone, schema=RESULT_SCHEMA), work + "/parts")
        todo = requests_table([_stub_req(cat, "c", "[say:7]")])
        cap = todo["worst_usd"][0].as_py() + 5e-6   # fits only if less than $5e-6 was paid
        run = run_requests(todo, work, cat, EngineConfig(executor="local", max_spend_usd=cap),
                           progress=lambda line: None)
    assert run.spend["realised_before_usd"] == pytest.approx(1e-5)
    assert run.spend["refused_calls"] == 1 and run.results.num_rows == 0 and not stub.calls


def test_the_judges_earlier_spend_counts_a_removed_querys_rows(tmp_path):
    # before the fix: judge_spent_usd counted only the judge rows of the queries asked for now,
    # $5e-6 of the $1e-5 the judge run itself counts as realised before it starts
    cat = load_catalog(_catalog(tmp_path))
    keep, gone = _req(cat, "keep", "hi"), _req(cat, "gone", "hello")
    judge = tmp_path / "work" / "judge"
    rows = [dict(_answered(req, "1"), prompt_sha=req["prompt_sha"]) for req in (keep, gone)]
    _write(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), str(judge / "parts"))
    run = run_requests(requests_table([keep]), str(judge), cat, EngineConfig(executor="local"),
                       progress=lambda line: None)
    assert run.calls_planned == 0
    assert judge_spent_usd(str(tmp_path / "work")) == pytest.approx(1e-5)
    assert run.spend["realised_before_usd"] == pytest.approx(1e-5)   # the two agree


def test_collect_rerun_after_a_query_is_removed(tmp_path):
    # before the fix: KeyError 'gone' from collect (by_id[answer["query_id"]]): a rerun with a
    # query removed from the queries file crashed; expected: a bench of the remaining query only
    catalog = _catalog(tmp_path)
    cat = load_catalog(catalog)
    keep = arm_request(cat, "keep", "What is 2+3?", "small", 0)
    gone = arm_request(cat, "gone", "What is 1+1?", "small", 0)
    work = tmp_path / "bench.work"
    _write(pa.Table.from_pylist([_answered(keep, "5"), _answered(gone, "2")],
                                schema=RESULT_SCHEMA), str(work / "answers" / "parts"))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "keep", "query": "What is 2+3?",
                                   "reference": "5", "grader": "numeric"}) + "\n")
    result = collect(CollectConfig(queries=str(queries), catalog=catalog,
                                   out=str(tmp_path / "bench.parquet"),
                                   engine=EngineConfig(executor="local")),
                     progress=lambda line: None)
    assert result.bench_rows == 1


# ---- a prompt edited under the same key (a review, 2026-12-05) ---------------------------------
# Parts as the code before the prompt hash wrote them (f5d08d1): RESULT_SCHEMA without prompt_sha.
LEGACY_RESULT_SCHEMA = pa.schema([f for f in RESULT_SCHEMA if f.name != "prompt_sha"])


def _write_legacy(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    legacy = [{k: v for k, v in r.items() if k != "prompt_sha"} for r in rows]
    pq.write_table(pa.Table.from_pylist(legacy, schema=LEGACY_RESULT_SCHEMA),
                   folder / "part-legacy.parquet")


def _stub_catalog(url: str):
    """One model, "small", at the stub server ``url``: $1 / $2 per M tokens in / out."""
    return catalog_from_dict({"budgets": ["default"], "models": [
        {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
         "endpoint": url, "max_output_tokens": 24}]})


def _stub_req(catalog, qid: str, text: str) -> dict:
    return request_row(catalog, "answer", qid, "small", 0, [{"role": "user", "content": text}], 24)


def test_an_edited_prompt_is_sent_again(tmp_path):
    # before the fix: 0 calls on the rerun and the answer "5" to the prompt that now says 6 (the
    # key was (purpose, query id, model, budget) only); expected: 1 call, answer "6"
    with StubServer() as stub:
        cat = _stub_catalog(stub.url)
        work, config = str(tmp_path / "work"), EngineConfig(executor="local")
        first = run_requests(requests_table([_stub_req(cat, "q", "[say:5]")]), work, cat, config,
                             progress=lambda line: None)
        assert first.results["response"].to_pylist() == ["5"]
        calls = len(stub.calls)
        edited = run_requests(requests_table([_stub_req(cat, "q", "[say:6]")]), work, cat,
                              config, progress=lambda line: None)
        assert len(stub.calls) - calls == 1
        assert edited.results["response"].to_pylist() == ["6"]
        assert edited.spend["realised_usd"] == pytest.approx(   # both answers were paid
            first.spend["realised_usd"] + edited.results["cost_usd"][0].as_py())
        back = run_requests(requests_table([_stub_req(cat, "q", "[say:5]")]), work, cat, config,
                            progress=lambda line: None)   # the first prompt again
        assert back.results["response"].to_pylist() == ["5"]


def test_an_edited_prompts_paid_answer_stays_in_the_spend_and_the_cap(tmp_path):
    # before the fix: the rerun's part (named by its key alone) overwrote the old prompt's, and
    # the spend counted only rows of the prompt sent now, so a third edit saw realised $0 and the
    # cap let it pass the money already paid (and going back to the first prompt paid it again)
    with StubServer() as stub:
        cat = _stub_catalog(stub.url)
        work = str(tmp_path / "work")

        def run(text: str, cap: float | None = None):
            return run_requests(requests_table([_stub_req(cat, "q", text)]), work, cat,
                                EngineConfig(executor="local", max_spend_usd=cap),
                                progress=lambda line: None)

        paid = [run("[say:5]").spend["realised_usd"]]
        second = run("[say:6]")
        paid.append(second.results["cost_usd"][0].as_py())
        assert second.spend["realised_before_usd"] == pytest.approx(paid[0])
        assert second.spend["realised_usd"] == pytest.approx(sum(paid))
        worst = requests_table([_stub_req(cat, "q", "[say:7]")])["worst_usd"][0].as_py()
        third = run("[say:7]", cap=worst + 0.5 * sum(paid))   # fits only if $0 was paid
        assert third.spend["realised_before_usd"] == pytest.approx(sum(paid))
        assert third.spend["refused_calls"] == 1 and third.results.num_rows == 0
        calls = len(stub.calls)
        back = run("[say:5]")   # the first prompt again: its answer is on record, not paid again
        assert len(stub.calls) == calls and back.results["response"].to_pylist() == ["5"]
        assert back.spend["realised_usd"] == pytest.approx(sum(paid))


def test_a_work_folder_without_prompt_hashes_is_reused_once(tmp_path):
    # a work folder the previous code wrote: every part reused with no call (the URL is never
    # called), counted; then stamped, so a later edit is sent again (before the fix: served "x")
    cat = load_catalog(_catalog(tmp_path))
    work = tmp_path / "work"
    a, b = _req(cat, "a", "hi"), _req(cat, "b", "hello")
    _write_legacy([_answered(a, "x"), _answered(b, "y")], work / "parts")
    lines: list[str] = []
    run = run_requests(requests_table([a, b]), str(work), cat, EngineConfig(executor="local"),
                       progress=lines.append)
    assert run.calls_planned == 0 and run.failures.num_rows == 0
    assert sorted(run.results["response"].to_pylist()) == ["x", "y"]
    assert run.unrecorded_reused == 2 and run.spend["realised_usd"] == pytest.approx(1e-5)
    assert any("reused 2 answers" in line and "--resend-unrecorded" in line for line in lines)
    again = run_requests(requests_table([a, b]), str(work), cat, EngineConfig(executor="local"),
                         progress=lines.append)
    assert again.calls_planned == 0 and again.unrecorded_reused == 0   # stamped: no warning
    with StubServer() as stub:
        cat2 = _stub_catalog(stub.url)
        edited = run_requests(requests_table([_stub_req(cat2, "a", "[say:z]"), b]), str(work),
                              cat2, EngineConfig(executor="local"), progress=lambda line: None)
        assert len(stub.calls) == 1
    assert sorted(edited.results["response"].to_pylist()) == ["y", "z"]


def test_unrecorded_parts_are_sent_again_when_asked_or_when_the_cap_differs(tmp_path):
    with StubServer() as stub:
        cat = _stub_catalog(stub.url)
        a, b = _stub_req(cat, "a", "[say:new]"), _stub_req(cat, "b", "[say:new]")
        work = tmp_path / "work"
        _write_legacy([_answered(a, "old"), dict(_answered(b, "old"), max_tokens=99)],
                      work / "parts")
        run = run_requests(requests_table([a, b]), str(work), cat,
                           EngineConfig(executor="local", unrecorded="resend"),
                           progress=lambda line: None)
        assert len(stub.calls) == 2 and run.unrecorded_reused == 0
        assert run.results["response"].to_pylist() == ["new", "new"]
        run = run_requests(requests_table([a, b]), str(work), cat, EngineConfig(executor="local"),
                           progress=lambda line: None)   # answered now: never the old rows again
        assert len(stub.calls) == 2 and run.results["response"].to_pylist() == ["new", "new"]
        work2 = tmp_path / "work2"   # the default: "b" was sent with another max_tokens
        _write_legacy([_answered(a, "old"), dict(_answered(b, "old"), max_tokens=99)],
                      work2 / "parts")
        run = run_requests(requests_table([a, b]), str(work2), cat, EngineConfig(executor="local"),
                           progress=lambda line: None)
        assert len(stub.calls) == 3 and run.unrecorded_reused == 1
        assert sorted(run.results["response"].to_pylist()) == ["new", "old"]


def test_collect_judges_again_when_the_reference_is_edited(tmp_path):
    # before the fix: the judge's score of the first reference ("Paris": 1.0) stayed in the bench
    # after the reference was edited to "Lyon"; expected: judged again, 0.0
    with StubServer() as stub:
        catalog = _catalog_at(tmp_path, stub.url)
        queries = tmp_path / "q.jsonl"
        out = tmp_path / "bench.parquet"
        config = CollectConfig(queries=str(queries), catalog=catalog, out=str(out),
                               judge_model="small", engine=EngineConfig(executor="local"))
        for reference in ("Paris", "Lyon"):
            queries.write_text(json.dumps({"query_id": "city", "query": "Capital? [say:Paris.]",
                                           "reference": reference, "grader": "judge"}) + "\n")
            collect(config, progress=lambda line: None)
            quality = read_bench(str(out))["quality"].to_pylist()
            assert quality == [1.0 if reference == "Paris" else 0.0]
        assert sum(c["content"].endswith("Score:") for c in stub.calls) == 2 and len(stub.calls) == 3


# ---- the spend cap over reruns with a judge (a review, 2026-12-05) -----------------------------
def test_collect_cap_counts_the_judges_earlier_spend(tmp_path):
    # before the fix: the answers' book counted only earlier answers, so a rerun with more queries
    # filled the judge's earlier share too: answers + judge passed --max-spend-usd
    with StubServer() as stub:
        catalog = _catalog_at(tmp_path, stub.url)
        queries = tmp_path / "q.jsonl"
        out = tmp_path / "bench.parquet"

        def run(n: int, cap: float | None):
            queries.write_text("".join(json.dumps(
                {"query_id": f"q{i}", "query": f"{i}? [say:{i} {'w ' * 10}]",
                 "reference": str(i), "grader": "judge"}) + "\n" for i in range(n)))
            return collect(CollectConfig(queries=str(queries), catalog=catalog, out=str(out),
                                         judge_model="small",
                                         engine=EngineConfig(executor="local", batch_rows=1,
                                                             max_spend_usd=cap)),
                           progress=lambda line: None).manifest

        first = run(2, None)["spend"]["total_usd"]
        cap = 3 * first
        second = run(40, cap)
    assert second["answers"]["spend"]["refused_calls"] > 0   # the cap was reached
    assert second["spend"]["total_usd"] <= cap


def _catalog_at(tmp: Path, url: str) -> str:
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump({"budgets": ["default"], "models": [
        {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
         "endpoint": url, "max_output_tokens": 24}]}))
    return str(path)
