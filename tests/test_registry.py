"""MLflow registry against a throwaway SQLite store: register, load, promote by alias, the logged
model's wheel and pinned requirements, and the pyfunc model loaded by alias in a fresh process
that imports r2ray from that wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from predictor_world import model_folder, planted_arrays, small_catalog

from r2ray.encoders import MINILM, load_encoder
from r2ray.predictor import make_predictor
from r2ray.registry import (RegistryError, alias_holder, load_registered, promote_if_better,
                            register_predictor)


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store):
    """A fresh tracking store + artifact folder; MLflow's global URIs restored afterwards."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = mlflow_store(folder)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("registry-tests", artifact_location=str(folder / "art"))
    mlflow.set_experiment(experiment_id=experiment)
    yield uri, folder
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="module")
def data():
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=200, dim=16, seed=0)
    test, _ = planted_arrays(catalog, n_queries=20, dim=16, seed=3)
    return catalog, train, test


def test_register_load_and_promote_only_when_better(store, data):
    uri, _ = store
    catalog, train, test = data
    fitted = [make_predictor("per_arm_ridge", alpha=a).fit(train, catalog) for a in (10.0, 1.0, 3.0)]
    versions = [register_predictor(p, "r2ray-promote", tracking_uri=uri) for p in fitted]
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert versions[0].tags["kind"] == "per_arm_ridge"
    assert versions[0].tags["catalog_fingerprint"] == catalog.fingerprint

    loaded = load_registered("models:/r2ray-promote/1", tracking_uri=uri)
    assert loaded.catalog == catalog and loaded.encoder_spec is None
    # which predictor each version holds: its fingerprint, as run manifests and cost
    # corrections record it (review s22/H: the tags did not say)
    assert versions[0].tags["document_sha256"] == loaded.predictor.saved_fingerprint_
    assert len({v.tags["document_sha256"] for v in versions}) == 3
    assert loaded.version.version == "1"
    np.testing.assert_array_equal(loaded.predictor.predict(test.embedding).quality,
                                  fitted[0].predict(test.embedding).quality)

    audc = {"1": 0.70, "2": 0.60, "3": 0.75}  # what "the same evaluation" says of each version
    score = lambda r: {"audc": audc[r.version.version], "qnc": 0.5, "peak": 0.9}  # noqa: E731
    first = promote_if_better(versions[0], "champion", score, tracking_uri=uri)
    assert first.promoted and first.holder is None and "no current holder" in first.reason
    worse = promote_if_better(versions[1], "champion", score, tracking_uri=uri)
    assert not worse.promoted and worse.holder.version == "1"
    assert "audc 0.6000" in worse.report() and "audc 0.7000" in worse.report()
    assert alias_holder("r2ray-promote", "champion", uri).version == "1"
    better = promote_if_better(versions[2], "champion", score, tracking_uri=uri)
    assert better.promoted and "0.7500 > 0.7000" in better.reason
    assert load_registered("models:/r2ray-promote@champion", tracking_uri=uri).version.version == "3"

    def holder_fails(registered):
        if registered.version.version == "3":
            raise ValueError("holder speaks another catalogue")
        return {"audc": 0.99}
    blocked = promote_if_better(versions[1], "champion", holder_fails, tracking_uri=uri)
    assert not blocked.promoted and "cannot be scored" in blocked.reason
    assert alias_holder("r2ray-promote", "champion", uri).version == "3"


def logged_wheel(model_folder) -> str:
    """The one requirement that is a file in the model: its path, relative to the model folder."""
    lines = (model_folder / "requirements.txt").read_text().split()
    wheels = [line for line in lines if line.endswith(".whl")]
    assert len(wheels) == 1 and (model_folder / wheels[0]).is_file(), lines
    return wheels[0]


