"""No command writes over what it did not make: an input, another output, a batch run, a folder
whose name holds glob characters (review G, 2026-12-06). Local files and fsspec's in-memory store
(its ``rm`` and ``glob`` read ``[ ]`` as s3fs's do); the same on S3 is in test_storage.py."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import yaml

from r2ray import manifest as runs
from r2ray import storage
from r2ray.bench.formats import convert_files
from r2ray.bench.synthetic import write_world
from r2ray.catalog import catalog_from_dict
from r2ray.errors import R2RayError
from r2ray.execution.client import RESULT_SCHEMA
from r2ray.execution.collect import CollectConfig, collect
from r2ray.execution.engine import EngineConfig, _write
from r2ray.execution.requests import arm_request
from r2ray.execution.workdir import commit_work, open_work

from conftest import TEST_DATA

URL = "http://127.0.0.1:9/v1"   # never called: every request below is already answered
POOL = {"budgets": ["default"], "models": [
    {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096, "endpoint": URL,
     "max_output_tokens": 24}]}


# ---- work folders (collect / execute --work) ----------------------------------------------------
def _committed_run(output: str, run_id: str = "r1") -> runs.RunPaths:
    paths = runs.RunPaths(output, run_id)
    attempt, _ = runs.start_attempt(paths, fingerprint="f")
    runs.commit(attempt, {"run_id": run_id})
    return paths


def test_a_committed_batch_run_is_no_work_folder(tmp_path):
    # before the fix: open_work removed the run's manifest.json (the run was no longer committed)
    # and commit_work wrote a collection's manifest in its place
    paths = _committed_run(str(tmp_path / "runs"))
    with pytest.raises(R2RayError, match="is a batch run folder"):
        open_work(paths.root)
    assert runs.read_manifest(paths)["run_id"] == "r1"


def test_a_batch_run_holding_only_its_lease_is_no_work_folder(tmp_path):
    # before the fix: a run in its first moments (its lease taken, no _r2ray_run.json yet) was
    # taken as a work folder, and the collection's manifest.json written into it
    from r2ray.lease import acquire_lease

    paths = runs.RunPaths(str(tmp_path / "runs"), "r1")
    lease = acquire_lease(paths)
    try:
        with pytest.raises(R2RayError, match="is a batch run folder \\(it holds _r2ray_lock.json"):
            open_work(paths.root)
        assert storage.exists(paths.lock) and not storage.exists(storage.join(paths.root,
                                                                               "manifest.json"))
    finally:
        lease.release()


def test_a_batch_run_folder_holding_only_a_claim_on_its_lease_is_no_work_folder(tmp_path):
    # a run killed in the milliseconds its release held the claim (its lock removed, the claim
    # not yet): the folder was taken as a work folder, its claim read as no run's; and the next
    # run of r1 refused, its folder "not an r2ray run folder", for good
    paths = runs.RunPaths(str(tmp_path / "runs"), "r1")
    storage.write_text(paths.lock + ".takeover-0123456789abcdef", "{}")
    runs.check_output(paths, [])
    with pytest.raises(R2RayError, match="is a batch run folder \\(it holds _r2ray_lock.json."):
        open_work(paths.root)


def test_a_work_folder_with_another_manifest_is_refused(tmp_path):
    # before the fix: the project's manifest.json was removed, then replaced by r2ray's
    (tmp_path / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(R2RayError, match="holds a manifest.json that no collection"):
        open_work(str(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"name": "my web app"}


@pytest.mark.parametrize("kind", ["execute", "bench-collect"])
def test_a_work_folder_of_an_earlier_run_is_reopened(tmp_path, kind):
    work = str(tmp_path / "w.work")
    open_work(work)   # absent: a new work folder
    part = tmp_path / "w.work" / "answers" / "part-0.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"the earlier run's answers")
    commit_work(work, {"kind": kind})
    open_work(work)   # its own manifest: removed until this run commits
    assert not (tmp_path / "w.work" / "manifest.json").exists()
    assert part.read_bytes() == b"the earlier run's answers"   # its parts kept: the run resumes


def test_collect_refuses_a_committed_run_as_its_work_folder(tmp_path):
    catalog = tmp_path / "pool.yaml"
    catalog.write_text(yaml.safe_dump(POOL))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "q", "query": "2+3?", "reference": "5",
                                   "grader": "numeric"}) + "\n")
    paths = _committed_run(str(tmp_path / "runs"))
    with pytest.raises(R2RayError, match="is a batch run folder"):
        collect(CollectConfig(queries=str(queries), catalog=str(catalog),
                              out=str(tmp_path / "b.parquet"), work=paths.root,
                              engine=EngineConfig(executor="local")), progress=lambda line: None)
    assert runs.read_manifest(paths)["run_id"] == "r1"


# ---- an output that names an input or another output --------------------------------------------
def _answered(req: dict) -> dict:
    row = {f.name: None for f in RESULT_SCHEMA}
    row.update(key=req["key"], purpose=req["purpose"], query_id=req["query_id"],
               model=req["model"], budget=req["budget"], prompt_sha=req["prompt_sha"], ok=True,
               response="5", input_tokens=3, output_tokens=1, usage_estimated=False,
               finish_reason="stop", truncated=False, max_tokens=req["max_tokens"],
               latency_s=0.1, cost_usd=5e-6, attempts=1, endpoint="127.0.0.1:9", started_s=1.0,
               ended_s=2.0)
    return row


def test_collect_never_writes_its_bench_over_the_queries(tmp_path):
    # before the fix: the queries file was replaced by the bench (its answers already in parts)
    catalog = tmp_path / "pool.yaml"
    catalog.write_text(yaml.safe_dump(POOL))
    queries = tmp_path / "q.jsonl"
    text = json.dumps({"query_id": "q", "query": "2+3?", "reference": "5",
                       "grader": "numeric"}) + "\n"
    queries.write_text(text)
    req = arm_request(catalog_from_dict(POOL), "q", "2+3?", "small", 0)
    _write(pa.Table.from_pylist([_answered(req)], schema=RESULT_SCHEMA),
           str(tmp_path / "q.work" / "answers" / "parts"))
    with pytest.raises(R2RayError, match="--out .*q.jsonl names the same file as --queries"):
        collect(CollectConfig(queries=str(queries), catalog=str(catalog),
                              out=f"{tmp_path}/./q.jsonl", engine=EngineConfig(executor="local")),
                progress=lambda line: None)
    assert queries.read_text() == text


def test_convert_never_writes_over_its_input(tmp_path):
    # before the fix: the published source file was replaced by the converted bench
    shutil.copytree(TEST_DATA / "paretobandit", tmp_path / "pb")
    source = tmp_path / "pb" / "test_k4.jsonl"
    before = source.read_bytes()
    with pytest.raises(R2RayError, match="--out .* names the same file as input"):
        convert_files("paretobandit", [str(tmp_path / "pb")], out=f"file://{source}")
    assert source.read_bytes() == before


def test_convert_never_writes_its_catalogue_over_the_one_it_prices_from(tmp_path):
    # before the fix: the default --catalog-out (bench.catalog.yaml) replaced the --catalog of
    # that name by the models found in the bench: a model the bench lacks was dropped from it
    shutil.copytree(TEST_DATA / "paretobandit", tmp_path / "pb")
    source, out = str(tmp_path / "pb" / "test_k4.jsonl"), tmp_path / "bench.parquet"
    convert_files("paretobandit", [source], out=str(out))
    mine = tmp_path / "bench.catalog.yaml"
    pool = yaml.safe_load(mine.read_text())
    pool["models"].append({"name": "extra", "input_per_m": 9.0, "output_per_m": 9.0,
                           "context": 8192})
    mine.write_text(yaml.safe_dump(pool))
    with pytest.raises(R2RayError, match="--catalog-out .* names the same file as --catalog"):
        convert_files("paretobandit", [source], out=str(out), catalog_path=str(mine))
    assert yaml.safe_load(mine.read_text()) == pool
    convert_files("paretobandit", [source], out=str(out), catalog_path=str(mine),
                  catalog_out=str(tmp_path / "repriced.catalog.yaml"))   # another name: fine


def test_synth_never_writes_two_outputs_to_one_file(tmp_path):
    # before the fix: the backlog replaced the bench (or the reverse), and the summary named both
    catalog = catalog_from_dict({"budgets": ["default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096},
        {"name": "b", "input_per_m": 3.0, "output_per_m": 6.0, "context": 4096}]})
    out = str(tmp_path / "w.parquet")
    with pytest.raises(R2RayError, match="--backlog .* names the same file as --out"):
        write_world(catalog, n_queries=4, seed=0, bench_uri=out, backlog_uri=out)
    assert not (tmp_path / "w.parquet").exists()


# ---- names holding [ ] * ? are literal ----------------------------------------------------------
@pytest.fixture
def memory_root(request):
    root = f"memory://review-g/{request.node.name.replace('[', '(').replace(']', ')')}"
    yield root
    storage.remove(root)


def test_abandon_never_removes_another_folders_marker(memory_root):
    # before the fix: abandoning a run under runs[1]/ removed runs1/r/_r2ray_run.json (rm read
    # [1] as a glob) and kept its own marker
    theirs = _committed_run(f"{memory_root}/runs1", "r")
    mine = runs.RunPaths(f"{memory_root}/runs[1]", "r")
    runs.check_output(mine, [])
    attempt, state = runs.start_attempt(mine, fingerprint="f")
    runs.abandon(attempt, state)
    assert storage.exists(theirs.marker)
    assert not storage.exists(mine.marker)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_latest_committed_looks_in_its_own_folder_only(tmp_path, memory_root, where):
    # before the fix: latest_committed("runs[1]") returned runs1/theirs/manifest.json
    base = str(tmp_path) if where == "local" else memory_root
    for output, run_id in ((f"{base}/runs1", "theirs"), (f"{base}/runs[1]", "mine")):
        attempt, _ = runs.start_attempt(runs.RunPaths(output, run_id), fingerprint="f")
        runs.commit(attempt, {"run_id": run_id, "solve": {"lambda": 1.0},
                              "committed_at": "2026-12-06T00:00:00+00:00"})
    found = runs.latest_committed(f"{base}/runs[1]")
    assert runs.read_manifest(found)["run_id"] == "mine"


def test_an_input_named_with_brackets_is_that_file(tmp_path):
    # before the fix: night[1].jsonl alone was "holds no files"; beside night1.jsonl, night1 was read
    (tmp_path / "night[1].jsonl").write_text('{"query_id": "mine"}\n')
    assert storage.list_files(str(tmp_path / "night[1].jsonl"), (".jsonl",)) == [
        str(tmp_path / "night[1].jsonl")]
    (tmp_path / "night1.jsonl").write_text('{"query_id": "other"}\n')
    assert storage.list_files(str(tmp_path / "night[1].jsonl"), (".jsonl",)) == [
        str(tmp_path / "night[1].jsonl")]
    assert storage.list_files(str(tmp_path / "night[0-9].jsonl"), (".jsonl",)) == [
        str(tmp_path / "night1.jsonl")]   # a pattern naming no file is still a glob
