"""Hostile and careless input to the batch job, in one place: run folders that are not ours,
forced re-runs with typos, model names that look like paths, non-UTF-8 bytes, unwritable or
unreachable outputs, odd run ids and budgets. None of these may lose a file or escape the output.

Runs that need the whole job on Ray are in ``test_pipeline.py``; everything here stops before
Ray starts, or calls one stage directly.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from r2ray import manifest as runs, storage
from r2ray.batch.backlog import ROW_BITS, plan_units, read_and_validate
from r2ray.bench.io import write_table
from r2ray.catalog import CatalogError, catalog_from_dict
from r2ray.cli import main
from r2ray.batch.config import route_config
from r2ray.errors import R2RayError
from r2ray.batch import route_batch, summarise_manifest
from r2ray.batch.assign import assign_stage
from r2ray.batch.dedupe import drop_rows_stage

HOSTILE_NAMES = ["meta-llama/Llama-3.1-8B-Instruct", "a=b", "50%off", "with space", "naïve-模型"]


def _backlog(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"query_id": f"q{i}", "query": f"question {i}", "embedding": [0.1] * 16}
            for i in range(n)]
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _route_args(tmp_path, model, *extra):
    return ["route", "--input", _backlog(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", model, "--budget-usd", "1", "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", *extra]


def _fake_committed_run(output, run_id, config: dict | None = None, model: dict | None = None):
    """A committed run as the job leaves it: marker, one attempt with routed parts, manifest
    (with ``model`` as its ``model`` record when given)."""
    paths = runs.RunPaths(str(output), run_id)
    attempt, state = runs.start_attempt(paths, fingerprint="old")
    write_table(pa.table({"query_id": ["kept"]}), attempt.path("routed", "model=m",
                                                               "part-0.parquet"))
    runs.commit(attempt, {"run_id": run_id, "committed_at": "2026-01-01T00:00:00+00:00",
                          "solve": {"lambda": 1.0}, "input": {"fingerprint": "old"},
                          "config": config or {}, "counts": {"routed": 1}}
                | ({"model": model} if model else {}))
    return attempt


# ---- run folders: never remove what r2ray did not write ------------------------------------------
def test_an_unmarked_run_folder_is_refused_and_kept(tmp_path, small_routing_model, capsys,
                                                     mlflow_store):
    mlflow_store(tmp_path)   # the store _route_args names (models:/ looks there)
    precious = tmp_path / "out" / "important" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("the only copy")
    for model in ("models:/nope@x", small_routing_model["path"]):
        assert main(_route_args(tmp_path, model, "--run-id", "important")) == 2
        err = capsys.readouterr().err
        assert "is not an r2ray run folder" in err and str(precious.parent) in err
        assert precious.read_text() == "the only copy"


def test_a_bad_model_writes_nothing(tmp_path, capsys, mlflow_store):
    mlflow_store(tmp_path)
    assert main(_route_args(tmp_path, "models:/nope@x", "--run-id", "fresh")) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out" / "fresh").exists()


def test_input_inside_the_run_folder_is_refused(tmp_path, small_routing_model, capsys):
    _fake_committed_run(tmp_path / "out", "night")
    inside = _backlog(tmp_path / "out" / "night" / "in")
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "night", "--force")
    args[args.index("--input") + 1] = inside
    assert main(args) == 2
    assert "lies inside the run folder" in capsys.readouterr().err
    assert os.listdir(inside) == ["b.jsonl"]


def test_input_reached_through_a_symlink_into_the_run_folder_is_refused(tmp_path):
    """An interrupted run's redo clears its attempts: an input inside one, spelt through a
    symlink, must be refused before that clearing, not deleted by it."""
    paths = runs.RunPaths(str(tmp_path / "out"), "night")
    crashed, _ = runs.start_attempt(paths, fingerprint="f")
    write_table(pa.table({"query_id": ["q0"]}), crashed.path("deferred", "part-0.parquet"))
    (tmp_path / "link").symlink_to(tmp_path / "out")
    files = storage.list_files(str(tmp_path / "link" / "night" / crashed.attempt / "deferred"),
                               (".parquet",))
    with pytest.raises(runs.RunFolderError, match="lies inside the run folder"):
        runs.check_output(paths, files)
    assert os.path.exists(crashed.path("deferred", "part-0.parquet"))


def test_an_input_folder_holding_the_output_is_refused(tmp_path, small_routing_model, capsys):
    """``--input data --output data/out``: the second night would read the first's deferred
    rows (routing them again) and its manifest as backlog; its own deferred/ as input is fine."""
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "night2")
    data = args[args.index("--input") + 1]
    args[args.index("--output") + 1] = os.path.join(data, "out")
    first = _fake_committed_run(os.path.join(data, "out"), "night1")
    write_table(pa.table({"query_id": ["d"], "query": ["deferred"]}),
                first.path("deferred", "part-0.parquet"))
    assert main(args) == 2
    assert f"input {data} holds the output" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(data, "out", "night2"))
    requeued = storage.list_files(first.deferred, (".parquet",))
    runs.check_output(runs.RunPaths(os.path.join(data, "out"), "night2"), requeued,
                      first.deferred)


def test_a_failed_forced_run_leaves_the_committed_run_intact(tmp_path, capsys, mlflow_store):
    mlflow_store(tmp_path)
    attempt = _fake_committed_run(tmp_path / "out", "night")
    before = (tmp_path / "out" / "night" / "manifest.json").read_text()
    assert main(_route_args(tmp_path, "models:/typo@champion", "--run-id", "night",
                            "--force")) == 2
    assert "typo" in capsys.readouterr().err
    assert (tmp_path / "out" / "night" / "manifest.json").read_text() == before
    committed = runs.committed_paths(runs.RunPaths(str(tmp_path / "out"), "night"))
    assert committed.attempt == attempt.attempt
    assert pq.read_table(committed.path("routed", "model=m", "part-0.parquet")).num_rows == 1


def test_only_unnamed_attempts_of_a_marked_folder_are_cleared(tmp_path):
    paths = runs.RunPaths(str(tmp_path / "out"), "night")
    crashed, state = runs.start_attempt(paths, fingerprint="f")
    assert state == "fresh"
    write_table(pa.table({"x": [1]}), crashed.path("routed", "part-0.parquet"))
    (tmp_path / "out" / "night" / "notes.txt").write_text("an operator's note")
    again, state = runs.start_attempt(paths, fingerprint="f")
    assert state == "redo" and not os.path.exists(crashed.path())
    assert (tmp_path / "out" / "night" / "notes.txt").exists()
    runs.commit(again, {"run_id": "night"})
    with pytest.raises(runs.AlreadyCommitted):
        runs.start_attempt(paths, fingerprint="f")


def test_rerunning_a_committed_run_with_other_settings_warns(tmp_path, small_routing_model,
                                                              capsys):
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "night")
    config = route_config(input=args[2], output=args[4], model=args[6], budget_usd=2.0,
                          run_id="night")
    _fake_committed_run(tmp_path / "out", "night", config.model_dump())
    manifest = route_batch(config.model_copy(update={"budget_usd": 1.0, "workers": 1}))
    assert manifest["committed_at"] == "2026-01-01T00:00:00+00:00"
    err = capsys.readouterr().err
    assert "already committed with other settings" in err and "--force" in err
    assert "input files" in err and "budget_usd (2 → 1)" in err and "workers" not in err
    # a manifest from before --encoder-precision existed ran float32: auto may differ, float32 not
    older = {k: v for k, v in config.model_dump().items() if k != "encoder_precision"}
    for run_id, asked, warned in (("old-a", "auto", True), ("old-f", "float32", False)):
        _fake_committed_run(tmp_path / "out", run_id, older | {"run_id": run_id})
        route_batch(config.model_copy(update={"run_id": run_id, "encoder_precision": asked}))
        err = capsys.readouterr().err
        assert ("encoder_precision (float32 → auto)" in err) is warned, err


def test_rerunning_a_committed_run_after_its_folder_was_retrained_warns(tmp_path,
                                                                        small_routing_model,
                                                                        capsys):
    """Before the fix a folder had "no version" to compare: a run id re-run after a predictor
    was retrained into the model's folder said "nothing to do", as if it had routed with it."""
    import shutil

    from r2ray.predictor.persist import document_digest

    folder = tmp_path / "model"
    shutil.copytree(small_routing_model["path"], folder)
    document = json.loads((folder / "predictor.json").read_text())
    config = route_config(input=_backlog(tmp_path / "in"), output=str(tmp_path / "out"),
                          model=str(folder), budget_usd=1.0, run_id="night")
    _fake_committed_run(tmp_path / "out", "night", config.model_dump(),
                        {"uri": str(folder), "name": str(folder), "version": "local",
                         "fingerprint": document["document_sha256"]})
    route_batch(config)
    assert "model (" not in capsys.readouterr().err            # the predictor it routed with
    resaved = document | {"state": document["state"] | {"settings": {"alpha": 50.0}}}
    (folder / "predictor.json").write_text(json.dumps(resaved | {
        "document_sha256": document_digest(resaved)}))          # another one saved there since
    assert route_batch(config)["committed_at"] == "2026-01-01T00:00:00+00:00"   # left alone ...
    err = capsys.readouterr().err                                                 # ... not silently
    assert f"model ({folder} holds another predictor than this run used" in err
    assert "--force" in err


