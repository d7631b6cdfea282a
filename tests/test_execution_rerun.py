"""Re-running the engine and collect over a work folder that holds parts of other requests (a query
removed since, another run's rows): only this run's keys are its results and its spend."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from r2ray.catalog import load_catalog
from r2ray.execution.client import RESULT_SCHEMA
from r2ray.execution.collect import CollectConfig, collect
from r2ray.execution.engine import EngineConfig, _write, run_requests
from r2ray.execution.requests import arm_request, request_row, requests_table

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
    # dropped from the queries file, or another run's row) came back as answered and counted as
    # spend; expected 1
    cat = load_catalog(_catalog(tmp_path))
    work = str(tmp_path / "work")
    old, new = _req(cat, "old", "hi"), _req(cat, "new", "hello")
    _write(pa.Table.from_pylist([_answered(old, "x"), _answered(new, "y")], schema=RESULT_SCHEMA),
           work + "/parts")
    run = run_requests(requests_table([new]), work, cat, EngineConfig(executor="local"),
                       progress=lambda line: None)
    assert run.results.column("key").to_pylist() == [new["key"]]
    assert run.spend["realised_usd"] == pytest.approx(5e-6)


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
