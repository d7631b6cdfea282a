"""``r2ray_residual``: per-arm Ridge plus a jointly conditioned residual network."""

from __future__ import annotations

import numpy as np
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.predictor import PerArmRidge, ResidualPredictor, load_predictor, save_predictor
from r2ray.predictor.base import fold_ids
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.residual import (budget_chains, monotone_in_budget, neighbour_means,
                                     out_of_fold_ridge)
from r2ray.predictor.carrot import unit_rows

FAST = {"members": 2, "epochs": 8, "patience": 3, "knn": 16}


@pytest.fixture(scope="module")
def world():
    """(catalogue, 400 training queries, 60 test queries) of the planted world."""
    catalog = small_catalog()
    return (catalog, *(planted_arrays(catalog, n_queries=n, dim=16, seed=seed)[0]
                       for n, seed in ((400, 0), (60, 9))))


def test_fit_predict_contract_and_round_trip(world, tmp_path):
    catalog, train, test = world
    predictor = ResidualPredictor(**FAST).fit(train, catalog)
    prediction = predictor.predict(test.embedding)
    assert prediction.quality.shape == prediction.output_tokens.shape == (60, catalog.n_arms)
    assert prediction.quality.dtype == np.float32
    assert ((prediction.quality >= 0) & (prediction.quality <= 1)).all()
    assert (prediction.output_tokens >= 0).all() and np.isfinite(prediction.output_tokens).all()
    save_predictor(predictor, str(tmp_path / "residual"))
    loaded = load_predictor(str(tmp_path / "residual"))
    assert len(loaded.networks_) == len(predictor.networks_)
    again = loaded.predict(test.embedding)
    np.testing.assert_array_equal(prediction.quality, again.quality)
    np.testing.assert_array_equal(prediction.output_tokens, again.output_tokens)


def test_a_device_override_loads_a_residual_with_its_count_of_networks(world, tmp_path):
    """load_predictor(folder, device="cpu") (the batch job's, Serve's and the pyfunc model's
    load) raised TypeError 'int' object is not iterable for every residual with networks: its
    ``members`` setting (a count, 1 by default) was read as a composite's list of members."""
    catalog, train, test = world
    predictor = ResidualPredictor(**FAST).fit(train, catalog)
    save_predictor(predictor, str(tmp_path))
    loaded = load_predictor(str(tmp_path), device="cpu")
    assert loaded.device == "cpu" and len(loaded.networks_) == len(predictor.networks_) > 0
    np.testing.assert_array_equal(loaded.predict(test.embedding).quality,
                                  predictor.predict(test.embedding).quality)

def test_without_its_residual_it_is_per_arm_ridge(world):
    catalog, train, test = world
    residual = ResidualPredictor(alpha=3.0, members=0, knn=0).fit(train, catalog)
    ridge = PerArmRidge(alpha=3.0).fit(train, catalog)
    assert residual.networks_ == []
    ours, theirs = residual.predict(test.embedding), ridge.predict(test.embedding)
    np.testing.assert_array_equal(ours.quality, theirs.quality)
    np.testing.assert_array_equal(ours.output_tokens, theirs.output_tokens)