def test_logged_model_carries_its_wheel_and_pins_only_installed_versions(store, data, tmp_path):
    uri, _ = store
    catalog, train, _ = data
    version = register_predictor(make_predictor("per_arm_ridge").fit(train, catalog),
                                 "r2ray-wheel", tracking_uri=uri)
    model = Path(mlflow.artifacts.download_artifacts(version.uri, dst_path=str(tmp_path)))
    lines = (model / "requirements.txt").read_text().split()
    wheel = logged_wheel(model)
    assert wheel.startswith("code/r2ray-") and not any(re.match(r"r2ray\b", x) for x in lines)
    pins = dict(line.split("==") for line in lines if line != wheel)
    assert {"numpy", "torch", "safetensors", "pyarrow", "pyyaml", "pydantic", "pandas",
            "mlflow"} <= set(pins)
    assert all(installed_version(name).split("+")[0] == pin for name, pin in pins.items())
    # what MLflow runs to rebuild the environment (from the model folder) resolves with no index
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--quiet"]
    resolved = subprocess.run([*pip, "--dry-run", "-r", "requirements.txt"], cwd=model,
                              capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    subprocess.run([*pip, "--no-deps", "--target", str(tmp_path / "site"), str(model / wheel)],
                   check=True, timeout=120)
    assert (tmp_path / "site" / "r2ray" / "predictor" / "pyfunc.py").is_file()
    assert (tmp_path / "site" / "r2ray" / "default_catalog.yaml").is_file()


def test_load_registered_is_the_pyfunc_models_predictor(store, data):
    uri, _ = store
    catalog, train, test = data
    version = register_predictor(make_predictor("per_arm_ridge").fit(train, catalog),
                                 "r2ray-public", tracking_uri=uri)
    pyfunc = mlflow.pyfunc.load_model(version.uri, model_config={"device": "cpu"})
    model = pyfunc.unwrap_python_model()  # an R2RayPyfunc; model_config reaches load_context
    assert model.device == "cpu"
    loaded = load_registered(version.uri, tracking_uri=uri, device="cpu")
    expected = model.predictor.predict(test.embedding[:3]).quality
    np.testing.assert_array_equal(loaded.predictor.predict(test.embedding[:3]).quality, expected)
    out = pyfunc.predict(pd.DataFrame({"embedding": list(test.embedding[:3].astype(float)),
                                       "input_tokens": [5, 6, 7]}))
    np.testing.assert_allclose(np.stack(out["quality"]), expected, rtol=1e-6)


def test_uris_that_do_not_resolve_are_clear_errors(store):
    uri, _ = store
    with pytest.raises(RegistryError, match="does not resolve"):
        load_registered("models:/no-such-model@champion", tracking_uri=uri)
    with pytest.raises(RegistryError, match="is not models:/NAME@ALIAS"):
        load_registered("models:/a/b/c", tracking_uri=uri)
    assert alias_holder("no-such-model", "champion", uri) is None
    # a misspelt name was "registered model 'no-such-model' has no versions", as if it existed
    with pytest.raises(RegistryError, match="name=no-such-model not found"):
        load_registered("models:/no-such-model/latest", tracking_uri=uri)


def test_pyfunc_by_alias_in_a_fresh_process_returns_q_t_c_per_arm(store, data, tmp_path):
    uri, folder = store
    catalog, train, _ = data
    encoder = load_encoder(MINILM, device="cpu")
    train = train.subset(np.arange(48))
    train = train.with_embedding(encoder.encode(train.query.tolist()))
    predictor = make_predictor("per_arm_ridge").fit(train, catalog)
    version = register_predictor(predictor, "r2ray-pyfunc", encoder_spec=MINILM, tracking_uri=uri)
    mlflow.MlflowClient().set_registered_model_alias("r2ray-pyfunc", "champion", version.version)

    queries = ["What is 17 * 23?", "Write a limerick about routers."]
    model = Path(mlflow.artifacts.download_artifacts(version.uri, dst_path=str(tmp_path)))
    site = tmp_path / "site"  # r2ray as the model's own wheel installs it, not this checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                    "--target", str(site), str(model / logged_wheel(model))], check=True, timeout=120)
    script = textwrap.dedent("""
        import json, sys
        import mlflow, pandas as pd
        import r2ray
        assert r2ray.__file__.startswith(sys.argv[2]), r2ray.__file__
        model = mlflow.pyfunc.load_model("models:/r2ray-pyfunc@champion")
        out = model.predict(pd.DataFrame({"query": json.loads(sys.argv[1]),
                                          "input_tokens": [10, 12]}))
        print(json.dumps({"columns": list(out.columns),
                          **{c: [list(map(float, v)) for v in out[c]]
                             for c in ("quality", "output_tokens", "cost_usd")},
                          "arms": model.metadata.metadata["arms"]}))
    """)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(site))
    env.pop("R2RAY_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(queries), str(site)], env=env,
                          cwd=folder, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["columns"] == ["input_tokens", "quality", "output_tokens", "cost_usd"]
    assert result["arms"][:2] == ["model-0|20", "model-0|100"] and len(result["arms"]) == 12
    expected = predictor.predict(encoder.encode(queries))
    np.testing.assert_allclose(result["quality"], expected.quality, atol=1e-5)
    np.testing.assert_allclose(result["output_tokens"], expected.output_tokens, rtol=1e-5)
    np.testing.assert_allclose(result["cost_usd"],
                               expected.cost_usd(catalog, np.array([10.0, 12.0])), rtol=1e-5)


def test_a_version_records_its_encoders_fingerprint_and_serving_checks_it(store, data, tmp_path):
    from r2ray.embedding_cache import folder_fingerprint
    from r2ray.encoders import EncoderError
    from r2ray.serving.router import load_routing_model

    uri, _ = store
    catalog, train, _ = data
    spec = model_folder(tmp_path / "encoder", b"weights v1")
    version = register_predictor(make_predictor("per_arm_ridge").fit(train, catalog),
                                 "r2ray-encoder", encoder_spec=spec, tracking_uri=uri)
    trained = folder_fingerprint(spec)        # the embedding cache's key for these files
    assert version.tags.get("encoder_fingerprint") == trained
    assert load_registered(version.uri, uri).predictor.encoder_fingerprint == trained
    model_folder(tmp_path / "encoder", b"weights v2, another package version")
    with pytest.raises(EncoderError, match=f"{version.uri} was trained on embeddings of encoder "
                                           f".*{trained}.*{folder_fingerprint(spec)}"):
        load_routing_model(version.uri, uri, device="cpu")


def test_a_candidate_that_cannot_embed_text_never_takes_the_alias_from_one_that_can(store, data,
                                                                                    tmp_path):
    """Retrained on precomputed embeddings with no --encoder, the candidate won on AUDC and took
    @champion from a text model: Serve then refused every request without an embedding, and the
    batch job quarantined every such query. The other way round is an upgrade: promoted."""
    uri, _ = store
    catalog, train, _ = data
    fitted = make_predictor("per_arm_ridge").fit(train, catalog)
    spec = model_folder(tmp_path / "encoder", b"weights")
    text, embeddings = (register_predictor(fitted, "r2ray-inputs", encoder_spec=encoder,
                                           tracking_uri=uri) for encoder in (spec, None))
    audc = {text.version: 0.6, embeddings.version: 0.9}
    score = lambda r: {"audc": audc[r.version.version]}  # noqa: E731
    mlflow.MlflowClient().set_registered_model_alias("r2ray-inputs", "champion", text.version)
    refused = promote_if_better(embeddings, "champion", score, tracking_uri=uri)
    assert not refused.promoted and "the candidate cannot" in refused.reason
    assert "--encoder" in refused.reason and spec in refused.reason
    assert alias_holder("r2ray-inputs", "champion", uri).version == text.version
    mlflow.MlflowClient().set_registered_model_alias("r2ray-inputs", "champion",
                                                     embeddings.version)
    audc[text.version] = 0.95
    assert promote_if_better(text, "champion", score, tracking_uri=uri).promoted


def test_scores_that_are_not_numbers_never_move_the_alias(store, data):
    """NaN compares false both ways: a NaN candidate took a free alias, and a NaN holder kept it
    against every candidate ("audc 0.7000 <= nan")."""
    uri, _ = store
    catalog, train, _ = data
    fitted = make_predictor("per_arm_ridge").fit(train, catalog)
    first, second = (register_predictor(fitted, "r2ray-nan", tracking_uri=uri) for _ in range(2))
    audc = {"1": float("nan"), "2": 0.7}
    score = lambda r: {"audc": audc[r.version.version]}  # noqa: E731
    refused = promote_if_better(first, "champion", score, tracking_uri=uri)
    assert not refused.promoted and "audc is nan, not a finite number" in refused.reason
    assert alias_holder("r2ray-nan", "champion", uri) is None
    mlflow.MlflowClient().set_registered_model_alias("r2ray-nan", "champion", first.version)
    kept = promote_if_better(second, "champion", score, tracking_uri=uri)
    assert not kept.promoted and "the holder's audc is nan" in kept.reason
    assert alias_holder("r2ray-nan", "champion", uri).version == "1"
    # a score with no audc at all is refused too, and its report still prints (it raised
    # TypeError formatting None with :.4f)
    missing = promote_if_better(second, "champion", score, tracking_uri=uri,
                                candidate_score={"audc": None, "qnc": 0.5})
    assert not missing.promoted and "audc is None" in missing.reason
    assert "audc None, qnc 0.5000" in missing.report()


def test_an_alias_moved_while_scoring_is_not_overwritten(store, data):
    """Another promotion moved @champion while this one scored against the old holder: this one
    must not overwrite it with a candidate never compared to the new holder."""
    uri, _ = store
    catalog, train, _ = data
    fitted = make_predictor("per_arm_ridge").fit(train, catalog)
    v1, v2, v3 = (register_predictor(fitted, "r2ray-race", tracking_uri=uri) for _ in range(3))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("r2ray-race", "champion", v2.version)

    def score(registered):
        if registered.version.version == "2":   # meanwhile, version 1 wins the alias
            client.set_registered_model_alias("r2ray-race", "champion", v1.version)
        return {"audc": {"1": 0.9, "2": 0.5, "3": 0.6}[registered.version.version]}

    raced = promote_if_better(v3, "champion", score, tracking_uri=uri)
    assert not raced.promoted and "moved to models:/r2ray-race/1" in raced.reason
    assert alias_holder("r2ray-race", "champion", uri).version == "1"


def test_a_version_whose_artifact_is_gone_is_an_error_naming_it(store, data):
    uri, _ = store
    catalog, train, _ = data
    version = register_predictor(make_predictor("per_arm_ridge").fit(train, catalog),
                                 "r2ray-gone", tracking_uri=uri)
    folder = mlflow.MlflowClient().get_model_version_download_uri("r2ray-gone", version.version)
    shutil.rmtree(Path(folder.removeprefix("file://")) / "artifacts" / "predictor")
    with pytest.raises(RegistryError, match="models:/r2ray-gone/1 .*cannot be loaded"):
        load_registered("models:/r2ray-gone/1", tracking_uri=uri)
    mlflow.MlflowClient().create_registered_model("r2ray-empty")
    with pytest.raises(RegistryError, match="'r2ray-empty' has no versions"):
        load_registered("models:/r2ray-empty/latest", tracking_uri=uri)
    # a name with an apostrophe: MLflow registers it, and /latest resolves it (the search
    # filter quoted it in single quotes and was refused as invalid)
    register_predictor(make_predictor("per_arm_ridge").fit(train, catalog), "alice's-router",
                       tracking_uri=uri)
    assert load_registered("models:/alice's-router/latest", uri).version.version == "1"


@pytest.mark.parametrize("damage", ["", "{{{ [", None], ids=["empty", "not-yaml", "gone"])
def test_a_version_whose_mlmodel_is_damaged_is_an_error_naming_it(store, data, damage):
    """An MLmodel file cut to nothing or not YAML came out of load_registered as a bare
    AttributeError / yaml ParserError naming a temporary folder, not the version."""
    uri, _ = store
    catalog, train, _ = data
    name = f"r2ray-mlmodel-{'gone' if damage is None else len(damage)}"
    version = register_predictor(make_predictor("per_arm_ridge").fit(train, catalog), name,
                                 tracking_uri=uri)
    folder = mlflow.MlflowClient().get_model_version_download_uri(name, version.version)
    mlmodel = Path(folder.removeprefix("file://")) / "MLmodel"
    mlmodel.unlink() if damage is None else mlmodel.write_text(damage)
    with pytest.raises(RegistryError, match=f"models:/{name}/1 .*cannot be loaded"):
        load_registered(f"models:/{name}/1", tracking_uri=uri)


def test_a_committed_run_re_run_after_its_alias_moved_names_both_versions(store, data, tmp_path,
                                                                            capsys):
    """A committed run id is left alone when run again, but if the alias it routed with now
    names another version the warning says so, with both versions (the URI is the same, so the
    settings alone showed nothing: "nothing to do")."""
    from r2ray import manifest as runs
    from r2ray.batch import route_batch
    from r2ray.batch.config import route_config

    uri, _ = store
    catalog, train, _ = data
    for alpha in (1.0, 3.0):
        register_predictor(make_predictor("per_arm_ridge", alpha=alpha).fit(train, catalog),
                           "r2ray-moved", tracking_uri=uri)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("r2ray-moved", "champion", "1")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "q.jsonl").write_text('{"query_id": "a", "query": "hi"}\n')
    config = route_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                          model="models:/r2ray-moved@champion", budget_per_query_usd=1e-4,
                          run_id="nightly", tracking_uri=uri)
    fingerprint = runs.input_fingerprint([str(tmp_path / "in" / "q.jsonl")])
    attempt, _ = runs.start_attempt(runs.RunPaths(config.output, "nightly"), fingerprint)
    committed = {"run_id": "nightly", "input": {"fingerprint": fingerprint},
                 "model": {"uri": config.model, "name": "r2ray-moved", "version": "1"},
                 "config": config.model_dump()}
    runs.commit(attempt, committed)
    route_batch(config)
    assert "nothing to do" in capsys.readouterr().err
    client.set_registered_model_alias("r2ray-moved", "champion", "2")
    assert route_batch(config)["model"]["version"] == "1"   # still left alone ...
    err = capsys.readouterr().err                           # ... but not silently
    assert ("model (models:/r2ray-moved@champion was version 1 for this run, and now resolves "
            "to version 2)") in err and "--force" in err


