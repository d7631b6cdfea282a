"""Learning for real: a tiny training run beats the no-information baselines by a clear margin,
early stopping keeps the best validation weights, and training is seeded."""

from __future__ import annotations

import numpy as np
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.predictor import make_predictor
from r2ray.predictor.base import default_arm_mask
from r2ray.predictor.diagnostics import per_arm_brier, overall
from r2ray.predictor.torch_fit import FitSettings, Targets, evaluate_loss, training_schedule


@pytest.fixture(scope="module")
def catalog():
    return small_catalog()


@pytest.fixture(scope="module")
def data(catalog):
    train, _ = planted_arrays(catalog, n_queries=1200, dim=16, seed=0)
    test, truth = planted_arrays(catalog, n_queries=400, dim=16, seed=11)
    return train, test, truth


@pytest.fixture(scope="module")
def r2ray(data, catalog):
    train, _, _ = data
    return make_predictor("r2ray", epochs=15, seed=0).fit(train, catalog)


def brier(quality_hat, test):
    return overall(per_arm_brier(quality_hat, test.quality), quality_hat, test.quality)


def test_r2ray_beats_the_per_arm_mean_on_brier_score(r2ray, data):
    train, test, _ = data
    per_arm_mean = np.broadcast_to(np.nanmean(train.quality, axis=0), test.quality.shape)
    learned = brier(r2ray.predict(test.embedding).quality, test)
    baseline = brier(per_arm_mean.astype(np.float32), test)
    assert learned < baseline - 0.02, (learned, baseline)


def test_routing_on_r2ray_beats_random_at_the_same_cost(r2ray, data, catalog):
    """Per query, among the arms of one price level (each model's default arm at its price), pick
    the best predicted model; compare the true expected quality against a random pick, with the
    same budget level for both so cost is comparable."""
    _, test, truth = data
    quality_hat = r2ray.predict(test.embedding).quality
    arms = np.flatnonzero(default_arm_mask(catalog))
    chosen = arms[np.argmax(quality_hat[:, arms], axis=1)]
    routed = truth[np.arange(test.n_queries), chosen].mean()
    random_pick = truth[:, arms].mean()
    oracle = truth[:, arms].max(axis=1).mean()
    assert routed > random_pick + 0.08, (routed, random_pick, oracle)
    assert routed > oracle - 0.1 * (oracle - random_pick) - 0.05


def test_token_predictions_track_the_budget(r2ray, data, catalog):
    _, test, _ = data
    tokens = r2ray.predict(test.embedding).output_tokens
    error = np.abs(np.log1p(tokens) - np.log1p(test.output_tokens))
    assert np.nanmean(error) < 0.3  # labels carry 10% noise; the per-arm mean alone is far worse
    per_arm_mean = np.nanmean(test.output_tokens, axis=0)
    mean_only = np.abs(np.log1p(per_arm_mean) - np.log1p(test.output_tokens))
    assert np.nanmean(error) < 0.7 * np.nanmean(mean_only)


def test_early_stopping_keeps_the_best_validation_weights(data, catalog):
    train, test, _ = data
    validation = test.subset(np.arange(200))
    predictor = make_predictor("r2ray", epochs=40, patience=2, learning_rate=3e-2, seed=0).fit(
        train.subset(np.arange(300)), catalog, validation)
    history = predictor.history_
    assert history.epochs_run < 40                       # stopped early (tiny data overfits)
    assert history.best_epoch == history.epochs_run - 2  # patience 2 after the best epoch
    best = min(history.validation_loss)
    restored = evaluate_loss(predictor.network_, Targets.from_arrays(
        validation, validation.embedding, "cpu"), FitSettings(batch_size=history.batch_size))
    assert restored == pytest.approx(best, rel=1e-5)


def test_training_is_seeded(data, catalog):
    train, test, _ = data
    small = train.subset(np.arange(200))
    runs = [make_predictor("r2ray", epochs=2, seed=s).fit(small, catalog).predict(test.embedding)
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0].quality, runs[1].quality)
    assert not np.array_equal(runs[0].quality, runs[2].quality)


def test_the_schedule_plans_steps_and_keeps_what_is_given():
    # neither given: ~16 steps a pass (batch a power of two, 128-512), epochs up to the step
    # budget, at most 40
    assert training_schedule(2160, None, None, steps=1000) == (128, 40)    # 17 steps × 40
    assert training_schedule(150, None, None, steps=1000) == (128, 40)     # tiny: 2 steps × 40
    assert training_schedule(16_000, None, None, steps=1000) == (512, 32)  # 32 steps × 32
    assert training_schedule(100_000, None, None, steps=1000) == (512, 6)  # 196 steps × 6
    # given values are kept; epochs alone keep the epoch plan's batch (short fits stay short)
    assert training_schedule(2160, None, 3, steps=1000) == (512, 3)
    assert training_schedule(2160, 64, None, steps=300) == (64, 9)
    assert training_schedule(2160, 64, 5, steps=300) == (64, 5)


def test_the_default_fit_takes_the_planned_steps_and_records_them(data, catalog):
    train, test, _ = data
    predictor = make_predictor("r2ray", steps=12, seed=0).fit(
        train.subset(np.arange(600)), catalog, validation=test.subset(np.arange(100)))
    history = predictor.history_
    assert history.batch_size == 128                       # 600 rows / 16, within 128-512
    assert history.steps_run == history.epochs_run * 5     # 5 batches of ≤ 128 per pass
    assert history.epochs_run <= 3                         # 12 steps → 3 passes at most
    assert predictor.state()[0]["fitted"]["history"]["steps_run"] == history.steps_run
