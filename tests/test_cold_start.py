"""Cold start of a new model (r2ray.predictor.extend, `r2ray train --warm-start`): old arms keep
their predictions exactly, the new model's move toward its truth with rows, the CLI registers the
extension, bad input is refused with a reason."""

from __future__ import annotations

import re
from dataclasses import replace

import mlflow
import numpy as np
import pyarrow as pa
import pytest
from predictor_world import model_folder, planted_arrays, planted_bench_table, small_catalog

from r2ray.bench.io import write_table
from r2ray.bench.synthetic import synth_backlog, synth_bench, synth_truth
from r2ray.catalog import catalog_from_dict, save_catalog
from r2ray.cli import main
from r2ray.predictor import make_predictor, save_predictor
from r2ray.predictor.data import bench_arrays
from r2ray.predictor.base import fold_ids
from r2ray.predictor.extend import (ExtensionError, arrays_over, cross_fitted_new_arms,
                                    extend_predictor, plan_extension, without_models)
from r2ray.predictor.network import budget_chains
from r2ray.predictor.quality_calibration import ARM_ROWS
from r2ray.registry import load_registered

FULL = small_catalog(n_models=3)
NEW = "model-1"            # in the middle of the catalogue: old arms change indices
OLD = without_models(FULL, [NEW])
KINDS = {
    "r2ray": {"epochs": 3, "monotone": "budgets", "rank": 4, "query_hidden": 32,
              "joint_hidden": 32, "head_hidden": 16},
    "per_arm_ridge": {},
    "carrot_linear_all": {"max_iter": 20},
    "stacked": {"members": [{"kind": "per_arm_ridge", "settings": {}},
                            {"kind": "carrot_knn_all", "settings": {}}]},
    "averaged": {"members": [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"}]},
}


@pytest.fixture(scope="module")
def planted():
    """(training rows over the full catalogue, test embeddings)."""
    train, _ = planted_arrays(FULL, n_queries=400, dim=16, seed=0)
    test, _ = planted_arrays(FULL, n_queries=100, dim=16, seed=9)
    return train, test.embedding


@pytest.mark.parametrize("kind", KINDS)
def test_extension_keeps_old_arms_exactly_and_predicts_the_new_ones(planted, kind):
    train, test = planted
    old = make_predictor(kind, **KINDS[kind]).fit(arrays_over(train, FULL, OLD), OLD)
    extended, report = extend_predictor(old, FULL, train.subset(np.arange(40)))
    columns = plan_extension(OLD, FULL).arm_map
    before, after = old.predict(test), extended.predict(test)
    # exactly, up to float32 rounding: the network's products over more arms sum in another order
    np.testing.assert_allclose(after.quality[:, columns], before.quality, rtol=0, atol=1e-6)
    np.testing.assert_allclose(after.output_tokens[:, columns], before.output_tokens, rtol=1e-6)
    new = np.array([j for j, arm in enumerate(FULL.arms) if arm.model == NEW])
    assert np.isfinite(after.quality[:, new]).all() and np.isfinite(after.output_tokens[:, new]).all()
    assert report.new_models == [NEW] and report.n_queries == 40 and report.folds == 3
    assert report.ignored_cells == int(train.subset(np.arange(40)).mask[:, columns].sum()) > 0
    assert extended.spend_simulation_ is old.spend_simulation_
    assert (extended.quality_calibration_ is None) == (kind == "averaged")  # its members' maps


def test_an_averages_members_are_calibrated_with_the_extensions_folds_and_seed(planted):
    train, test = planted
    old = make_predictor("averaged", **KINDS["averaged"]).fit(arrays_over(train, FULL, OLD), OLD)
    rows = train.subset(np.arange(40))
    extended, report = extend_predictor(old, FULL, rows, folds=2, seed=5)
    alone, _ = extend_predictor(old.members_[0], FULL, rows, folds=2, seed=5)
    default, _ = extend_predictor(old.members_[0], FULL, rows)          # 3 folds, seed 0
    mine = extended.members_[0].predict(test)
    np.testing.assert_array_equal(mine.quality, alone.predict(test).quality)
    np.testing.assert_array_equal(mine.output_tokens, alone.predict(test).output_tokens)
    assert not np.array_equal(mine.quality, default.predict(test).quality)
    assert report.folds == 2


def test_saved_extension_loads_and_a_selected_winner_is_extended(planted, tmp_path):
    train, test = planted
    old = make_predictor("selected", candidates="per_arm_ridge,per_arm_ridge_strong").fit(
        arrays_over(train, FULL, OLD), OLD)
    extended, _ = extend_predictor(old, FULL, train.subset(np.arange(30)))
    assert extended.name == "selected" and extended.winner_name_ == old.winner_name_
    loaded = load_registered(save_predictor(extended, str(tmp_path / "p"))).predictor
    np.testing.assert_array_equal(loaded.predict(test).quality, extended.predict(test).quality)
    assert loaded.catalog_.fingerprint == FULL.fingerprint


# ---- the new model's predictions against its truth (synthetic world: models share structure) ----
WORLD = catalog_from_dict({"budgets": [50, 200, 800, "default"], "models": [
    {"name": "Gemma-3-1B", "input_per_m": 0.01, "output_per_m": 0.04, "context": 32768},
    {"name": "Llama-3.2-3B-Instruct", "input_per_m": 0.02, "output_per_m": 0.02, "context": 32768},
    {"name": "Mistral-7B-v0.2", "input_per_m": 0.2, "output_per_m": 0.2, "context": 32768},
    {"name": "Qwen3-235B-A22B-Instruct", "input_per_m": 0.18, "output_per_m": 0.54,
     "context": 32768}]})


def world_arrays(n_queries: int, seed: int):
    return bench_arrays(synth_bench(WORLD, n_queries, seed), WORLD,
                        synth_backlog(WORLD, n_queries, seed, embeddings=True))


def test_the_new_models_predictions_move_toward_its_truth_with_rows():
    """The strongest model added to three small ones: its quality lies outside what the old pool's
    mean model says. Errors of q̂ (before its calibration, so the fit itself is judged) and t̂
    against the world's expected outcomes on fresh queries fall as rows are added."""
    old_pool = without_models(WORLD, ["Qwen3-235B-A22B-Instruct"])
    extension = plan_extension(old_pool, WORLD)
    new = extension.new_arms
    network = make_predictor("r2ray", epochs=4).fit(arrays_over(world_arrays(500, 1), WORLD,
                                                                old_pool), old_pool)
    rows = world_arrays(400, 2)
    test = world_arrays(300, 3)
    truth = synth_truth(WORLD, 300, 3)
    quality = np.array(truth.column("expected_quality").to_pylist())[:, new]
    tokens = np.array(truth.column("expected_output_tokens").to_pylist())[:, new]

    def errors(prior: float, n: int) -> tuple[float, float]:
        extended, _ = extend_predictor(network, WORLD, rows.subset(np.arange(n)), prior=prior)
        predicted = extended.predict(test.embedding, raw_quality=True)
        rmse = np.sqrt(np.mean((predicted.quality[:, new] - quality) ** 2))
        mae = np.mean(np.abs(np.log1p(predicted.output_tokens[:, new]) - np.log1p(tokens)))
        return float(rmse), float(mae)

    start = errors(1e9, 25)       # a prior that strong keeps the start values
    few, many = errors(1.0, 25), errors(1.0, 400)
    assert many[0] < few[0] < start[0] and many[0] < start[0] - 0.05, (start, few, many)
    assert many[1] < start[1] - 0.05, (start, many)


# ---- bad input -----------------------------------------------------------------------------------
def catalog_with(**changes) -> object:
    document = FULL.to_dict()
    document["models"][0] = document["models"][0] | changes
    return catalog_from_dict(document)


@pytest.mark.parametrize("catalog, message", [
    (OLD, "adds no model"),
    (without_models(FULL, ["model-0"]), "model 'model-0' of the registered catalogue is missing"),
    (catalog_with(output_per_m=9.0), "model 'model-0': output_per_m is 0.5 in the registered"),
    (catalog_with(budgets=[20, "default"]), "model 'model-0': budgets"),
])
def test_a_catalogue_that_changes_old_models_is_refused(catalog, message):
    with pytest.raises(ExtensionError, match=message):
        plan_extension(OLD, catalog)


def test_rows_without_the_new_model_and_unextendable_kinds_are_refused(planted):
    train, _ = planted
    old_rows = arrays_over(train, FULL, OLD)
    ridge = make_predictor("per_arm_ridge").fit(old_rows, OLD)
    columns = plan_extension(OLD, FULL).arm_map
    blank = np.ones(FULL.n_arms, dtype=bool)
    blank[columns] = False
    only_old = replace(train, quality=np.where(blank, np.nan, train.quality).astype(np.float32))
    with pytest.raises(ExtensionError, match="no outcome of the new model"):
        extend_predictor(ridge, FULL, only_old)
    knn = make_predictor("carrot_knn_all").fit(old_rows, OLD)
    with pytest.raises(ExtensionError, match="'carrot_knn_all' predictor cannot be extended"):
        extend_predictor(knn, FULL, train)
    with pytest.raises(ValueError, match="embedding"):
        extend_predictor(ridge, FULL, train.with_embedding(train.embedding[:, :8]))


# ---- the CLI against a local MLflow store --------------------------------------------------------
@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    """The old pool's bench (its catalogue beside it) and rows of the new model alone, with the
    extended catalogue, all with 16-dimensional embeddings in one queries table."""
    folder = tmp_path_factory.mktemp("cold-start")
    table, queries = planted_bench_table(FULL, n_queries=200, dim=16, seed=0)
    is_new = np.array(table.column("model").to_pylist()) == NEW
    first = np.array([int(q[1:]) < 150 for q in table.column("query_id").to_pylist()])
    write_table(table.filter(~is_new & first), str(folder / "old.parquet"))
    save_catalog(OLD, str(folder / "old.catalog.yaml"))
    write_table(table.filter(is_new & ~first), str(folder / "new.parquet"))
    write_table(table.filter(~first), str(folder / "mixed.parquet"))
    save_catalog(FULL, str(folder / "full.catalog.yaml"))
    write_table(queries, str(folder / "queries.parquet"))
    old_rows = planted_arrays(FULL, n_queries=100, dim=16, seed=0)[0]
    save_predictor(make_predictor("per_arm_ridge").fit(arrays_over(old_rows, FULL, OLD), OLD),
                   str(folder / "saved"))
    return folder


def test_cli_warm_start_registers_logs_and_promotes_the_extension(benches, capsys, monkeypatch,
                                                                  mlflow_store):
    folder = benches
    tracking = mlflow_store(folder)
    for name in ("R2RAY_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(folder)
    base = ["--queries", str(folder / "queries.parquet"), "--tracking-uri", tracking,
            "--promote", "champion"]
    common = [*base, "--register", "pool"]
    assert main(["train", "--bench", str(folder / "old.parquet"), "--predictor", "per_arm_ridge",
                 *common]) == 0
    capsys.readouterr()
    assert main(["train", "--warm-start", "models:/pool@champion", "--bench",
                 str(folder / "mixed.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 "--set", "prior=2", *common]) == 0
    report = capsys.readouterr().out
    assert f"extended models:/pool/1 (per_arm_ridge) with {NEW} from 50 queries" in report
    assert "cells of old models ignored: their arms are frozen" in report
    assert "registered models:/pool/2" in report
    assert "alias @champion: promoted (extends the holder" in report

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version("pool", "2")
    assert version.tags["warm_start"] == "models:/pool/1" and version.tags["new_models"] == NEW
    run = client.get_run(version.run_id)
    assert run.data.params["n_new_queries"] == "50" and run.data.params["prior"] == "2.0"
    assert np.isfinite(run.data.metrics["new_arms_oof_brier"])
    fitted = {v: set(mlflow.artifacts.load_dict(  # a later promotion leaves them out of its test
        f"runs:/{client.get_model_version('pool', v).run_id}/training_query_ids.json")["query_ids"])
        for v in ("1", "2")}
    assert fitted["2"] == fitted["1"] | {f"q{i}" for i in range(150, 200)}
    assert len(fitted["1"]) == 120   # 150 queries less the 30 of the source's test split
    registered = load_registered("models:/pool@champion", tracking_uri=tracking)
    assert registered.version.version == "2"
    assert registered.catalog.fingerprint == FULL.fingerprint

    # another holder than the source: the alias stays; the name defaults to the source's
    assert main(["train", "--warm-start", "models:/pool/1", "--bench",
                 str(folder / "new.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 *base]) == 0
    report = capsys.readouterr().out
    assert "registered models:/pool/3" in report
    assert "not promoted (the holder models:/pool/2 is not the warm-start source" in report


@pytest.mark.parametrize("extra, message", [
    (["--register", "x"], "--warm-start needs --catalog"),
    (["--catalog", "{folder}/full.catalog.yaml"], "give --register NAME"),
    (["--catalog", "{folder}/full.catalog.yaml", "--epochs", "3"], "drop --epochs"),
    (["--catalog", "{folder}/full.catalog.yaml", "--split", "random"], "drop --split"),
    (["--catalog", "{folder}/full.catalog.yaml", "--candidates", "fast"], "drop --candidates"),
    (["--catalog", "{folder}/full.catalog.yaml", "--set", "alpha=3"],
     "takes --set prior; not alpha"),
    (["--catalog", "{folder}/full.catalog.yaml", "--folds", "1"],   # --folds reaches the config
     "--folds: Input should be greater than or equal to 2"),
    (["--catalog", "{folder}/old.catalog.yaml", "--register", "x"], "adds no model"),
])
def test_cli_warm_start_errors_name_the_problem(benches, capsys, monkeypatch, tmp_path, extra,
                                                message):
    folder = benches
    monkeypatch.chdir(tmp_path)  # nothing may land in the checkout, whatever MLflow does
    code = main(["train", "--warm-start", str(folder / "saved"), "--bench",
                 str(folder / "new.parquet"),
                 "--queries", str(folder / "queries.parquet"),
                 *[e.format(folder=folder) for e in extra]])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_warm_start_names_an_unknown_model_in_the_rows(benches, tmp_path, capsys):
    folder = benches
    table, _ = planted_bench_table(FULL, n_queries=5, dim=16, seed=0)
    names = ["model-9" if m == NEW else m for m in table.column("model").to_pylist()]
    write_table(table.set_column(table.schema.get_field_index("model"), "model",
                                 [names]), str(tmp_path / "bad.parquet"))
    code = main(["train", "--warm-start", str(folder / "saved"), "--bench",
                 str(tmp_path / "bad.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 "--queries", str(folder / "queries.parquet"), "--register", "x",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and "field 'model': unknown model 'model-9'" in err and "row " in err


def test_cli_warm_start_refuses_to_embed_new_rows_with_other_weights_of_the_encoder(
        benches, tmp_path, capsys):
    """The new arms would be fitted on embeddings the old arms never saw."""
    folder = benches
    spec = model_folder(tmp_path / "encoder", b"weights v1")
    old_rows = planted_arrays(FULL, n_queries=100, dim=16, seed=0)[0]
    save_predictor(make_predictor("per_arm_ridge").fit(arrays_over(old_rows, FULL, OLD), OLD),
                   str(tmp_path / "saved"), encoder_spec=spec)
    model_folder(tmp_path / "encoder", b"weights v2, retrained")
    code = main(["train", "--warm-start", str(tmp_path / "saved"), "--bench",
                 str(folder / "new.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 "--register", "x", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'saved'} was trained on embeddings of encoder" in err


def test_cli_warm_start_names_the_query_of_a_nan_embedding(benches, tmp_path, capsys):
    """A NaN in --queries was reported as 'embedding of row 21' for q170: the 21st query kept for
    the fit, neither a row of the bench nor a query id the user could find."""
    folder = benches
    _, queries = planted_bench_table(FULL, n_queries=200, dim=16, seed=0)
    embedding = queries.column("embedding").to_pylist()
    embedding[queries.column("query_id").to_pylist().index("q170")][3] = float("nan")
    write_table(queries.set_column(1, "embedding", pa.array(embedding, pa.list_(pa.float32()))),
                str(tmp_path / "queries.parquet"))
    code = main(["train", "--warm-start", str(folder / "saved"), "--bench",
                 str(folder / "mixed.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 "--queries", str(tmp_path / "queries.parquet"), "--register", "x",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and "the embedding of query_id 'q170' has NaN or infinite values" in err, err


@pytest.mark.parametrize("extra, message", [
    (["--set", "prior=Infinity"], "--set prior: Input should be a finite number"),
    (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
])
def test_cli_warm_start_refuses_an_infinite_prior_and_a_negative_seed(benches, capsys, tmp_path,
                                                                       extra, message):
    """Both were accepted: an infinite prior crashed the joint network's fit (RuntimeError), a
    negative seed numpy's fold draw (ValueError), each with a traceback."""
    folder = benches
    code = main(["train", "--warm-start", str(folder / "saved"), "--bench",
                 str(folder / "new.parquet"), "--catalog", str(folder / "full.catalog.yaml"),
                 "--queries", str(folder / "queries.parquet"), "--register", "x",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *extra])
    assert code == 2 and message in capsys.readouterr().err


def _two_new_models():
    """(a pool of 4, per-arm Ridge fitted on 2 of them, 40 new rows over all 4, model-2's arms)."""
    wider = small_catalog(n_models=4)
    old = without_models(wider, ["model-1", "model-2"])
    past, _ = planted_arrays(wider, n_queries=100, dim=16, seed=0)
    ridge = make_predictor("per_arm_ridge").fit(arrays_over(past, wider, old), old)
    rows, _ = planted_arrays(wider, n_queries=40, dim=16, seed=3)
    return wider, ridge, rows, np.array([arm.model == "model-2" for arm in wider.arms])


def test_a_new_model_without_rows_is_refused_by_name():
    """Two new models, rows of one: the other kept its start values, and the joint network
    predicted it at q̂ ≈ 0.48 from nothing (per-arm Ridge: NaN), registered without a word."""
    wider, ridge, rows, other = _two_new_models()
    rows = replace(rows, quality=np.where(other, np.nan, rows.quality).astype(np.float32))
    with pytest.raises(ExtensionError, match=r"no outcome of the new model\(s\) 'model-2';"):
        extend_predictor(ridge, wider, rows)


def test_a_new_model_on_one_query_is_refused_by_name():
    """A new model run on one query passed: the calibrations' fold holding that query out never
    saw the model, and per-arm Ridge predicted that one outcome (q̂ 1.0) on every query."""
    wider, ridge, rows, other = _two_new_models()
    lone = np.arange(rows.n_queries)[:, None] > 0
    rows = replace(rows, quality=np.where(other & lone, np.nan, rows.quality).astype(np.float32))
    with pytest.raises(ExtensionError, match=r"new model\(s\) 'model-2' \(1\) have outcomes on "
                                             r"fewer than 2 queries"):
        extend_predictor(ridge, wider, rows)


def test_a_new_model_on_a_few_rows_of_one_fold_is_calibrated_on_held_out_predictions(planted):
    """Two new models, one run on six rows that all fell in one of the calibrations' folds: the
    fit holding that fold out never saw it, so its held-out predictions were NaN and its
    calibrations fitted on none of its rows. The folds spread it, as cross-validation's do."""
    train, _ = planted
    old_pool = without_models(FULL, ["model-1", "model-2"])
    arms = np.flatnonzero(FULL.arm_arrays["model_index"] == 2)
    every_arm = ~np.isnan(train.quality[:60, arms]).any(axis=1)
    few = np.flatnonzero((fold_ids(60, 3, 0) == 0) & every_arm)[:6]
    values = {name: getattr(train, name)[:60].copy() for name in ("quality", "output_tokens",
                                                                    "cost_usd")}
    for array in values.values():
        array[np.ix_(~np.isin(np.arange(60), few), arms)] = np.nan
    rows = replace(train.subset(np.arange(60)), **values)
    old = make_predictor("per_arm_ridge").fit(arrays_over(train, FULL, old_pool), old_pool)
    extension = replace(plan_extension(old_pool, FULL), folds=3, seed=0)
    held_out = cross_fitted_new_arms(old, extension, rows, 1.0, folds=3, seed=0)
    assert np.isfinite(held_out.quality[np.ix_(few, arms)]).all()
    assert np.isfinite(held_out.output_tokens[np.ix_(few, arms)]).all()


def test_an_extended_network_is_extended_again_with_its_first_catalogues_inputs():
    """A team adds a model, then later another: the second warm start, of the registered
    extension, was refused ('arm inputs do not match its own catalogue ... saved by another r2ray
    version?'), the arm inputs standardised afresh over the once-extended catalogue, not with the
    statistics the network was trained with; and its budget rows sorted anew, though the first
    extension appended its new budget value (50) after the old ones."""
    document = small_catalog(n_models=4).to_dict()
    document["models"][1]["budgets"] = [20, 50, 100, 400, "default"]
    four = catalog_from_dict(document)
    first, once = without_models(four, ["model-1", "model-3"]), without_models(four, ["model-3"])
    past, _ = planted_arrays(four, n_queries=120, dim=16, seed=0)
    rows, _ = planted_arrays(four, n_queries=60, dim=16, seed=3)
    test, _ = planted_arrays(four, n_queries=30, dim=16, seed=9)
    network = make_predictor("r2ray", **KINDS["r2ray"]).fit(arrays_over(past, four, first), first)
    extended, _ = extend_predictor(network, once, arrays_over(rows.subset(np.arange(30)), four,
                                                            once))
    again, _ = extend_predictor(extended, four, rows.subset(np.arange(30, 60)))
    columns = plan_extension(once, four).arm_map
    before, after = extended.predict(test.embedding), again.predict(test.embedding)
    np.testing.assert_array_equal(after.quality[:, columns], before.quality)
    np.testing.assert_array_equal(after.output_tokens[:, columns], before.output_tokens)
    grown, trained = again.network_, network.network_
    old_arms = plan_extension(first, four).arm_map
    np.testing.assert_array_equal(grown.arm_features.numpy()[old_arms], trained.arm_features)
    np.testing.assert_array_equal(grown.arm_budget.numpy()[old_arms], trained.arm_budget)


def test_a_new_model_with_another_context_than_the_whole_old_pool_is_not_saturated():
    """Every old model had an 8,192-token context, so that feature's spread over the old arms was
    rounding noise (1.8e-15) and the new model's 32,768 standardised to 7.8e14: the frozen arm
    tower saturated and q̂ was 1.0 on every query (the rows' mean quality: 0.41). A feature the
    old pool never varied gets the old arms' value; the new model's embedding row carries it."""
    document = small_catalog(n_models=3).to_dict()
    document["models"][1]["context"] = 32768
    full = catalog_from_dict(document)
    old_pool = without_models(full, ["model-1"])
    past, _ = planted_arrays(full, n_queries=200, dim=16, seed=0)
    rows, _ = planted_arrays(full, n_queries=60, dim=16, seed=3)
    test, _ = planted_arrays(full, n_queries=50, dim=16, seed=9)
    network = make_predictor("r2ray", **KINDS["r2ray"]).fit(arrays_over(past, full, old_pool),
                                                           old_pool)
    extended, _ = extend_predictor(network, full, rows)
    new = plan_extension(old_pool, full).new_arms
    context = extended.network_.arm_features.numpy()[:, 4]
    assert (context[new] == network.network_.arm_features.numpy()[0, 4]).all()
    quality = extended.predict(test.embedding, raw_quality=True).quality[:, new]
    assert abs(quality.mean() - np.nanmean(rows.quality[:, new])) < 0.1, quality.mean()
    assert quality.max() < 0.99


def test_a_monotone_networks_new_budget_chain_shares_one_quality_map():
    """A monotone network's fit gives each model's budget chain one q̂ map (a map per arm lets
    calibrated q̂ fall as the budget grows); its extension fitted the new model's maps without
    the chains, so a new model with ``ARM_ROWS`` rows got a map per arm and its calibrated q̂
    fell from one budget to the next on 6 of 500 test queries (raw q̂: none)."""
    train, _ = planted_arrays(FULL, n_queries=ARM_ROWS + 100, dim=16, seed=0, missing_share=0.0)
    test, _ = planted_arrays(FULL, n_queries=500, dim=16, seed=9)
    network = make_predictor("r2ray", **KINDS["r2ray"]).fit(
        arrays_over(train.subset(np.arange(200)), FULL, OLD), OLD)
    extended, _ = extend_predictor(network, FULL, train)
    chain = next(c for c in budget_chains(FULL, "budgets") if FULL.arms[c[0]].model == NEW)
    groups = extended.quality_calibration_.group[chain]
    assert (groups >= 0).all() and len(set(groups.tolist())) == 1, groups
    quality = extended.predict(test.embedding).quality[:, chain]
    assert (np.diff(quality, axis=1) >= 0).all()


@pytest.mark.parametrize("kind, settings", [
    ("averaged", KINDS["averaged"]),
    ("selected", {"candidates": "per_arm_ridge,carrot_knn_all,averaged"}),
])
def test_an_averaged_needs_the_new_model_in_every_folds_fitting_part(planted, kind, settings):
    """A new model on 2 queries passes the rows' check, but each cross-fitting fold extends the
    average's members, with their calibrations, on the other fold's 1 query: the member's
    extension refused, telling a user who gave 2 queries that the model had outcomes on 1."""
    train, _ = planted
    old = make_predictor(kind, **settings).fit(arrays_over(train, FULL, OLD), OLD)
    if kind == "selected":
        assert old.winner_name_ == "averaged"
    with pytest.raises(ExtensionError, match=r"calibrates an averaged predictor's members on the "
                       r"rows outside each of the 2 cross-fitting folds.*'model-1' \(2 queries, "
                       r"1 outside fold 0\)"):
        extend_predictor(old, FULL, train.subset(np.arange(2)))
    extend_predictor(old, FULL, train.subset(np.arange(6)))   # 4 outside each fold


KNN_PAIR = [{"kind": "carrot_knn_all"}, {"kind": "carrot_knn_default"}]
KNN_LINEAR = [{"kind": "carrot_knn_all"}, {"kind": "carrot_linear_default"}]


@pytest.mark.parametrize("kind, members, arms", [
    ("stacked", KNN_PAIR, "model-1|20, model-1|100, model-1|400, model-1|default"),
    ("averaged", KNN_PAIR, "model-1|20, model-1|100, model-1|400, model-1|default"),
    ("stacked", KNN_LINEAR, "model-1|20, model-1|100, model-1|400"),
    ("averaged", KNN_LINEAR, "model-1|20, model-1|100, model-1|400"),
])
def test_a_composite_whose_members_cover_no_new_arm_is_refused(planted, kind, members, arms):
    """No member covers these new arms (a KNN covers old arms only, carrot_linear_default the
    default arms only), though the composite predicts the old arms of their budgets: the
    extension predicted NaN there (the new model registered, never routed to those arms; with
    KNNs alone its out-of-fold metrics NaN), without a word."""
    train, _ = planted
    old = make_predictor(kind, members=members).fit(arrays_over(train, FULL, OLD), OLD)
    with pytest.raises(ExtensionError, match=rf"the extended '{kind}' predictor predicts no q̂ "
                       rf"for the new arm\(s\) {re.escape(arms)}: none of its members covers"):
        extend_predictor(old, FULL, train.subset(np.arange(30)))