def test_a_runs_catalogue_is_its_versions_after_the_alias_moved(store, data):
    """`r2ray reconcile` (and `r2ray execute`) take the catalogue of a run of
    models:/NAME@ALIAS from the version its manifest records: read from the alias, a promotion
    since the run (here of a version with other prices) refused the run as priced with another
    catalogue."""
    from r2ray.catalog import catalog_from_dict
    from r2ray.reconcile import run_catalog

    uri, _ = store
    catalog, train, _ = data
    repriced = catalog_from_dict(catalog.to_dict() | {"models": [
        m | {"output_per_m": 2 * m["output_per_m"]} for m in catalog.to_dict()["models"]]})
    for prices in (catalog, repriced):
        register_predictor(make_predictor("per_arm_ridge").fit(train, prices), "r2ray-priced",
                           tracking_uri=uri)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("r2ray-priced", "champion", "1")
    manifest = {"run_id": "nightly", "catalog_fingerprint": catalog.fingerprint,
                "config": {"tracking_uri": uri},
                "model": {"uri": "models:/r2ray-priced@champion", "name": "r2ray-priced",
                          "version": "1"}}
    client.set_registered_model_alias("r2ray-priced", "champion", "2")
    assert run_catalog(manifest).fingerprint == catalog.fingerprint


