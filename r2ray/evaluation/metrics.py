"""Deferral-curve metrics: pure functions over arrays, tested on hand-computed cases.

Definitions (DESIGN.md, "Evaluation"):

- A method states, per (query, arm), a predicted quality q̂ and a predicted cost ĉ in USD; NaN means
  the method cannot use that arm. For a trade-off λ (quality per USD) it picks, per query,
  ``argmax_j q̂_ij − λ ĉ_ij`` (ties within 1e-9 go to the lower ĉ, then the lower arm index).
- Its *point* at λ is (mean realised cost in USD per query, mean realised quality) of those picks,
  taken from the bench's true outcomes. Only arms the bench has an outcome for can be picked.
- Its *deferral curve* is the upper-left Pareto frontier of its points (cost and quality both
  strictly increasing), linearly interpolated between them.
- Normalised cost ``x = (c − c_min) / (c_max − c_min)``, with bounds stated by the caller (the
  cheapest and dearest point over a fixed set of methods).
- AUDC = ∫₀¹ Q(x) dx, where Q is 0 left of the curve's cheapest point (the method cannot be that
  cheap) and flat at its last (peak) quality right of its dearest point.
- QNC = the smallest normalised cost at which Q reaches a target quality (1.0 if it never does).
- Peak = the highest quality on the curve.
- Cost ratio at quality q against a baseline B = cost_B(q) / cost_method(q): above 1 means the
  method is cheaper. ``inf`` when only B never reaches q, None when the method never reaches q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIE_TOLERANCE = 1e-9
"""Scores closer than this (quality units) count as a tie, broken towards the cheaper arm."""


def lambda_grid(low: float = 1e-2, high: float = 1e9, per_decade: int = 8) -> np.ndarray:
    """The λ grid (quality per USD): 0, then log-spaced from ``low`` to ``high``.

    Per-query costs run ~1e-6..1e-2 USD and quality gaps ~1e-3..1, so λ=0 picks the best arm and
    λ=1e9 the cheapest (any cost gap above 1e-9 USD outweighs the whole quality range).
    """
    decades = np.log10(high) - np.log10(low)
    return np.concatenate([[0.0], np.logspace(np.log10(low), np.log10(high),
                                              int(round(decades * per_decade)) + 1)])


def choose_arms(quality: np.ndarray, cost_usd: np.ndarray, lam: float) -> np.ndarray:
    """Arm index [N] maximising q̂ − λ ĉ over the available arms of each query; -1 if none.

    ``quality`` and ``cost_usd`` are [N, K]; an arm is available where both are finite.
    """
    available = np.isfinite(quality) & np.isfinite(cost_usd)
    score = np.where(available, quality - lam * cost_usd, -np.inf)
    best = score.max(axis=1, keepdims=True)
    tied = available & (score >= best - TIE_TOLERANCE)
    choice = np.where(tied, cost_usd, np.inf).argmin(axis=1)
    return np.where(available.any(axis=1), choice, -1)


def deferral_points(quality: np.ndarray, cost_usd: np.ndarray, true_quality: np.ndarray,
                    true_cost_usd: np.ndarray, lambdas: np.ndarray,
                    replay: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mean realised cost USD [L], mean realised quality [L]), one point per λ.

    Full information (``replay=False``): predictions are masked to the arms the bench has (finite
    ``true_quality``); a query left with no usable arm is a ValueError (the caller must drop it
    or give the method an arm there).

    Replay (``replay=True``, for a bench whose arms were dealt per query, ``bench collect --arms
    K``): the method picks among all the arms it can use, and the point is the mean over the
    queries whose pick the bench has (the replay estimator of Li et al., 2011: unbiased when the
    dealt arms do not depend on the query). A λ whose picks the bench never has gives NaN.
    """
    usable = quality if replay else np.where(np.isfinite(true_quality), quality, np.nan)
    rows = np.arange(quality.shape[0])
    costs, qualities = np.empty(len(lambdas)), np.empty(len(lambdas))
    for i, lam in enumerate(lambdas):
        choice = choose_arms(usable, cost_usd, float(lam))
        if replay:
            picked = np.flatnonzero(choice >= 0)
            seen = picked[np.isfinite(true_quality[picked, choice[picked]])]
            costs[i], qualities[i] = (np.nan, np.nan) if len(seen) == 0 else (
                true_cost_usd[seen, choice[seen]].mean(), true_quality[seen, choice[seen]].mean())
            continue
        if (choice < 0).any():
            raise ValueError(f"query {int(np.argmax(choice < 0))} has no arm that is both "
                             "available to the method and present in the bench")
        costs[i] = true_cost_usd[rows, choice].mean()
        qualities[i] = true_quality[rows, choice].mean()
    return costs, qualities


