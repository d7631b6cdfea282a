"""Calibrated q̂: an isotonic map per model, fitted on held-out predictions in ``fit``.

The budget solve trades q̂ against ĉ across models, so q̂ should mean the same in every model's
arms: among arms predicted at 0.7, seven in ten good answers. A network trained with BCE on a few
thousand queries is often over- or under-confident per model. On rows the fit did not see (the
same held-out rows the token calibration uses) the pool-adjacent-violators algorithm fits a
non-decreasing map from q̂ to the observed quality of each model's arms (all budgets pooled; an arm
with at least ``ARM_ROWS`` held-out cells gets a map of its own, unless it is in a monotone
predictor's budget chain), starting from at most ``MAX_POINTS`` equal-count groups of cells sorted
by q̂ (equal q̂ in one group). The map is stored as knots (the
blocks' mean q̂ and mean quality) and applied by linear interpolation between them, so it is
strictly increasing between its first and last knot, keeps the order of queries within an arm,
and clamps outside. Saved in ``predictor.json`` as plain lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from r2ray.catalog import Catalog
from r2ray.predictor.token_calibration import cross_fit

ARM_ROWS = 2000   # held-out cells an arm needs for a map of its own; else its model's map
MIN_ROWS = 30     # fewer held-out cells than this in a model: identity (no map)
MAX_POINTS = 256  # equal-count groups of cells the isotonic fit starts from


def isotonic_knots(predicted: np.ndarray, observed: np.ndarray,
                   max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators on (q̂, quality) pairs → (knot q̂ [B], knot quality [B]), both
    increasing: each block's mean q̂ and mean observed quality. The pairs, sorted by q̂, are first
    pooled into at most ``max_points`` groups of about equal count, which bounds the work and
    smooths the map; equal q̂ values always share a group (:func:`tie_groups`)."""
    order = np.argsort(predicted, kind="stable")
    x_sorted = predicted[order].astype(np.float64)
    y_sorted = observed[order].astype(np.float64)
    groups = tie_groups(x_sorted, max_points)
    sums_x = [float(x_sorted[g].sum()) for g in groups if len(g)]
    sums_y = [float(y_sorted[g].sum()) for g in groups if len(g)]
    counts = [float(len(g)) for g in groups if len(g)]
    values, xs, weights = [], [], []  # stack of blocks: mean y, sum x, count
    for sx, sy, n in zip(sums_x, sums_y, counts):
        values.append(sy / n)
        xs.append(sx)
        weights.append(n)
        while len(values) > 1 and values[-2] >= values[-1]:  # merge violators (and ties)
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            xs[-2] += xs[-1]
            weights[-2] = w
            del values[-1], xs[-1], weights[-1]
    return np.asarray(xs) / np.asarray(weights), np.asarray(values)


def tie_groups(x_sorted: np.ndarray, max_points: int) -> list[np.ndarray]:
    """Indices of ``x_sorted`` (ascending) in at most ``max_points`` groups of about equal count,
    each boundary moved past the run of equal values it would cut. A run cut in two gave two
    blocks at the same q̂ whose labels happened to rise, and the map took the upper block's
    value there: 600 cells at q̂ = 1.0, 47 % good, mapped to 0.54."""
    n = len(x_sorted)
    cuts = [len(part) for part in np.array_split(np.arange(n), max(1, min(max_points, n)))]
    cuts = np.cumsum(cuts)[:-1]
    cuts = np.unique(np.searchsorted(x_sorted, x_sorted[cuts - 1], side="right"))
    return np.split(np.arange(n), cuts[cuts < n])


@njit(cache=True, nogil=True)
def _interp(x, xs, ys, lo, hi):
    """``np.interp(x, xs[lo:hi], ys[lo:hi])`` for one finite float64 ``x``: the same operations
    in the same order as NumPy's C loop, so the same bits. Clamped outside the knots, a knot's
    own value on a knot, else the slope from the left knot (from the right one where the left
    gives NaN)."""
    last = hi - 1
    if x < xs[lo]:
        return ys[lo]
    if x >= xs[last]:
        return ys[last]
    j, n = lo, last - lo                  # the last j < last with xs[j] <= x is in j .. j+n-1
    while n > 1:                          # (branch-free halving: a conditional move per step)
        half = n >> 1
        j = j + half if xs[j + half] <= x else j
        n -= half
    if xs[j] == x:
        return ys[j]
    slope = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
    value = slope * (x - xs[j]) + ys[j]
    if np.isnan(value):
        value = slope * (x - xs[j + 1]) + ys[j + 1]
        if np.isnan(value) and ys[j] == ys[j + 1]:
            value = ys[j]
    return value


@njit(cache=True, nogil=True)
def _apply_maps(out, group, starts, flat_x, flat_y):
    """In place on ``out`` [N, K] float32: each finite cell of an arm with a map (``group`` ≥ 0)
    → its map's value at it, rounded to float32 as ``np.copyto`` rounds."""
    for i in range(out.shape[0]):
        for arm in range(out.shape[1]):
            g = group[arm]
            x = np.float64(out[i, arm])
            if g >= 0 and np.isfinite(x):
                out[i, arm] = np.float32(_interp(x, flat_x, flat_y, starts[g], starts[g + 1]))