def test_a_committed_run_re_run_after_its_name_was_registered_again_says_so(store, data,
                                                                            tmp_path, capsys):
    """The name deleted and registered again: @champion resolves to version 1 as it did for the
    committed run, but version 1 now holds another predictor. The re-run said "nothing to do";
    the version's fingerprint tag against the manifest's shows it."""
    from r2ray import manifest as runs
    from r2ray.batch import route_batch
    from r2ray.batch.config import route_config
    from r2ray.batch.job import load_model

    uri, _ = store
    catalog, train, _ = data
    client = mlflow.MlflowClient()

    def register(alpha: float) -> None:
        register_predictor(make_predictor("per_arm_ridge", alpha=alpha).fit(train, catalog),
                           "r2ray-renamed", tracking_uri=uri)
        client.set_registered_model_alias("r2ray-renamed", "champion", "1")

    register(1.0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "q.jsonl").write_text('{"query_id": "a", "query": "hi"}\n')
    config = route_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                          model="models:/r2ray-renamed@champion", budget_per_query_usd=1e-4,
                          run_id="nightly", tracking_uri=uri)
    model = load_model(config.model, None, uri)   # what the run recorded of its model
    fingerprint = runs.input_fingerprint([str(tmp_path / "in" / "q.jsonl")])
    attempt, _ = runs.start_attempt(runs.RunPaths(config.output, "nightly"), fingerprint)
    runs.commit(attempt, {"run_id": "nightly", "input": {"fingerprint": fingerprint},
                          "model": {"uri": config.model, "name": model.name,
                                    "version": model.version, "fingerprint": model.fingerprint},
                          "config": config.model_dump()})
    route_batch(config)
    assert "nothing to do" in capsys.readouterr().err
    client.delete_registered_model("r2ray-renamed")
    register(50.0)
    assert route_batch(config)["model"]["version"] == "1"   # still left alone ...
    err = capsys.readouterr().err                           # ... but not silently
    assert ("model (models:/r2ray-renamed/1, its name registered again, holds another predictor "
            f"than this run used: fingerprint {model.fingerprint[:12]}") in err and "--force" in err