@dataclass(frozen=True)
class DeferralCurve:
    """Upper-left Pareto frontier: cost (USD per query) and quality both strictly increasing."""

    cost_usd: np.ndarray
    quality: np.ndarray

    def __post_init__(self) -> None:
        if len(self.cost_usd) == 0 or len(self.cost_usd) != len(self.quality):
            raise ValueError("a deferral curve needs one or more (cost, quality) points")


def deferral_curve(cost_usd: np.ndarray, quality: np.ndarray) -> DeferralCurve:
    """The frontier of a set of points: drop every point another beats on cost and quality."""
    cost_usd, quality = np.asarray(cost_usd, float), np.asarray(quality, float)
    seen = np.isfinite(cost_usd) & np.isfinite(quality)   # replay: a λ no query could score
    cost_usd, quality = cost_usd[seen], quality[seen]
    order = np.lexsort((-quality, cost_usd))  # cost ascending, best quality first on a tie
    keep, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            keep.append(i)
            best = quality[i]
    return DeferralCurve(cost_usd[keep], quality[keep])


def peak(curve: DeferralCurve) -> float:
    return float(curve.quality[-1])


def cost_at_quality(curve: DeferralCurve, quality: float) -> float | None:
    """Lowest cost (USD per query) at which the interpolated curve reaches ``quality``; None if never."""
    if quality > curve.quality[-1]:
        return None
    i = int(np.argmax(curve.quality >= quality))
    if i == 0:
        return float(curve.cost_usd[0])
    q0, q1 = curve.quality[i - 1], curve.quality[i]
    c0, c1 = curve.cost_usd[i - 1], curve.cost_usd[i]
    return float(c0 + (quality - q0) / (q1 - q0) * (c1 - c0))


def normalise_cost(cost_usd: np.ndarray | float, cost_min_usd: float, cost_max_usd: float,
                   log_cost: bool = False) -> np.ndarray:
    """Min–max normalised cost (of log10 cost with ``log_cost``); all zero when the bounds coincide."""
    cost = np.asarray(cost_usd, dtype=float)
    if log_cost:
        cost = np.log10(cost)
        cost_min_usd, cost_max_usd = np.log10(cost_min_usd), np.log10(cost_max_usd)
    span = cost_max_usd - cost_min_usd
    return np.zeros_like(cost) if span <= 0 else (cost - cost_min_usd) / span


def audc(curve: DeferralCurve, cost_min_usd: float, cost_max_usd: float,
         log_cost: bool = False) -> float:
    """Area under quality vs normalised cost over [0, 1] (0 left of the curve, flat right of it).

    ``log_cost`` normalises log10 cost instead (all costs must be positive): a supplementary
    reading for cost ranges spanning decades, where the linear scale crowds every curve into
    the first few percent.
    """
    if log_cost and (cost_min_usd <= 0 or curve.cost_usd[0] <= 0):
        return float("nan")
    x = normalise_cost(curve.cost_usd, cost_min_usd, cost_max_usd, log_cost)
    q = curve.quality
    x0 = x[0]
    grid = np.unique(np.clip(np.concatenate([[0.0, 1.0], x]), 0.0, 1.0))
    left, right = grid[:-1], grid[1:]
    # Q is linear inside each interval; the only jump is 0 -> q[0] at x0.
    at_left = np.where(left >= x0, np.interp(left, x, q), 0.0)
    at_right = np.where(right > x0, np.interp(right, x, q), 0.0)
    return float(np.sum((right - left) * (at_left + at_right) / 2))


def qnc(curve: DeferralCurve, target_quality: float, cost_min_usd: float,
        cost_max_usd: float) -> float:
    """Normalised cost where the curve first reaches ``target_quality``; 1.0 if it never does."""
    cost = cost_at_quality(curve, target_quality)
    if cost is None:
        return 1.0
    return float(np.clip(normalise_cost(cost, cost_min_usd, cost_max_usd), 0.0, 1.0))


def cost_ratio_at_quality(curve: DeferralCurve, baseline: DeferralCurve,
                          quality: float) -> float | None:
    """cost_baseline(q) / cost_curve(q): how many times cheaper the curve reaches ``quality``.

    None when the curve never reaches it; ``inf`` when only the baseline never does (or the
    curve gets there for free).
    """
    mine = cost_at_quality(curve, quality)
    if mine is None:
        return None
    theirs = cost_at_quality(baseline, quality)
    if theirs is None:
        return float("inf")
    if mine <= 0:
        return 1.0 if theirs <= 0 else float("inf")
    return theirs / mine


def cost_bounds(curves: list[DeferralCurve]) -> tuple[float, float]:
    """(cheapest, dearest) point cost in USD over a set of curves: the normalisation bounds."""
    return (float(min(c.cost_usd[0] for c in curves)),
            float(max(c.cost_usd[-1] for c in curves)))
