"""Choosing the predictor by cross-validation (r2ray.predictor.selection, `r2ray train --select
cv`): the better candidate wins, the test split is never seen, the CV table is logged, and the
stacked blend puts its weight where the signal is."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import mlflow
import numpy as np
import pytest
from predictor_world import budget_skewed, planted_arrays, planted_bench_table, small_catalog

from r2ray.bench.io import write_table
from r2ray.catalog import save_catalog
from r2ray.cli import main
from r2ray.errors import R2RayError
from r2ray.evaluation.method_scores import is_sampled
from r2ray.predictor import PerArmRidge, load_predictor, make_predictor, save_predictor
from r2ray.predictor.base import fold_ids, model_fold_ids, out_of_fold, router_view
from r2ray.predictor.data import split_indices
from r2ray.predictor.selection import (Candidate, choose, cross_validate, resolve_candidates)
from r2ray.predictor.stacked import blend, blend_weights, member_factory, project_simplex
from r2ray.registry import load_registered
from r2ray.training import TrainConfig, load_training_data


@pytest.fixture(scope="module")
def world():
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=300, dim=16, seed=0)
    return train, catalog


@pytest.mark.parametrize("order", [1, -1])
def test_cross_validation_picks_the_clearly_better_candidate(world, order):
    train, catalog = world
    candidates = [Candidate("ridge", "per_arm_ridge", {}),
                  Candidate("blind", "per_arm_ridge", {"alpha": 1e9})][::order]  # arm means only
    result = cross_validate(train, catalog, candidates, folds=3)
    rows = {row["name"]: row for row in result.table}
    assert result.winner == "ridge" and rows["ridge"]["chosen"] and not rows["blind"]["chosen"]
    assert rows["ridge"]["audc"] > rows["blind"]["audc"] + 0.02
    assert rows["ridge"]["brier"] < rows["blind"]["brier"]
    assert result.out_of_fold["ridge"].quality.shape == train.quality.shape
    assert "← chosen" in next(line for line in result.report().splitlines() if "ridge " in line)


def test_the_uncalibrated_column_is_empty_for_the_average_which_has_no_map_of_its_own(world):
    """The average's q̂ is its members' calibrated q̂: scoring it "without its calibration" would
    report a calibrated number under the uncalibrated heading."""
    train, catalog = world
    candidates = resolve_candidates("per_arm_ridge,carrot_knn_all,averaged", {}, 0)
    rows = {row["name"]: row for row in cross_validate(train, catalog, candidates, folds=3,
                                                       uncalibrated=True).table}
    assert rows["averaged"]["audc_uncalibrated"] is None
    assert 0 < rows["per_arm_ridge"]["audc_uncalibrated"] <= 1
    assert rows["per_arm_ridge"]["audc_uncalibrated"] != rows["per_arm_ridge"]["audc"]


def test_the_cv_table_shows_the_uncalibrated_column_only_when_it_was_measured(world):
    """`r2ray train` never asks for the uncalibrated AUDC (it doubles the scoring time): before
    the fix its printed and logged table had an "uncalibrated" column of "—" on every row."""
    train, catalog = world
    candidates = [Candidate("ridge", "per_arm_ridge", {})]
    header, row = cross_validate(train, catalog, candidates, folds=3).report().splitlines()
    assert "uncalibrated" not in header and "—" not in row
    assert header.split() == ["candidate", "CV", "AUDC", "Brier", "log-tok", "MAE", "ECE", "fit",
                              "s"]
    assert len(row.split()) == 10   # name, AUDC ± std, Brier, MAE, ECE, seconds, ← chosen
    measured = cross_validate(train, catalog, candidates, folds=3, uncalibrated=True).report()
    header, row = measured.splitlines()
    assert "uncalibrated" in header and "—" not in row and len(row.split()) == 11


def test_ties_on_audc_go_to_the_lower_brier_then_token_error():
    table = [{"name": "a", "audc": 0.8000, "brier": 0.20, "log_tokens_mae": 0.1},
             {"name": "b", "audc": 0.7995, "brier": 0.18, "log_tokens_mae": 0.3},
             {"name": "c", "audc": 0.7000, "brier": 0.01, "log_tokens_mae": 0.0}]
    assert choose(table) == "b"                       # within 0.001 of the best: Brier decides
    table[1]["brier"] = 0.20
    table[0]["log_tokens_mae"] = 0.4
    assert choose(table) == "b"                       # same Brier: token error decides
    assert choose(table[:1] + table[2:]) == "a"       # c is not tied: AUDC decides


def test_candidate_sets_and_overrides():
    small = resolve_candidates("small", {"r2ray": {"epochs": 2}}, seed=5)
    assert [c.name for c in small] == ["per_arm_ridge", "carrot_knn_all", "r2ray", "stacked",
                                       "averaged"]
    assert small[2].settings == {"epochs": 2, "seed": 5}
    for composite in small[3:]:
        assert [m["kind"] for m in composite.settings["members"]] == [
            "per_arm_ridge", "carrot_knn_all", "r2ray"]
        assert composite.settings["members"][2]["settings"] == {"epochs": 2, "seed": 5}
    assert [c.name for c in resolve_candidates("per_arm_ridge, carrot_knn_all")] == [
        "per_arm_ridge", "carrot_knn_all"]
    with pytest.raises(R2RayError, match=r"unknown candidate\(s\) \['nope'\]"):
        resolve_candidates("per_arm_ridge,nope")
    for empty in (",", " , ", []):   # was "unknown candidate(s) []"
        with pytest.raises(R2RayError, match=re.escape(f"--candidates {empty!r} names no "
                                                       "candidate; choose a set")):
            resolve_candidates(empty)
    with pytest.raises(R2RayError, match="at least two"):
        resolve_candidates("per_arm_ridge,stacked")
    with pytest.raises(R2RayError, match="averaged candidate needs at least two"):
        resolve_candidates("averaged,per_arm_ridge")


def test_the_average_is_kept_unless_beaten_by_more_than_one_standard_error():
    def row(name, folds, brier=0.2):
        return {"name": name, "audc": float(np.mean(folds)), "audc_folds": folds,
                "brier": brier, "log_tokens_mae": 0.1}
    noisy = [row("ridge", [0.80, 0.70, 0.75]), row("averaged", [0.78, 0.71, 0.74])]
    assert choose(noisy) == "averaged"          # ridge ahead by 0.0067 ± 0.0088: not clearly
    clear = [row("ridge", [0.80, 0.72, 0.76]), row("averaged", [0.78, 0.71, 0.74])]
    assert choose(clear) == "ridge"             # ahead by 0.0167 ± 0.0033
    assert choose(noisy, prefer="nobody") == "ridge"
    assert choose([row("ridge", [0.7, 0.7]), row("averaged", [0.8, 0.8])]) == "averaged"


def test_averaged_is_the_mean_of_its_calibrated_members_and_saves(world, tmp_path):
    train, catalog = world
    members = [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_default"}]   # KNN: default arms
    averaged = make_predictor("averaged", members=members).fit(train, catalog)
    ridge = make_predictor("per_arm_ridge").fit(train, catalog)
    knn = make_predictor("carrot_knn_default").fit(train, catalog)
    x = train.embedding[:40]
    mine, r, k = averaged.predict(x), ridge.predict(x), knn.predict(x)
    both = ~np.isnan(k.quality[0])
    assert both.any() and (~both).any()
    np.testing.assert_allclose(mine.quality[:, both], (r.quality[:, both] + k.quality[:, both]) / 2,
                               rtol=1e-6)
    np.testing.assert_array_equal(mine.quality[:, ~both], r.quality[:, ~both])  # ridge alone
    assert averaged.quality_calibration_ is None        # the members' maps, not a second one
    assert averaged.token_calibration_ is not None and averaged.spend_simulation_ is not None
    save_predictor(averaged, str(tmp_path))
    loaded = load_predictor(str(tmp_path))
    again = loaded.predict(x)
    np.testing.assert_array_equal(again.quality, mine.quality)
    np.testing.assert_array_equal(again.output_tokens, mine.output_tokens)


def test_a_device_override_reaches_an_averages_members_and_a_selections_winner(world, tmp_path):
    from r2ray.predictor.persist import with_device

    train, catalog = world
    network = {"kind": "r2ray", "settings": {"epochs": 1, "rank": 2, "query_hidden": 8,
                                              "joint_hidden": 8, "head_hidden": 8}}
    averaged = make_predictor("averaged", members=[{"kind": "per_arm_ridge"}, network])
    save_predictor(averaged.fit(train, catalog), str(tmp_path / "avg"))
    assert load_predictor(str(tmp_path / "avg")).members_[1].device is None   # as saved
    on_cpu = load_predictor(str(tmp_path / "avg"), device="cpu")
    assert on_cpu.members_[1].device == "cpu"
    np.testing.assert_array_equal(on_cpu.predict(train.embedding[:5]).quality,
                                  averaged.predict(train.embedding[:5]).quality)
    state = {"settings": {"candidates": "small"},
             "fitted": {"winner": "averaged", "kind": "averaged",
                        "settings": {"members": [network, {"kind": "per_arm_ridge"}]}}}
    moved = with_device("selected", state, "cuda:1")
    assert moved["fitted"]["settings"]["members"][0]["settings"]["device"] == "cuda:1"
    assert "device" not in moved["fitted"]["settings"]["members"][1]["settings"]  # Ridge: none
    assert "device" not in network["settings"]                  # the saved state is not changed


@pytest.mark.parametrize("kind", ["stacked", "averaged"])
def test_a_composites_seed_reaches_its_network_member(world, kind):
    """`r2ray train --select none --predictor stacked --seed 5` fitted its r2ray member at seed 0
    whatever --seed said (averaged passed its seed on; stacked did not); one given its own seed
    keeps it."""
    train, catalog = world
    network = {"kind": "r2ray", "settings": {"epochs": 1, "query_hidden": 8, "joint_hidden": 8,
                                              "head_hidden": 8}}

    def member_weights(seed: int, member: dict) -> dict[str, np.ndarray]:
        fitted = make_predictor(kind, members=[{"kind": "per_arm_ridge"}, member], seed=seed)
        return {k: v.numpy() for k, v in
                fitted.fit(train, catalog).members_[1].network_.state_dict().items()}

    zero, five = member_weights(0, network), member_weights(5, network)
    assert not all(np.array_equal(zero[k], five[k]) for k in zero)
    pinned = network | {"settings": network["settings"] | {"seed": 0}}
    kept = member_weights(5, pinned)
    assert all(np.array_equal(zero[k], kept[k]) for k in zero)


def test_stack_weights_follow_the_signal_and_sum_to_one():
    rng = np.random.default_rng(0)
    truth = rng.random((400, 3))
    good, noise = truth + 0.02 * rng.normal(size=truth.shape), rng.random((400, 3))
    weights = blend_weights([noise, good], truth)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-9)
    assert (weights >= 0).all() and (weights[:, 1] > 0.9).all()
    holey = good.copy()
    holey[:, 0] = np.nan                               # a member without arm 0: the other alone
    np.testing.assert_allclose(blend([noise, holey], weights)[:, 0], noise[:, 0], rtol=1e-6)
    np.testing.assert_allclose(project_simplex(np.array([[2.0, 0.0], [0.3, 0.3]])),
                               [[1.0, 0.0], [0.5, 0.5]])


def test_selected_predictor_saves_and_loads_with_its_winner(world, tmp_path):
    train, catalog = world
    predictor = make_predictor("selected", candidates="per_arm_ridge,carrot_knn_all,stacked")
    predictor.fit(train, catalog)
    assert predictor.winner_name_ in {"per_arm_ridge", "carrot_knn_all", "stacked"}
    assert predictor.token_calibration_ is not None and predictor.spend_simulation_ is not None
    assert predictor.quality_calibration_ is not None
    save_predictor(predictor, str(tmp_path))
    loaded = load_predictor(str(tmp_path))
    assert loaded.winner_name_ == predictor.winner_name_
    assert [row["name"] for row in loaded.selection_] == [
        "per_arm_ridge", "carrot_knn_all", "stacked"]
    x = train.embedding[:20]
    np.testing.assert_array_equal(loaded.predict(x).quality, predictor.predict(x).quality)
    np.testing.assert_array_equal(loaded.predict(x).output_tokens,
                                  predictor.predict(x).output_tokens)


@pytest.mark.parametrize("composite", ["averaged", "stacked"])
def test_a_selected_composite_predicts_exactly_as_it_does_fitted_alone(world, composite):
    """A selected composite's calibrations and spend simulation come from cross-validation's
    out-of-fold predictions; fitted alone it must make the same ones. (A selected stack got the
    cross-fitted blend, the stack alone a blend by weights fitted on every row: its q̂ differed
    from the stack fitted alone by up to 0.066 here.)"""
    train, catalog = world
    selected = make_predictor("selected", candidates=f"per_arm_ridge,carrot_knn_all,{composite}",
                              seed=3).fit(train, catalog)
    assert selected.winner_name_ == composite
    assert (selected.quality_calibration_ is None) == (composite == "averaged")  # its members'
    alone = make_predictor(composite, **selected.winner_.settings()).fit(train, catalog)
    mine, theirs = selected.predict(train.embedding), alone.predict(train.embedding)
    np.testing.assert_array_equal(mine.quality, theirs.quality)
    np.testing.assert_array_equal(mine.output_tokens, theirs.output_tokens)
    np.testing.assert_array_equal(selected.spend_simulation_.ratio, alone.spend_simulation_.ratio)


def test_a_selected_average_makes_its_held_out_view_once(world, monkeypatch):
    """Cross-validation averages the members' out-of-fold predictions; the chosen average's fit
    averaged them again (and corrected each by cross-fitted maps) for a view nothing asked for
    (review C). Made once, it is the same view the selection scored and calibrated on."""
    from r2ray.predictor import averaged, selection

    made, average = [], averaged.averaged_out_of_fold

    def counted(*args, **kwargs):
        made.append(1)
        return average(*args, **kwargs)

    monkeypatch.setattr(averaged, "averaged_out_of_fold", counted)
    monkeypatch.setattr(selection, "averaged_out_of_fold", counted)
    train, catalog = world
    selected = make_predictor("selected", candidates="per_arm_ridge,carrot_knn_all,averaged",
                              seed=3).fit(train, catalog)
    assert selected.winner_name_ == "averaged" and len(made) == 1
    rows, view, folds = selected.winner_._held_out_predictions(train, None)
    _, scored, scored_folds = selected.out_of_fold_
    np.testing.assert_array_equal(view.quality, scored.quality)
    np.testing.assert_array_equal(view.output_tokens, scored.output_tokens)
    np.testing.assert_array_equal(folds, scored_folds)
    assert rows is train


def test_a_stacks_held_out_view_never_saw_the_outcomes_of_the_rows_it_predicts(world):
    """The stack's held-out predictions (what its calibrations and spend simulation, hence κ, are
    fitted on) blended each row with weights fitted on every row, its own included: flipping one
    fold's outcomes moved that fold's own held-out q̂ by up to 0.38. Each fold's blend must use
    weights fitted on the other folds only."""
    train, catalog = world
    members = [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"}]
    folds = model_fold_ids(train, catalog, 3)
    oof = [out_of_fold(member_factory(m), train, catalog, folds) for m in members]

    def held_out(arrays):
        stack = make_predictor("stacked", members=members)
        stack.member_out_of_fold = (oof, folds)   # the same member predictions both times
        return stack.fit(arrays, catalog).out_of_fold_[1]

    rows = np.flatnonzero(folds == 0)
    quality = train.quality.copy()
    quality[rows] = 1.0 - quality[rows]
    tokens = train.output_tokens.copy()
    tokens[rows] = tokens[rows] * 10.0
    before, after = held_out(train), held_out(replace(train, quality=quality, output_tokens=tokens))
    np.testing.assert_array_equal(before.quality[rows], after.quality[rows])
    np.testing.assert_array_equal(before.output_tokens[rows], after.output_tokens[rows])
    assert not np.array_equal(before.quality, after.quality)   # the other folds' weights moved


def test_a_selected_averages_raw_quality_is_its_members_before_their_maps(world):
    """``r2ray evaluate`` reports q̂ before calibration from ``predict(raw_quality=True)``; for a
    selected average it must be the members' raw q̂, as the average fitted alone gives it, not
    the calibrated q̂ again (which would report that calibration changed nothing)."""
    train, catalog = world
    selected = make_predictor("selected", candidates="per_arm_ridge,carrot_knn_all,averaged",
                              seed=3).fit(train, catalog)
    alone = make_predictor("averaged", **selected.winner_.settings()).fit(train, catalog)
    mine = selected.predict(train.embedding, raw_quality=True)
    theirs = alone.predict(train.embedding, raw_quality=True)
    np.testing.assert_array_equal(mine.quality, theirs.quality)
    np.testing.assert_array_equal(mine.output_tokens, theirs.output_tokens)
    assert not np.array_equal(mine.quality, selected.predict(train.embedding).quality)


@pytest.mark.parametrize("seed", [0, 7])
def test_selected_predicts_exactly_as_its_winner_fitted_alone(world, seed):
    """The CV folds are the calibrations' folds whatever the seed: a single winner's calibrations
    and spend simulation come from the same out-of-fold predictions its plain fit makes, so the
    registered model equals that baseline bit for bit (a tie is a tie, not calibration noise)."""
    train, catalog = world
    selected = make_predictor("selected", candidates="per_arm_ridge,per_arm_ridge_strong,"
                              "carrot_knn_all", seed=seed).fit(train, catalog)
    winner = selected.winner_
    alone = make_predictor(winner.name, **winner.settings()).fit(train, catalog)
    mine, theirs = selected.predict(train.embedding), alone.predict(train.embedding)
    np.testing.assert_array_equal(mine.quality, theirs.quality)
    np.testing.assert_array_equal(mine.output_tokens, theirs.output_tokens)
    for field in ("spend_per_query_usd", "ratio", "cv", "quality"):
        np.testing.assert_array_equal(getattr(selected.spend_simulation_, field),
                                      getattr(alone.spend_simulation_, field))


@pytest.mark.slow  # an MLflow store and a registered pyfunc version
def test_train_selects_on_the_training_part_only_and_logs_the_table(tmp_path, monkeypatch, capsys):
    catalog = small_catalog()
    table, queries = planted_bench_table(catalog, n_queries=200, dim=16, seed=0)
    write_table(table, str(tmp_path / "bench.parquet"))
    write_table(queries, str(tmp_path / "queries.parquet"))
    save_catalog(catalog, str(tmp_path / "bench.catalog.yaml"))
    seen = []
    original = PerArmRidge._fit

    def recording_fit(self, train, x, catalog, validation):
        seen.extend(train.query_id.tolist())
        return original(self, train, x, catalog, validation)

    monkeypatch.setattr(PerArmRidge, "_fit", recording_fit)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--bench", str(tmp_path / "bench.parquet"), "--queries",
                 str(tmp_path / "queries.parquet"), "--register", "sel", "--tracking-uri",
                 tracking, "--candidates", "per_arm_ridge,per_arm_ridge_strong,carrot_knn_all",
                 "--seed", "3"]) == 0
    report = capsys.readouterr().out
    assert "chosen by 3-fold CV on the training part" in report and "← chosen" in report

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version("sel", "1")
    run = client.get_run(version.run_id)
    registered = load_registered("models:/sel/1", tracking)
    assert registered.predictor.name == "selected"
    assert version.tags["kind"] == "selected"
    assert version.tags["winner"] == registered.predictor.winner_name_
    assert int(run.data.params["n_train"]) == 160 and int(run.data.params["n_test"]) == 40
    arrays = load_training_data(TrainConfig(bench=str(tmp_path / "bench.parquet"),
                                            queries=str(tmp_path / "queries.parquet"),
                                            registered_name="sel")).arrays
    test_ids = set(arrays.query_id[split_indices(arrays, "random", 3, 0.2)[1]])
    assert len(test_ids) == 40 and seen and not test_ids & set(seen)  # never fitted on test
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cv_selection.json", "cv_selection.txt"} <= artifacts
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "cv_selection.json",
                                                       str(tmp_path))).read())
    assert len(logged["data"]) == 3 and run.data.params["cv_winner"] == version.tags["winner"]
    assert "audc_uncalibrated" not in logged["columns"]   # train does not measure it
    for name in ("per_arm_ridge", "per_arm_ridge_strong", "carrot_knn_all"):
        assert 0 < run.data.metrics[f"cv_audc_{name}"] <= 1


def test_the_average_combines_ridge_knn_and_the_network_of_any_set():
    full = {c.name: c for c in resolve_candidates("full")}
    assert [m["kind"] for m in full["averaged"].settings["members"]] == [
        "per_arm_ridge", "carrot_knn_all", "r2ray"]
    assert len(full["stacked"].settings["members"]) == len(full) - 2      # every single one
    fast = {c.name: c for c in resolve_candidates("fast")}
    assert [m["kind"] for m in fast["averaged"].settings["members"]] == [
        "per_arm_ridge", "carrot_knn_all"]
    with pytest.raises(R2RayError, match="averaged candidate needs at least two other candidates "
                                         "of per_arm_ridge"):
        resolve_candidates("per_arm_ridge,per_arm_ridge_strong,averaged")


def with_model_only_on(train, catalog, model: int, queries: np.ndarray):
    """``train`` with the outcomes of ``model`` kept on ``queries`` only (a model run on few)."""
    arms = np.flatnonzero(catalog.arm_arrays["model_index"] == model)
    dropped = np.ix_(~np.isin(np.arange(train.n_queries), queries), arms)
    values = {name: getattr(train, name).copy() for name in ("quality", "output_tokens",
                                                              "cost_usd")}
    for array in values.values():
        array[dropped] = np.nan
    return replace(train, **values)


def test_a_model_run_on_a_few_queries_of_one_fold_is_spread_so_every_fold_fit_sees_it(world):
    """Its queries all dealt to one fold, the fit holding that fold out would predict it from
    none of its outcomes (NaN for ridge, the network's untrained guess) and the CV would score
    candidates on that; the folds move one of its queries (sizes kept) so every fit sees it."""
    train, catalog = world
    few = np.flatnonzero(fold_ids(train.n_queries, 3) == 0)[:5]
    sparse = with_model_only_on(train, catalog, 2, few)
    fold = model_fold_ids(sparse, catalog, 3)
    assert len(np.unique(fold[few])) == 2
    assert (np.bincount(fold) == np.bincount(fold_ids(train.n_queries, 3))).all()
    assert (model_fold_ids(train, catalog, 3) == fold_ids(train.n_queries, 3)).all()  # no move
    result = cross_validate(sparse, catalog, [Candidate("ridge", "per_arm_ridge", {})], folds=3)
    arms = catalog.arm_arrays["model_index"] == 2
    assert np.isfinite(result.out_of_fold["ridge"].quality[np.ix_(few, arms)]).all()


@pytest.mark.parametrize("candidates", ["per_arm_ridge,per_arm_ridge_strong",
                                        "per_arm_ridge,carrot_knn_all,averaged"])
def test_spread_folds_are_the_calibrations_too(world, candidates):
    """A plain fit calibrates on the same spread folds, so the winner fitted alone still predicts
    exactly as ``selected`` does on a bench whose folds had to move a query."""
    train, catalog = world
    sparse = with_model_only_on(train, catalog, 2,
                                np.flatnonzero(fold_ids(train.n_queries, 3) == 0)[:5])
    selected = make_predictor("selected", candidates=candidates).fit(sparse, catalog)
    alone = make_predictor(selected.winner_.name, **selected.winner_.settings()).fit(sparse,
                                                                                       catalog)
    mine, theirs = selected.predict(sparse.embedding), alone.predict(sparse.embedding)
    np.testing.assert_array_equal(mine.quality, theirs.quality)
    np.testing.assert_array_equal(mine.output_tokens, theirs.output_tokens)


def test_a_stack_fitted_alone_spreads_a_model_of_one_fold_as_cross_validation_does(world):
    """Fitted alone (not handed CV's predictions), the stack drew plain ``fold_ids``: a model whose
    few queries all fell in one fold had NaN member predictions there, so its arms' weights and
    the stack's calibrations were fitted on none of its held-out rows."""
    train, catalog = world
    few = np.flatnonzero(fold_ids(train.n_queries, 3) == 0)[:5]
    sparse = with_model_only_on(train, catalog, 2, few)
    stack = make_predictor("stacked", members=[
        {"kind": "per_arm_ridge"}, {"kind": "per_arm_ridge", "settings": {"alpha": 100.0}}])
    _, held_out, _ = stack.fit(sparse, catalog).out_of_fold_
    arms = catalog.arm_arrays["model_index"] == 2
    assert np.isfinite(held_out.quality[np.ix_(few, arms)]).all()


def test_a_model_with_one_training_query_is_refused_by_name(world):
    train, catalog = world
    lone = with_model_only_on(train, catalog, 1, np.array([7]))
    with pytest.raises(R2RayError, match=r"model 'model-1' has \d+ row\(s\) in 1 training query"):
        cross_validate(lone, catalog, [Candidate("ridge", "per_arm_ridge", {})], folds=3)


def test_a_fold_not_sampled_on_a_bench_that_is_scores_only_its_full_queries():
    """Whether a set is sampled (scored by replay) depends on its share of queries with every
    default arm: the whole training part (49%) can be sampled while a fold (58%) is not, and that
    fold must then be scored on its full queries only, as score_predictions scores it."""
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=150, dim=16, seed=1, missing_share=0.21)
    fold = fold_ids(train.n_queries, 3)
    assert is_sampled(train, catalog)
    assert not is_sampled(train.subset(np.flatnonzero(fold == 0)), catalog)
    result = cross_validate(train, catalog, [Candidate("ridge", "per_arm_ridge", {})], folds=3)
    assert len(result.table[0]["audc_folds"]) == 3


def test_a_fold_is_corrected_by_maps_fitted_on_the_other_folds_only(world):
    """Given the out-of-fold predictions' folds, the router's view of a fold's rows is corrected
    by token and quality maps fitted on the other folds' rows alone: changing the outcomes of the
    other rows of that fold (predicted by the same fold model) leaves it as it was. Two random
    folds, as before, put a third of a fold's own rows in the map that corrects it."""
    train, catalog = world
    fold = model_fold_ids(train, catalog, 3)
    predicted = PerArmRidge().fit(train, catalog)._predict(train.embedding)
    row = int(np.flatnonzero(fold == 0)[0])
    others = np.flatnonzero(fold == 0)[1:]
    changed = {name: getattr(train, name).copy() for name in ("quality", "output_tokens")}
    changed["quality"][others] = 1.0 - changed["quality"][others]
    changed["output_tokens"][others] *= 5.0
    before = router_view(predicted, train, catalog, folds=fold)
    after = router_view(predicted, replace(train, **changed), catalog, folds=fold)
    np.testing.assert_array_equal(before.quality[row], after.quality[row])
    np.testing.assert_array_equal(before.output_tokens[row], after.output_tokens[row])


def test_cross_validation_corrects_each_fold_by_maps_of_the_other_folds(world, monkeypatch):
    """Every router view the CV scores (the candidates', the average's members') is cross-fitted
    over the CV folds, not over folds of its own that mix a fold's rows into its map."""
    import r2ray.predictor.averaged as averaged
    import r2ray.predictor.selection as selection

    train, catalog = world
    given = []

    def spy(predicted, rows, catalog, calibrate_quality=True, folds=None, chains=()):
        given.append(folds)
        return router_view(predicted, rows, catalog, calibrate_quality,
                           **({} if folds is None else {"folds": folds}), chains=chains)

    monkeypatch.setattr(selection, "router_view", spy)
    monkeypatch.setattr(averaged, "router_view", spy)
    cross_validate(train, catalog, resolve_candidates("per_arm_ridge,carrot_knn_all,averaged"),
                   uncalibrated=True)
    assert len(given) == 7   # 3 views, 2 uncalibrated, 2 members of the average
    assert all(folds is not None and (folds == model_fold_ids(train, catalog, 3)).all()
               for folds in given)


def folds_given_to_router_view(monkeypatch) -> list:
    """The ``folds`` of every router view a fit takes from now on (base's and the average's)."""
    import r2ray.predictor.averaged as averaged
    import r2ray.predictor.base as base

    given = []

    def spy(predicted, rows, catalog, calibrate_quality=True, folds=None, chains=()):
        given.append(folds)
        return router_view(predicted, rows, catalog, calibrate_quality, folds, chains)

    monkeypatch.setattr(base, "router_view", spy)
    monkeypatch.setattr(averaged, "router_view", spy)
    return given


@pytest.mark.parametrize("kind, settings, folds", [
    ("per_arm_ridge", {}, 3),
    ("averaged", {"members": [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"}]}, 3),
    ("stacked", {"folds": 4}, 4),
    ("selected", {"candidates": "per_arm_ridge,carrot_knn_all,averaged", "folds": 4, "seed": 3},
     4)])
def test_the_spend_simulation_corrects_each_fold_by_maps_of_the_other_folds(world, monkeypatch,
                                                                            kind, settings, folds):
    """The spend simulation (which sizes κ) sees the held-out predictions as the router would:
    each fold's rows corrected by maps fitted on the other folds' rows, the folds whose models
    made them (the calibrations' or the cross-validation's, also for an average's members), not
    two random halves that put a third of a fold's own rows into the map that corrects it."""
    train, catalog = world
    given = folds_given_to_router_view(monkeypatch)
    predictor = make_predictor(kind, **settings).fit(train, catalog)
    assert given and all(f is not None and (f == model_fold_ids(train, catalog, folds)).all()
                         for f in given)
    if kind == "selected":
        assert predictor.winner_name_ == "averaged"   # its members' simulations on the CV folds


def test_a_validation_set_is_one_fit_so_its_simulation_keeps_two_random_halves(world,
                                                                               monkeypatch):
    train, catalog = world
    given = folds_given_to_router_view(monkeypatch)
    PerArmRidge().fit(train.subset(np.arange(200)), catalog, train.subset(np.arange(200, 300)))
    assert given == [None]


def test_a_candidate_whose_fit_raises_is_named(world, monkeypatch):
    """A failed fit stops the selection with the candidate's name (was: the fit's bare error)."""
    train, catalog = world

    def singular(self, *args):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(type(make_predictor("carrot_knn_all")), "_fit", singular)
    with pytest.raises(R2RayError, match=r"candidate 'carrot_knn_all' \(carrot_knn_all, settings "
                                         r"\{\}\) failed to fit: LinAlgError: Singular matrix"):
        cross_validate(train, catalog, resolve_candidates("per_arm_ridge,carrot_knn_all"), folds=3)


def test_a_candidate_that_predicts_nan_is_named_not_a_fold_local_query_index(world, monkeypatch):
    """A fit that diverged (q̂ NaN everywhere) was reported as "query 0 has no arm ...", an index
    into one fold, without the candidate's name."""
    train, catalog = world
    knn = type(make_predictor("carrot_knn_all"))
    predict = knn._predict

    def diverged(self, x):
        return replace(predict(self, x), quality=np.full((len(x), catalog.n_arms), np.nan,
                                                         dtype=np.float32))

    monkeypatch.setattr(knn, "_predict", diverged)
    with pytest.raises(R2RayError, match=r"candidate 'carrot_knn_all' predicted no arm of "
                                         r"query_id 'q\d+' \(nor of \d+ more of the \d+ scored"):
        cross_validate(train, catalog, resolve_candidates("per_arm_ridge,carrot_knn_all"), folds=3)


def test_a_composite_whose_members_a_search_stopped_is_listed_not_dropped(world):
    """ASHA stopping all but one of a composite's members left it out of the CV table, the log and
    the report (MLflow's cv_selection.txt) without a word: asked for, never scored, never said."""
    from r2ray.predictor.selection import sequential_search

    train, catalog = world

    def stops_knn(singles, train, catalog, fold, log):     # as ASHA would, after one fold
        oof, seconds, _ = sequential_search([c for c in singles if c.name != "carrot_knn_all"],
                                            train, catalog, fold, log)
        return oof, seconds, [{"name": "carrot_knn_all", "folds": 1, "audc": 0.5}]

    lines = []
    result = cross_validate(train, catalog, resolve_candidates(
        "per_arm_ridge,carrot_knn_all,stacked,averaged"), folds=3, log=lines.append,
        search=stops_knn)
    assert [row["name"] for row in result.table] == ["per_arm_ridge"]
    for name in ("stacked", "averaged"):
        said = f"{name} not scored: the search stopped all but one of its members"
        assert any(said in line for line in lines)
        assert re.search(rf"^{name} +not scored: the search stopped", result.report(), re.M)
    assert result.unscored == ["stacked", "averaged"]


def test_a_selected_monotone_network_calibrates_q_along_its_budget_chains():
    """A ``selected`` whose winner is a monotone network takes the winner's budget chains: one q̂
    map per chain keeps calibrated q̂ non-decreasing in the budget, as the network's is. Without
    them (a map per arm, 3,000 held-out rows) calibrated q̂ fell from budget 20 to 100."""
    from r2ray.predictor.base import ArmPredictions
    from r2ray.predictor.network import budget_chains

    catalog = small_catalog()
    said, labels = budget_skewed(catalog, 3000, seed=0)
    rows = replace(planted_arrays(catalog, n_queries=3000, dim=4, seed=0)[0], quality=labels)
    selected = make_predictor("selected", candidates=["r2ray"])
    selected.winner_ = make_predictor("r2ray", monotone="budgets")
    selected.fit_calibrations(rows, ArmPredictions(said, rows.output_tokens), catalog)
    mapped = selected.quality_calibration_.apply(said)
    for chain in budget_chains(catalog, "budgets"):
        assert (np.diff(mapped[:, chain], axis=1) >= 0).all(), chain


def test_cross_validation_scores_a_monotone_candidate_with_its_budget_chains(world, monkeypatch):
    """The CV views each candidate with the q̂ maps it would be fitted with: a monotone
    network's router view takes its budget chains, a ridge's none, in its own score and as a
    member of the average (whose members predict with their own maps)."""
    import r2ray.predictor.averaged as averaged
    import r2ray.predictor.selection as selection
    from r2ray.predictor.network import budget_chains

    train, catalog = world
    given = []

    def spy(predicted, rows, catalog, calibrate_quality=True, folds=None, chains=()):
        given.append((id(predicted), [c.tolist() for c in chains]))
        return router_view(predicted, rows, catalog, calibrate_quality, folds, chains)

    monkeypatch.setattr(selection, "router_view", spy)
    monkeypatch.setattr(averaged, "router_view", spy)
    network = {"monotone": "budgets", "epochs": 1, "query_hidden": 8, "joint_hidden": 8,
               "head_hidden": 8}
    result = cross_validate(train, catalog, resolve_candidates(
        "per_arm_ridge,r2ray,averaged", overrides={"r2ray": network}))
    chains = [c.tolist() for c in budget_chains(catalog, "budgets")]
    seen = lambda name: [c for i, c in given if i == id(result.out_of_fold[name])]  # noqa: E731
    assert seen("r2ray") == [chains, chains]          # its score, and as the average's member
    assert seen("per_arm_ridge") == [[], []]


def test_an_averages_held_out_view_takes_a_monotone_members_budget_chains(world, monkeypatch):
    """Fitted alone, the average's held-out view (its spend simulation's) maps a monotone
    member's q̂ along that member's budget chains, as the member predicts."""
    import r2ray.predictor.averaged as averaged
    from r2ray.predictor.network import budget_chains

    train, catalog = world
    given = []

    def spy(predicted, rows, catalog, calibrate_quality=True, folds=None, chains=()):
        given.append([c.tolist() for c in chains])
        return router_view(predicted, rows, catalog, calibrate_quality, folds, chains)

    monkeypatch.setattr(averaged, "router_view", spy)
    network = {"monotone": "budgets", "epochs": 1, "query_hidden": 8, "joint_hidden": 8,
               "head_hidden": 8}
    make_predictor("averaged", members=[{"kind": "per_arm_ridge"},
                                        {"kind": "r2ray", "settings": network}]).fit(train, catalog)
    assert given == [[], [c.tolist() for c in budget_chains(catalog, "budgets")]]