def test_a_name_registered_again_does_not_take_the_old_versions_correction(store, data, tmp_path):
    """NAME/VERSION names another predictor once the name is deleted and registered again
    (MLflow starts it at version 1 again). Before the fix its cost corrections were matched by
    that label and the catalogue alone: the batch job and Serve priced the new r2ray-again/1 with
    the factors fitted on the old one's actuals."""
    from r2ray.batch import route_config
    from r2ray.batch.job import find_correction, load_model
    from r2ray.reconcile import CostCorrection
    from r2ray.serving.router import load_routing_model

    uri, _ = store
    catalog, train, _ = data
    register_predictor(make_predictor("per_arm_ridge").fit(train, catalog), "r2ray-again",
                       tracking_uri=uri)
    model = load_model("models:/r2ray-again/1", None, uri)
    correction = CostCorrection("20261101T000000Z-00000000", "2026-11-01T00:00:00+00:00",
                                "night", model.label, catalog.fingerprint, 10, 2.0, (), (),
                                model_fingerprint=model.fingerprint)
    folder = tmp_path / "out" / "night" / "reconcile" / correction.version
    folder.mkdir(parents=True)
    (folder / "correction.json").write_text(correction.to_json())
    (tmp_path / "out" / "night" / "manifest.json").write_text("{}")
    config = route_config(input="in", output=str(tmp_path / "out"),
                          model="models:/r2ray-again/1", budget_usd=1.0, tracking_uri=uri)

    def found(loaded) -> tuple:   # (batch job's correction, Serve's correction version)
        served = load_routing_model("models:/r2ray-again/1", uri, device="cpu",
                                    corrections=str(tmp_path / "out"))
        batch = find_correction(config, loaded)
        return batch and batch.version, served.correction

    assert found(model) == (correction.version, correction.version)
    mlflow.MlflowClient().delete_registered_model("r2ray-again")
    again = register_predictor(make_predictor("per_arm_ridge", alpha=50.0).fit(train, catalog),
                               "r2ray-again", tracking_uri=uri)
    assert again.version == "1"
    model_again = load_model("models:/r2ray-again/1", None, uri)
    assert model_again.label == model.label and model_again.fingerprint != model.fingerprint
    assert found(model_again) == (None, None)


