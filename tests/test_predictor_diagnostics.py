"""Per-arm Brier score, log-token MAE and calibration bins against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r2ray.predictor.diagnostics import (calibration_bins, expected_calibration_error, overall,
                                         per_arm_brier, per_arm_log_token_mae)

NAN = np.nan


def test_brier_per_arm_skips_missing_cells():
    quality_hat = np.array([[0.9, 0.5], [0.2, NAN], [0.6, 0.1]], np.float32)
    quality = np.array([[1.0, 0.0], [0.0, 1.0], [NAN, 1.0]], np.float32)
    brier = per_arm_brier(quality_hat, quality)
    # arm 0: cells 0 and 1 → (0.01 + 0.04) / 2; arm 1: cells 0 and 2 → (0.25 + 0.81) / 2
    np.testing.assert_allclose(brier, [0.025, 0.53], rtol=1e-5)
    # cell-weighted overall: (0.01 + 0.04 + 0.25 + 0.81) / 4
    assert overall(brier, quality_hat, quality) == pytest.approx(0.2775, rel=1e-5)


def test_an_arm_with_no_scored_cell_is_nan_and_left_out_of_the_overall():
    quality_hat = np.array([[0.5, NAN]], np.float32)
    quality = np.array([[1.0, 1.0]], np.float32)
    brier = per_arm_brier(quality_hat, quality)
    assert brier[0] == pytest.approx(0.25) and math.isnan(brier[1])
    assert overall(brier, quality_hat, quality) == pytest.approx(0.25)


def test_log_token_mae():
    tokens_hat = np.array([[99.0], [9.0]], np.float32)
    tokens = np.array([[9.0], [9.0]], np.float32)
    # |log 100 − log 10| = log 10 on the first cell, 0 on the second
    np.testing.assert_allclose(per_arm_log_token_mae(tokens_hat, tokens), [math.log(10) / 2],
                               rtol=1e-5)


def test_calibration_bins_and_error():
    quality_hat = np.array([[0.05, 0.15, 0.95, 0.91]], np.float32)
    quality = np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)
    bins = calibration_bins(quality_hat, quality, n_bins=10)
    assert bins["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins["mean_predicted"][9] == pytest.approx(0.93, rel=1e-5)
    assert bins["mean_observed"][9] == pytest.approx(0.5)
    # |0.05 − 0| + |0.15 − 1| + 2 × |0.93 − 0.5|, over 4 cells
    assert expected_calibration_error(bins) == pytest.approx((0.05 + 0.85 + 0.86) / 4, rel=1e-5)
