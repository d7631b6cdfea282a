"""The isotonic calibration of q̂ (r2ray.predictor.quality_calibration) and its report in
`r2ray evaluate` (ECE with and without it)."""

from __future__ import annotations

import json

import numpy as np
from predictor_world import budget_skewed, planted_arrays, small_catalog

from r2ray.evaluation.calibration import quality_calibration
from r2ray.predictor import make_predictor
from r2ray.predictor.diagnostics import calibration_bins, expected_calibration_error
from r2ray.predictor.quality_calibration import (QualityCalibration, fit_quality_calibration,
                                                 isotonic_knots)


def ece(quality_hat, quality):
    return expected_calibration_error(calibration_bins(quality_hat, quality))


def miscalibrated(catalog, n, seed):
    """True probabilities p, a predictor that says p² on model 0 and √p elsewhere, labels ~ p."""
    rng = np.random.default_rng(seed)
    p = rng.random((n, catalog.n_arms))
    model0 = catalog.arm_arrays["model_index"] == 0
    said = np.where(model0, p ** 2, np.sqrt(p)).astype(np.float32)
    labels = (rng.random(p.shape) < p).astype(np.float32)
    return said, labels


def test_pool_adjacent_violators_on_a_hand_case():
    x, y = isotonic_knots(np.array([0.3, 0.1, 0.2, 0.4]), np.array([1.0, 1.0, 0.0, 0.5]))
    # sorted: (0.1, 1), (0.2, 0) violate → one block at x 0.15, y 0.5; then 0.3 → 1; 0.4 → 0.5
    # violates 1 → merged block x 0.35, y 0.75
    np.testing.assert_allclose(x, [0.15, 0.35])
    np.testing.assert_allclose(y, [0.5, 0.75])


def test_ece_drops_on_held_out_rows_and_the_map_is_monotone():
    catalog = small_catalog()
    said, labels = miscalibrated(catalog, 1500, seed=0)  # under ARM_ROWS per arm
    calibration = fit_quality_calibration(said, labels, catalog)
    test_said, test_labels = miscalibrated(catalog, 2000, seed=1)
    before, after = ece(test_said, test_labels), ece(calibration.apply(test_said), test_labels)
    assert before > 0.1 and after < 0.03, (before, after)
    grid = np.repeat(np.linspace(0, 1, 101, dtype=np.float32)[:, None], catalog.n_arms, axis=1)
    mapped = calibration.apply(grid)
    assert (np.diff(mapped, axis=0) >= 0).all()
    assert set(calibration.group.tolist()) == {0, 1, 2}  # one map per model (few rows per arm)


def test_an_arm_with_enough_rows_gets_its_own_map_and_nan_stays_nan():
    catalog = small_catalog()
    said, labels = miscalibrated(catalog, 300, seed=0)
    calibration = fit_quality_calibration(said, labels, catalog, arm_rows=250)
    assert len(set(calibration.group.tolist())) == catalog.n_arms
    holey = said.copy()
    holey[0, 3] = np.nan
    assert np.isnan(calibration.apply(holey)[0, 3])
    empty = fit_quality_calibration(said[:5], labels[:5], catalog)  # too few rows: identity
    assert (empty.group == -1).all()
    np.testing.assert_array_equal(empty.apply(said), said)


def test_json_round_trip_maps_the_same():
    catalog = small_catalog()
    said, labels = miscalibrated(catalog, 500, seed=2)
    calibration = fit_quality_calibration(said, labels, catalog)
    again = QualityCalibration.from_json(json.loads(json.dumps(calibration.to_json())))
    np.testing.assert_array_equal(again.apply(said), calibration.apply(said))


def test_predictors_apply_it_and_report_both_ways():
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=400, dim=16, seed=0)
    test, _ = planted_arrays(catalog, n_queries=200, dim=16, seed=9)
    predictor = make_predictor("per_arm_ridge").fit(train, catalog)
    used = predictor.predict(test.embedding)
    raw = predictor.predict(test.embedding, raw_quality=True)
    np.testing.assert_array_equal(used.output_tokens, raw.output_tokens)
    np.testing.assert_array_equal(used.quality,
                                  predictor.quality_calibration_.apply(raw.quality))
    report = quality_calibration(used.quality, raw.quality, test.quality)
    assert report["ece"] == ece(used.quality, test.quality)
    assert report["ece_uncalibrated"] == ece(raw.quality, test.quality)
    assert sum(report["bins"]["count"]) == np.isfinite(test.quality).sum()


def per_arm_rule(calibration: QualityCalibration, quality: np.ndarray) -> np.ndarray:
    """The map as first written, arm by arm: interp the finite cells, leave the rest."""
    out = np.array(quality, dtype=np.float32, copy=True)
    for j, g in enumerate(calibration.group):
        finite = np.isfinite(out[:, j])
        if g >= 0:
            out[finite, j] = np.interp(out[finite, j], calibration.knots_x[g],
                                       calibration.knots_y[g])
    return out


def odd_quality(rng, n: int, k: int) -> np.ndarray:
    """q̂ [n, K] float32 inside and outside the knots, with NaN, ±inf and -0.0 cells."""
    quality = rng.uniform(-0.2, 1.2, size=(n, k)).astype(np.float32)
    cells = rng.random(quality.shape)
    quality[cells < 0.1] = np.nan
    quality[(cells >= 0.1) & (cells < 0.13)] = np.inf
    quality[(cells >= 0.13) & (cells < 0.16)] = -np.inf
    quality[(cells >= 0.16) & (cells < 0.18)] = -0.0
    return quality