def test_a_registry_that_errs_while_reading_the_holder_promotes_nothing(store, data, monkeypatch):
    """Only "no such model" or "no such alias" is no holder; a registry erring (down, a 500) read
    as none too, and the candidate took the alias from a better holder without a comparison."""
    from mlflow.exceptions import MlflowException

    uri, _ = store
    catalog, train, _ = data
    fitted = make_predictor("per_arm_ridge").fit(train, catalog)
    first, second = (register_predictor(fitted, "r2ray-flaky", tracking_uri=uri) for _ in range(2))
    mlflow.MlflowClient().set_registered_model_alias("r2ray-flaky", "champion", first.version)
    assert alias_holder("r2ray-flaky", "champion", uri).version == "1"
    assert alias_holder("r2ray-flaky", "no-such-alias", uri) is None

    failures = [2]   # the registry errs on the next two alias reads, then answers again

    def erring(read):
        def call(self, *args):
            if failures[0]:
                failures[0] -= 1
                raise MlflowException("the registry is unavailable",
                                      error_code="TEMPORARILY_UNAVAILABLE")
            return read(self, *args)
        return call
    for name in ("get_registered_model", "get_model_version_by_alias"):  # however it is read
        monkeypatch.setattr(mlflow.MlflowClient, name, erring(getattr(mlflow.MlflowClient, name)))
    with pytest.raises(RegistryError, match="unavailable"):
        promote_if_better(second, "champion", lambda r: {"audc": 0.9}, tracking_uri=uri,
                          candidate_score={"audc": 0.1})   # nothing loaded: the holder's read
    monkeypatch.undo()
    assert alias_holder("r2ray-flaky", "champion", uri).version == "1"   # before: version 2