def interaction_arrays(catalog, n: int, seed: int) -> tuple[BenchArrays, np.ndarray]:
    """Quality of every arm = 0.5 ± 0.4 tanh(2 x₀x₁) (sign by model): a signal with no linear
    part, the same across arms, so a linear map per arm cannot see it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    sign = np.where(catalog.arm_arrays["model_index"] == 0, 1.0, -1.0)
    truth = (0.5 + 0.4 * np.tanh(2 * x[:, :1] * x[:, 1:2]) * sign).astype(np.float32)
    tokens = np.full(truth.shape, 50.0, np.float32)
    input_tokens = np.full(n, 20.0)
    arrays = BenchArrays(np.array([f"q{i}" for i in range(n)]), np.array(["q"] * n),
                         np.array([""] * n), input_tokens, truth, tokens,
                         catalog.arm_cost_usd(input_tokens, tokens), x)
    return arrays, truth


def test_learns_a_planted_cross_arm_signal_ridge_cannot():
    catalog = small_catalog(budgets=(100, "default"), n_models=2)
    train, _ = interaction_arrays(catalog, 600, seed=0)
    test, truth = interaction_arrays(catalog, 300, seed=1)
    residual = ResidualPredictor(members=1, knn=0, epochs=40).fit(train, catalog)
    ridge = PerArmRidge().fit(train, catalog)
    error = lambda p: float(np.mean((p.predict(test.embedding).quality - truth) ** 2))  # noqa: E731
    assert residual.networks_, "no member beat Ridge on its early-stopping slice"
    assert error(residual) < 0.5 * error(ridge)


def test_base_inputs_never_see_their_own_row(world):
    """The network's inputs on a training row come from fits that left that row out."""
    catalog, train, _ = world
    x = train.embedding
    quality, _ = out_of_fold_ridge(x, train, catalog, alpha=10.0, folds=5, seed=0)
    moved = train.quality.copy()
    moved[0] = np.where(np.isnan(moved[0]), np.nan, 1.0 - moved[0])  # flip row 0's labels
    flipped = BenchArrays(**{**train.__dict__, "quality": moved})
    again, _ = out_of_fold_ridge(x, flipped, catalog, alpha=10.0, folds=5, seed=0)
    np.testing.assert_array_equal(quality[0], again[0])
    unit = unit_rows(x)
    own = neighbour_means(unit, unit, train.quality, k=8, exclude_self=True)
    np.testing.assert_array_equal(own[0], neighbour_means(unit, unit, moved, 8, True)[0])


def test_monotone_option_makes_quality_non_decreasing_in_the_budget(world):
    catalog, _, _ = world                      # budgets 20, 100, 400, default per model
    chains = budget_chains(catalog, "budgets")
    assert [list(c) for c in chains] == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    quality = np.array([[0.5, 0.3, 0.6, 0.2] * 3], np.float32)
    fixed = monotone_in_budget(quality, chains)
    np.testing.assert_allclose(fixed[0, :4], [0.4, 0.4, 0.6, 0.2])  # pooled, default left free
    assert len(budget_chains(catalog, "budgets+default")[0]) == 4
    assert budget_chains(catalog, "none") == []


@pytest.mark.parametrize("settings", [{"members": 0, "knn": 16}, FAST])
def test_an_arm_without_training_outcomes_is_nan_like_ridges(world, settings):
    catalog, train, test = world
    blank = train.quality.copy()
    blank[:, 1] = np.nan                       # arm 1 never observed
    unobserved = BenchArrays(**{**train.__dict__, "quality": blank})
    prediction = ResidualPredictor(**settings).fit(unobserved, catalog).predict(test.embedding)
    ridge = PerArmRidge().fit(unobserved, catalog).predict(test.embedding)
    assert np.isnan(ridge.quality[:, 1]).all()
    assert np.isnan(prediction.quality[:, 1]).all() and np.isnan(prediction.output_tokens[:, 1]).all()
    assert np.isfinite(np.delete(prediction.quality, 1, axis=1)).all()


def test_a_model_on_a_few_queries_of_one_base_fold_gets_a_held_out_base(world):
    """Its queries all in one of the base's folds, the fit holding that fold out never saw the
    model: its rows' base was NaN (read by the network as q̂ 0.5, 0 log tokens) on every cell
    they are trained on. The base folds spread it, as cross-validation's do."""
    catalog, train, _ = world
    arms = np.flatnonzero(catalog.arm_arrays["model_index"] == 2)
    every_arm = ~np.isnan(train.quality[:, arms]).any(axis=1)   # (the folds spread models)
    few = np.flatnonzero((fold_ids(train.n_queries, 5, 0) == 0) & every_arm)[:6]
    sparse = {name: getattr(train, name).copy() for name in ("quality", "output_tokens")}
    for values in sparse.values():
        values[np.ix_(~np.isin(np.arange(train.n_queries), few), arms)] = np.nan
    rows = BenchArrays(**{**train.__dict__, **sparse})
    quality, tokens = out_of_fold_ridge(rows.embedding, rows, catalog, 10.0, folds=5, seed=0)
    assert np.isfinite(quality[np.ix_(few, arms)]).all()
    assert np.isfinite(tokens[np.ix_(few, arms)]).all()