# ---- output locations: found before any work, one line each ----------------------------------
@pytest.mark.parametrize("output", ["/proc/r2ray-nope", "a-file"])
def test_unwritable_outputs_fail_before_any_work(tmp_path, small_routing_model, capsys, output):
    (tmp_path / "a-file").write_text("not a folder")
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "r")
    args[args.index("--output") + 1] = output if output.startswith("/") else str(tmp_path / output)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("is a file" in err) if output == "a-file" else ("cannot write to the output" in err)


def test_an_unreachable_s3_output_is_one_line(tmp_path, small_routing_model, capsys, monkeypatch,
                                             fresh_s3_clients):
    monkeypatch.setenv("R2RAY_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # botocore's retries: 6 s → 0.6 s, same error
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "r")
    args[args.index("--output") + 1] = "s3://nowhere/out"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot" in err and "EndpointConnectionError" in err


# ---- model names are data, never paths ----------------------------------------------------------
def _one_query_per_arm(catalog) -> pa.Table:
    """A solved block: query j on arm j of ``catalog``."""
    n = catalog.n_arms
    return pa.table({"query_id": [f"q{j}" for j in range(n)],
                     "query": [f"question {j}" for j in range(n)],
                     "input_tokens": pa.array(np.full(n, 10), pa.int64()),
                     "tenant_name": pa.nulls(n, pa.string()),
                     "order": pa.array(np.arange(n), pa.int64()),
                     "arm": pa.array(np.arange(n), pa.int64()),
                     "lambda_star": np.full(n, 1.0),
                     "base_q": np.full(n, 0.5), "base_c": np.full(n, 1e-5),
                     "step_arm": pa.array([[]] * n, pa.large_list(pa.int32())),
                     "dq": pa.array([[]] * n, pa.large_list(pa.float64())),
                     "dc": pa.array([[]] * n, pa.large_list(pa.float64())),
                     "hull_tokens": pa.array([[20.0]] * n, pa.large_list(pa.float32()))})


