"""Calibrated q̂: an isotonic map per model, fitted on held-out predictions in ``fit``.

The budget solve trades q̂ against ĉ across models, so q̂ should mean the same in every model's
arms: among arms predicted at 0.7, seven in ten good answers. A network trained with BCE on a few
thousand queries is often over- or under-confident per model. On rows the fit did not see (the
same held-out rows the token calibration uses) the pool-adjacent-violators algorithm fits a
non-decreasing map from q̂ to the observed quality of each model's arms (all budgets pooled; an arm
with at least ``ARM_ROWS`` held-out cells gets a map of its own), starting from at most
``MAX_POINTS`` equal-count groups of cells sorted by q̂. The map is stored as knots (the
blocks' mean q̂ and mean quality) and applied by linear interpolation between them, so it is
strictly increasing between its first and last knot, keeps the order of queries within an arm,
and clamps outside. Saved in ``predictor.json`` as plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.catalog import Catalog
from r2ray.predictor.token_calibration import cross_fit

ARM_ROWS = 2000   # held-out cells an arm needs for a map of its own; else its model's map
MIN_ROWS = 30     # fewer held-out cells than this in a model: identity (no map)
MAX_POINTS = 256  # equal-count groups of cells the isotonic fit starts from


def isotonic_knots(predicted: np.ndarray, observed: np.ndarray,
                   max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators on (q̂, quality) pairs → (knot q̂ [B], knot quality [B]), both
    increasing: each block's mean q̂ and mean observed quality. The pairs, sorted by q̂, are first
    pooled into at most ``max_points`` groups of equal count (a group is never split between equal
    q̂ values' neighbours by more than one row), which bounds the work and smooths the map."""
    order = np.argsort(predicted, kind="stable")
    groups = np.array_split(np.arange(len(order)), min(max_points, len(order)))
    x_sorted = predicted[order].astype(np.float64)
    y_sorted = observed[order].astype(np.float64)
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


@dataclass(frozen=True)
class QualityCalibration:
    group: np.ndarray          # [K] int: which map each arm uses (-1: none)
    knots_x: list[np.ndarray]  # per map: knot q̂, increasing
    knots_y: list[np.ndarray]  # per map: knot quality, increasing

    def __post_init__(self):
        """Each map's arms, found once when the calibration is fitted, extended or loaded:
        ``apply`` runs per Serve request, where finding them again (np.unique, flatnonzero per
        map) cost a one-row call ~270 µs with cold caches. A run of adjacent arms (one model's
        arms, in catalogue order) is kept as a slice, so ``apply`` maps it in place."""
        maps = []
        for g in np.unique(self.group[self.group >= 0]):
            arms = np.flatnonzero(self.group == g)
            if arms[-1] - arms[0] == len(arms) - 1:
                arms = slice(int(arms[0]), int(arms[-1]) + 1)
            maps.append((arms, self.knots_x[g], self.knots_y[g]))
        object.__setattr__(self, "_maps", tuple(maps))

    def apply(self, quality: np.ndarray) -> np.ndarray:
        """q̂ [N, K] → calibrated q̂ [N, K] float32; NaN and ±inf stay, arms without a map
        unchanged. One interp per map, not per arm (a one-row Serve request has K arms)."""
        out = np.array(quality, dtype=np.float32, copy=True)
        for arms, knots_x, knots_y in self._maps:
            block = out[:, arms]       # a view for a slice, a copy for scattered arms
            mapped = np.interp(block, knots_x, knots_y)
            if isinstance(arms, slice):
                np.copyto(block, mapped, casting="same_kind", where=np.isfinite(block))
            else:
                out[:, arms] = np.where(np.isfinite(block), mapped, block)
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
                            arm_rows: int = ARM_ROWS) -> QualityCalibration:
    """Maps from held-out predictions ``quality_hat`` [M, K] (uncalibrated) and observed
    ``quality`` [M, K] (NaN where unobserved or not predicted): one per model, one per arm with
    at least ``arm_rows`` cells."""
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
        own = [j for j in arms if scored[:, j].sum() >= arm_rows]
        shared = add(np.setdiff1d(arms, own))
        for j in arms:
            mapped = add(np.array([j])) if j in own else shared
            group[j] = -1 if mapped is None else mapped
    return QualityCalibration(group, knots_x, knots_y)


def cross_fitted_quality(quality_hat: np.ndarray, quality: np.ndarray, catalog: Catalog,
                         folds: int = 2, seed: int = 0) -> np.ndarray:
    """Calibrated q̂ [M, K] for held-out rows, each row mapped by a calibration fitted on the other
    rows (as :func:`r2ray.predictor.token_calibration.cross_fitted_mean_tokens` does for t̂)."""
    return cross_fit(quality_hat, quality, lambda hat, observed, rows: fit_quality_calibration(
        hat, observed, catalog).apply(rows), True, folds, seed)


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
