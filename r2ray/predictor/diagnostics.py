"""How well a predictor's numbers match held-out outcomes, per arm (pure functions, no plotting).

* Brier score: mean (q̂ − quality)² over observed cells (quality labels in [0, 1]); lower is better.
* Log-token MAE: mean |log(1 + t̂) − log(1 + tokens)|; 0.1 ≈ 10% typical error in tokens.
* Calibration: observed cells binned by q̂; mean q̂ against mean quality per bin.
"""

from __future__ import annotations

import numpy as np

from r2ray.catalog import Catalog, budget_label
from r2ray.predictor.base import ArmPredictions, column_means
from r2ray.predictor.data import BenchArrays


def _masked_column_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return column_means(np.where(mask, values, np.nan), fallback=np.nan).astype(np.float64)


def scored_cells(prediction: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """[N, K] bool: both the prediction and the outcome exist."""
    return ~np.isnan(prediction) & ~np.isnan(outcome)


def per_arm_brier(quality_hat: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """[K] Brier score per arm over observed cells; NaN for an arm with none."""
    mask = scored_cells(quality_hat, quality)
    return _masked_column_mean((quality_hat.astype(np.float64) - quality) ** 2, mask)


def per_arm_log_token_mae(tokens_hat: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[K] mean |log(1 + t̂) − log(1 + t)| per arm over observed cells; NaN for an arm with none."""
    mask = scored_cells(tokens_hat, tokens)
    error = np.abs(np.log1p(np.maximum(np.nan_to_num(tokens_hat), 0.0))
                   - np.log1p(np.maximum(np.nan_to_num(tokens), 0.0)))
    return _masked_column_mean(error, mask)


def overall(values: np.ndarray, prediction: np.ndarray, outcome: np.ndarray) -> float:
    """Cell-weighted mean of a per-arm metric (each arm weighted by its scored cells)."""
    counts = scored_cells(prediction, outcome).sum(axis=0)
    keep = counts > 0
    return float(np.average(values[keep], weights=counts[keep])) if keep.any() else float("nan")


def calibration_bins(quality_hat: np.ndarray, quality: np.ndarray,
                     n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of q̂ over [0, 1]: mean q̂, mean quality and cell count per bin."""
    mask = scored_cells(quality_hat, quality)
    predicted, observed = quality_hat[mask].astype(np.float64), quality[mask].astype(np.float64)
    bins = np.clip((predicted * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_predicted = np.bincount(bins, predicted, minlength=n_bins) / count
        mean_observed = np.bincount(bins, observed, minlength=n_bins) / count
    return {"mean_predicted": mean_predicted, "mean_observed": mean_observed, "count": count}


def expected_calibration_error(bins: dict[str, np.ndarray]) -> float:
    """Cell-weighted mean |mean q̂ − mean quality| over the bins."""
    keep = bins["count"] > 0
    gap = np.abs(bins["mean_predicted"][keep] - bins["mean_observed"][keep])
    return float(np.average(gap, weights=bins["count"][keep])) if keep.any() else float("nan")


def per_arm_report(prediction: ArmPredictions, test: BenchArrays,
                   catalog: Catalog) -> dict[str, list]:
    """Columns (one row per arm): model, budget, cells, brier, log_tokens_mae, mean quality vs q̂."""
    observed = scored_cells(prediction.quality, test.quality)
    return {
        "model": [arm.model for arm in catalog.arms],
        "budget": [budget_label(arm.budget_tokens) for arm in catalog.arms],
        "cells": observed.sum(axis=0).astype(int).tolist(),
        "brier": per_arm_brier(prediction.quality, test.quality).tolist(),
        "log_tokens_mae": per_arm_log_token_mae(prediction.output_tokens,
                                                test.output_tokens).tolist(),
        "mean_quality": _masked_column_mean(np.nan_to_num(test.quality), observed).tolist(),
        "mean_quality_hat": _masked_column_mean(np.nan_to_num(prediction.quality),
                                                observed).tolist(),
    }


def summary_metrics(prediction: ArmPredictions, test: BenchArrays) -> dict[str, float]:
    """Cell-weighted test Brier, log-token MAE and calibration error (for MLflow metrics)."""
    brier = per_arm_brier(prediction.quality, test.quality)
    mae = per_arm_log_token_mae(prediction.output_tokens, test.output_tokens)
    return {
        "test_brier": overall(brier, prediction.quality, test.quality),
        "test_log_tokens_mae": overall(mae, prediction.output_tokens, test.output_tokens),
        "test_calibration_error": expected_calibration_error(
            calibration_bins(prediction.quality, test.quality)),
    }