def test_apply_is_bit_identical_to_the_per_arm_rule_on_random_maps():
    """Arm indices found once at construction (slices for adjacent arms, indices for scattered
    ones) map exactly as the per-arm rule does, one row or many."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 30))
        n_maps = int(rng.integers(0, 5))
        group = rng.integers(-1, n_maps, size=k) if n_maps else np.full(k, -1)
        if trial % 3 == 0:
            group = np.sort(group)                 # maps over adjacent arms: slices
        knots = [np.sort(rng.random(int(rng.integers(1, 9)))) for _ in range(max(n_maps, 1))]
        calibration = QualityCalibration(group.astype(np.int64), knots,
                                         [np.sort(rng.random(len(x))) for x in knots])
        quality = odd_quality(rng, int(rng.integers(1, 4)), k)
        got, want = calibration.apply(quality), per_arm_rule(calibration, quality)
        assert got.dtype == np.float32
        assert got.tobytes() == want.tobytes(), trial


def test_apply_is_bit_identical_to_np_interp_on_knots_repeats_and_many_rows():
    """The compiled loop against ``np.interp`` where their arithmetic could part: cells exactly
    on a knot (knots float32-representable), repeated knots, flat and steep pieces, one knot,
    tens of rows, maps shared by scattered arms."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        k, n_maps = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        group = rng.integers(-1, n_maps, size=k)
        knots_x, knots_y = [], []
        for _ in range(n_maps):
            x = np.sort(rng.random(int(rng.integers(1, 12))).astype(np.float32)).astype(np.float64)
            if len(x) > 2 and trial % 4 == 0:
                x[1] = x[2]                                  # a repeated knot
            y = np.sort(rng.random(len(x)))
            if len(y) > 2 and trial % 5 == 0:
                y[1] = y[2]                                  # a flat piece
            knots_x.append(x)
            knots_y.append(y)
        calibration = QualityCalibration(group.astype(np.int64), knots_x, knots_y)
        quality = odd_quality(rng, int(rng.integers(1, 40)), k)
        on_knot = rng.random(quality.shape) < 0.2
        pick = np.concatenate(knots_x)[rng.integers(0, sum(map(len, knots_x)), quality.shape)]
        quality[on_knot] = pick[on_knot].astype(np.float32)
        got, want = calibration.apply(quality), per_arm_rule(calibration, quality)
        assert got.tobytes() == want.tobytes(), trial


def test_apply_is_bit_identical_on_calibrations_loaded_from_disk(tmp_path):
    catalog = small_catalog()
    said, labels = miscalibrated(catalog, 300, seed=0)
    rng = np.random.default_rng(1)
    for arm_rows in (250, 10_000):                 # a map per arm; a map per model
        fitted = fit_quality_calibration(said, labels, catalog, arm_rows=arm_rows)
        path = tmp_path / f"calibration-{arm_rows}.json"
        path.write_text(json.dumps(fitted.to_json()))
        loaded = QualityCalibration.from_json(json.loads(path.read_text()))
        for n in (1, 1, 7):
            quality = odd_quality(rng, n, catalog.n_arms)
            assert loaded.apply(quality).tobytes() == per_arm_rule(fitted, quality).tobytes()


def test_equal_predictions_share_one_knot_at_their_mean_quality():
    rng = np.random.default_rng(0)
    labels = (rng.random(600) < 0.47).astype(np.float64)
    x, y = isotonic_knots(np.full(600, 0.5), labels)   # 600 ties: once 256 groups, rising knots
    np.testing.assert_allclose(x, [0.5])
    np.testing.assert_allclose(y, [labels.mean()])
    said = np.concatenate([rng.uniform(0, 0.9, 600), np.ones(600)])   # saturated q̂ = 1.0
    x, y = isotonic_knots(said, np.concatenate([rng.random(600) < 0.3, labels]).astype(float))
    assert (np.diff(x) > 0).all(), x


def test_a_monotone_predictors_maps_keep_q_non_decreasing_along_its_budget_chains():
    from dataclasses import replace

    from r2ray.predictor.base import ArmPredictions
    from r2ray.predictor.network import budget_chains

    catalog = small_catalog()
    said, labels = budget_skewed(catalog, 3000, seed=0)   # over ARM_ROWS cells per arm
    rows = replace(planted_arrays(catalog, n_queries=3000, dim=4, seed=0)[0], quality=labels)
    for monotone in ("budgets", "budgets+default"):
        predictor = make_predictor("r2ray", monotone=monotone)
        predictor.fit_calibrations(rows, ArmPredictions(said, rows.output_tokens), catalog)
        mapped = predictor.quality_calibration_.apply(said)
        for chain in budget_chains(catalog, monotone):
            assert (np.diff(mapped[:, chain], axis=1) >= 0).all(), (monotone, chain)
    assert len(set(predictor.quality_calibration_.group.tolist())) == 3   # one map per model
    unchained = fit_quality_calibration(said, labels, catalog)   # no chains: a map per arm
    assert len(set(unchained.group.tolist())) == catalog.n_arms