@dataclass(frozen=True)
class QualityCalibration:
    group: np.ndarray          # [K] int: which map each arm uses (-1: none)
    knots_x: list[np.ndarray]  # per map: knot q̂, increasing
    knots_y: list[np.ndarray]  # per map: knot quality, increasing

    def __post_init__(self):
        """Every map's knots as one flat table with each map's start in it, built once when the
        calibration is fitted, extended or loaded: ``apply`` then maps every cell in one
        compiled loop, not one ``np.interp`` call per map (176 maps: a one-row Serve request
        took ~330 µs that way, 100,000 rows 0.6 s)."""
        sizes = [len(x) for x in self.knots_x]
        object.__setattr__(self, "_starts", np.cumsum([0, *sizes]).astype(np.int64))
        object.__setattr__(self, "_flat_x", np.concatenate(
            [np.asarray(x, np.float64) for x in self.knots_x]) if sizes else np.zeros(0))
        object.__setattr__(self, "_flat_y", np.concatenate(
            [np.asarray(y, np.float64) for y in self.knots_y]) if sizes else np.zeros(0))
        object.__setattr__(self, "_group", np.ascontiguousarray(self.group, np.int64))

    def apply(self, quality: np.ndarray) -> np.ndarray:
        """q̂ [N, K] → calibrated q̂ [N, K] float32; NaN and ±inf stay, arms without a map
        unchanged. Each finite cell is mapped with ``np.interp``'s arithmetic, bit for bit."""
        out = np.array(quality, dtype=np.float32, copy=True, order="C")
        if out.size and self._flat_x.size:
            _apply_maps(out, self._group, self._starts, self._flat_x, self._flat_y)
        return out

    def to_json(self) -> dict:
        return {"group": self.group.tolist(), "knots_x": [k.tolist() for k in self.knots_x],
                "knots_y": [k.tolist() for k in self.knots_y]}

    @classmethod
    def from_json(cls, document: dict) -> QualityCalibration:
        return cls(np.asarray(document["group"], dtype=np.int64),
                   [np.asarray(k, dtype=np.float64) for k in document["knots_x"]],
                   [np.asarray(k, dtype=np.float64) for k in document["knots_y"]])


def fit_quality_calibration(quality_hat: np.ndarray, quality: np.ndarray, catalog: Catalog,
                            arm_rows: int = ARM_ROWS,
                            chains: Sequence[np.ndarray] = ()) -> QualityCalibration:
    """Maps from held-out predictions ``quality_hat`` [M, K] (uncalibrated) and observed
    ``quality`` [M, K] (NaN where unobserved or not predicted): one per model, one per arm with
    at least ``arm_rows`` cells, except an arm in one of ``chains`` (a monotone head's budget
    chains, :func:`r2ray.predictor.network.budget_chains`): those share their model's map, since
    one non-decreasing map keeps q̂ non-decreasing along the chain and a map per arm does not
    (3,000 held-out rows per arm: calibrated q̂ fell from budget 20 to 100 on every row)."""
    chained = set(np.concatenate(chains).tolist()) if len(chains) else set()
    scored = np.isfinite(quality_hat) & np.isfinite(quality)
    model_of = catalog.arm_arrays["model_index"]
    group = np.full(catalog.n_arms, -1, dtype=np.int64)
    knots_x, knots_y = [], []

    def add(arms: np.ndarray) -> int | None:
        cells = scored[:, arms]
        if cells.sum() < MIN_ROWS:
            return None
        x, y = isotonic_knots(quality_hat[:, arms][cells], quality[:, arms][cells])
        knots_x.append(x)
        knots_y.append(y)
        return len(knots_x) - 1

    for model in np.unique(model_of):
        arms = np.flatnonzero(model_of == model)
        own = [j for j in arms if j not in chained and scored[:, j].sum() >= arm_rows]
        shared = add(np.setdiff1d(arms, own))
        for j in arms:
            mapped = add(np.array([j])) if j in own else shared
            group[j] = -1 if mapped is None else mapped
    return QualityCalibration(group, knots_x, knots_y)


def cross_fitted_quality(quality_hat: np.ndarray, quality: np.ndarray, catalog: Catalog,
                         folds: int | np.ndarray = 2, seed: int = 0,
                         chains: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Calibrated q̂ [M, K] for held-out rows, each row mapped by a calibration fitted on the other
    rows (as :func:`r2ray.predictor.token_calibration.cross_fitted_mean_tokens` does for t̂,
    ``folds`` likewise; ``chains``: :func:`fit_quality_calibration`'s)."""
    return cross_fit(quality_hat, quality, lambda hat, observed, rows: fit_quality_calibration(
        hat, observed, catalog, chains=chains).apply(rows), True, folds, seed)


def extend_quality_calibration(old: QualityCalibration | None, new: QualityCalibration | None,
                               arm_map: np.ndarray, n_arms: int) -> QualityCalibration | None:
    """The calibration of a predictor extended to ``n_arms`` arms (:mod:`r2ray.predictor.extend`):
    old arms (at ``arm_map`` [K_old]) keep ``old``'s maps, the others take ``new``'s (fitted on
    the new arms' held-out rows); an arm with neither stays uncalibrated."""
    if old is None and new is None:
        return None
    group = new.group.copy() if new is not None else np.full(n_arms, -1, dtype=np.int64)
    knots_x = list(new.knots_x) if new is not None else []
    knots_y = list(new.knots_y) if new is not None else []
    group[arm_map] = -1
    if old is not None:
        group[arm_map] = np.where(old.group >= 0, old.group + len(knots_x), -1)
        knots_x += old.knots_x
        knots_y += old.knots_y
    return QualityCalibration(group, knots_x, knots_y)