def test_model_names_round_trip_through_hive_partitions(tmp_path):
    catalog = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": name, "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}
        for name in HOSTILE_NAMES]}, "test")
    routed = tmp_path / "out" / "routed"
    assign_stage(_one_query_per_arm(catalog), catalog.to_yaml(), str(routed),
                 str(tmp_path / "out" / "deferred"), model_version="v", run_id="r")
    assert sorted(os.listdir(routed)) == sorted(runs.routed_partition(m) for m in HOSTILE_NAMES)
    read = ds.dataset(str(routed), partitioning="hive").to_table()
    assert sorted(read.column("model").to_pylist()) == sorted(
        a.model for a in catalog.arms)  # the partition value and the column agree


def test_a_model_name_too_long_for_its_routed_folder_is_refused_up_front(tmp_path):
    """A CJK character is 9 bytes percent-escaped: 27 of them (and ``-7B``) make a 252-byte
    ``model=<name>`` folder, written and read back whole; 28 make 258, past a file name's 255.
    Before: the catalogue took it, and the assign stage failed with ``File name too long``
    after every query was scored."""
    def catalogue(name):
        return catalog_from_dict({"budgets": ["default"], "models": [
            {"name": name, "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096}]}, "test")

    with pytest.raises(CatalogError, match="is 258 bytes as the batch job's folder"):
        catalogue("模" * 28)
    longest = catalogue("模" * 27 + "-7B")
    routed = tmp_path / "routed"
    assign_stage(_one_query_per_arm(longest), longest.to_yaml(), str(routed),
                 str(tmp_path / "deferred"), model_version="v", run_id="r")
    (part,) = routed.glob("*/*.parquet")
    assert len(part.parent.name.encode()) == 252
    assert pq.read_table(part, columns=["model"]).column("model").to_pylist() == ["模" * 27 + "-7B"]


@pytest.mark.parametrize("name", ["x/../../../../escape", "..", "tab\tname", "line\nbreak",
                                  " padded", "zero\u200bwidth"])
def test_catalogue_refuses_path_escapes_and_control_characters(name):
    with pytest.raises(CatalogError, match="model name"):
        catalog_from_dict({"budgets": ["default"], "models": [
            {"name": name, "input_per_m": 1, "output_per_m": 1, "context": 100}]}, "test")


# ---- rows: never silently changed or dropped --------------------------------------------------
def test_non_utf8_lines_are_quarantined_not_mangled(tmp_path):
    good = json.dumps({"query_id": "ok", "query": "fine \u2028 line separator inside"})
    (tmp_path / "b.jsonl").write_bytes(
        good.encode() + b"\n" + b'{"query_id": "bad", "query": "caf\xe9"}\n')
    (unit,), _ = plan_units(str(tmp_path))
    kept, bad = read_and_validate(unit, 1000, 3)
    assert kept.column("query").to_pylist() == ["fine \u2028 line separator inside"]
    record = bad.to_pylist()[0]
    assert record["row"] == 2 and record["reason"].startswith("invalid UTF-8")
    assert "\\xe9" in record["raw"]


def test_quarantined_duplicates_keep_their_content_file_and_row(tmp_path):
    source = tmp_path / "in" / "b.parquet"
    source.parent.mkdir()
    table = pa.table({"query_id": ["a", "b", "a"], "query": ["first", "other", "second a"]})
    pq.write_table(table, source, row_group_size=2)
    batch = pa.table({"query_id": ["a", "b", "a"],
                      "order": pa.array([(3 << ROW_BITS) | r for r in range(3)], pa.int64())})
    kept = drop_rows_stage(batch, {"a": 3 << ROW_BITS}, {3: str(source)}, str(tmp_path / "q"))
    assert kept.column("query_id").to_pylist() == ["a", "b"]
    (record,) = pq.read_table(tmp_path / "q").to_pylist()
    assert record["source"] == str(source) and record["row"] == 3
    assert json.loads(record["raw"]) == {"query_id": "a", "query": "second a"}
    assert record["reason"] == f"duplicate query_id (first seen in {source}, row 1)"


# ---- messages a person reads ------------------------------------------------------------------
def test_run_ids_and_budgets_get_readable_messages(tmp_path):
    for run_id in ("", "../escape", "_hidden"):
        with pytest.raises(R2RayError, match="run id .* is not usable: give 1–128 characters"):
            route_config(input="i", output="o", model="m", budget_usd=1.0, run_id=run_id)


def test_summary_prints_money_readably():
    manifest = {"run_id": "r", "committed_at": "t", "output": {"routed": "o/r/a/routed"},
                "counts": {"rows_in": 1, "routed": 1, "quarantined": 0, "duplicates": 0,
                           "deferred": 0, "unreadable_files": 0},
                "spend": {"predicted_usd": np.float64(0.25), "usable_usd": 1e300,
                          "budget_usd": 1e300, "reserve": 0.0,
                          "by_model": {"m": {"queries": 1, "spend_usd": np.float64(0.25)}}},
                "solve": None, "timings": {}}
    text = summarise_manifest(manifest)
    assert "$1e+300" in text and "np.float64" not in text and len(text) < 1000


def test_the_manifest_never_stores_credentials(tmp_path):
    attempt, _ = runs.start_attempt(runs.RunPaths(str(tmp_path), "r"), fingerprint="f")
    runs.commit(attempt, {"config": {"tracking_uri": "http://u:SECRET@mlflow.internal:5000",
                                     "input": "s3://b/in?X-Amz-Signature=SECRET2"}})
    text = (tmp_path / "r" / "manifest.json").read_text()
    assert "SECRET" not in text and "http://u:***@mlflow.internal:5000" in text


@pytest.fixture
def fresh_s3_clients():
    """s3fs caches clients with the credentials they were made with: start and end clean."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_bad_s3_credentials_are_one_line(tmp_path, small_routing_model, capsys, monkeypatch,
                                         s3_bucket, fresh_s3_clients):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    args = _route_args(tmp_path, small_routing_model["path"], "--run-id", "r")
    args[args.index("--output") + 1] = f"{s3_bucket}/out"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot" in err and "Traceback" not in err
    assert "not-the-secret" not in err
