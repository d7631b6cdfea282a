"""Calibration of a method's numbers against the bench's outcomes. Pure.

Cost: is the predicted cost ĉ an unbiased estimate of the realised cost? The budget solve sums ĉ,
so a method whose ĉ is low on average overspends the budget on the bill. Over the (query, arm)
cells where a method predicts a cost and the bench has the realised one: mean ĉ and mean realised
cost (USD) per arm and per decile of ĉ, and their ratio.

Quality: expected calibration error (ECE) of q̂ — cell-weighted mean |mean q̂ − mean quality| over
ten equal-width bins of q̂ — with and without the predictor's own isotonic calibration, and the
bins themselves (the reliability diagram).
"""

from __future__ import annotations

import numpy as np

from r2ray.predictor.diagnostics import calibration_bins, expected_calibration_error

N_DECILES = 10


def cost_calibration(cost_hat_usd: np.ndarray, cost_usd: np.ndarray,
                     arm_names: list[str]) -> dict:
    """Predicted [N, K] and realised [N, K] USD (NaN: no prediction / no outcome) → overall, per
    arm (arms with a cell) and per decile of ĉ over all cells: ``n``, ``predicted_usd`` and
    ``realised_usd`` (means) and ``ratio`` = predicted ÷ realised (None when realised is 0)."""
    cells = np.isfinite(cost_hat_usd) & np.isfinite(cost_usd)
    per_arm = {arm_names[j]: _block(cost_hat_usd[cells[:, j], j], cost_usd[cells[:, j], j])
               for j in np.flatnonzero(cells.any(axis=0))}
    predicted, realised = cost_hat_usd[cells], cost_usd[cells]
    order = np.argsort(predicted, kind="stable")
    deciles = [_block(predicted[part], realised[part])
               for part in np.array_split(order, max(1, min(N_DECILES, len(order)))) if len(part)]
    return {"overall": _block(predicted, realised), "per_arm": per_arm, "per_decile": deciles}


def _block(predicted: np.ndarray, realised: np.ndarray) -> dict:
    n = len(predicted)
    mean_hat = float(predicted.mean()) if n else None
    mean_real = float(realised.mean()) if n else None
    ratio = mean_hat / mean_real if n and mean_real > 0 else None
    return {"n": n, "predicted_usd": mean_hat, "realised_usd": mean_real, "ratio": ratio}


def quality_calibration(quality_hat: np.ndarray, quality_hat_raw: np.ndarray,
                        quality: np.ndarray) -> dict:
    """q̂ as used [N, K], q̂ before the predictor's calibration [N, K] and observed quality [N, K]
    (NaN: none) → ``ece``, ``ece_uncalibrated`` and both reliability diagrams' bins (lists)."""
    out = {}
    for suffix, values in (("", quality_hat), ("_uncalibrated", quality_hat_raw)):
        bins = calibration_bins(values, quality)
        out[f"ece{suffix}"] = expected_calibration_error(bins)
        out[f"bins{suffix}"] = {k: v.tolist() for k, v in bins.items()}
    return out
