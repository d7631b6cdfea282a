"""Mean output tokens from log-space predictions: the one correction every predictor shares.

Every predictor regresses log(1 + tokens), so exp(μ̂) − 1 estimates a geometric-mean-type centre,
which lies below the mean for right-skewed lengths (by exp(σ²/2) for log-normal ones). The solver
sums expected costs, so t̂ must estimate the mean tokens of the arm as sent, E[min(T, max_tokens)].

A smearing factor in the spirit of Duan's, per arm and per quantile bin of t̂: on rows the fit did
not see, s = Σ (1 + T) ÷ Σ (1 + t̂) over the bin (:func:`bin_factor`; an arm with too few rows takes
the mean of exp(r) of the log residuals r over every arm) turns 1 + t̂ into an estimate of
E[1 + T], with no assumption on the shape of r; then t̂ ≤ cap, the arm's ``max_tokens`` for an
empty prompt. Binning by t̂ follows residuals that change with t̂: regression to the mean of an
overfitted fit, and answers that bunch below the cap (held-out T already stop there). Measured
(Σ ĉ ÷ Σ realised cost on a held-out 30 %, synthetic world; see issue 10; measured before
627654a, 2026-12-06, with each bin's factor mean((1 + T) / (1 + t̂)) applied as a step):
carrot_linear_all 0.914 before, 1.066 with one factor per arm, 0.997 with four bins; a
log-normal capped mean instead cut at the cap twice (per_arm_ridge 0.974 against 0.995).

Applied, the bins are joined, not stepped: knots at each bin's mean t̂ and mean tokens
(Σ (1 + T) ÷ Σ (1 + t̂) of the bin times 1 + its mean t̂), pooled where a higher bin's mean falls
below a lower one's, linear between them and, outside, t̂ scaled by the end bin's factor; so the
map is non-decreasing in t̂ by construction (:func:`monotone_knots`). Each bin's factor on its
side of an edge made calibrated t̂ fall by up to 25 % just past an edge (carrot_linear_all, 3,000
synthetic queries), reordering ĉ within an arm. Held-out Σ ĉ ÷ Σ realised moved by at most
0.6 % either way (per_arm_ridge, carrot_linear_all, carrot_knn_all; 4,000 queries, 2 seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.catalog import Catalog
from r2ray.routing import arm_caps

N_BINS = 4            # t̂ bins per arm, when it has ROWS_PER_BIN held-out rows for each
ROWS_PER_BIN = 40     # an arm with fewer held-out rows than this takes the factor pooled over arms
BEYOND_TOKENS = 1e30  # edge of a bin an arm does not use
CHUNK_CELLS = 1 << 16  # cells (rows × arms) mean_tokens works on at once


@dataclass(frozen=True)
class TokenCalibration:
    edges: np.ndarray       # [K, N_BINS − 1] float64, t̂ bin edges (tokens)
    smearing: np.ndarray    # [K, N_BINS] float64, Σ (1 + T) ÷ Σ (1 + t̂) in each bin (held out)
    cap_tokens: np.ndarray  # [K] float64, max_tokens each arm is sent with (empty prompt)
    centres: np.ndarray | None = None  # [K, N_BINS] float64, mean t̂ of each bin (tokens),
                                       # BEYOND_TOKENS for a bin not used; None: saved before it

    def __post_init__(self):
        """The map as one flat table of line segments (1 + t̂ where each starts, E[1 + T] there,
        slope) per arm and each arm's row start in it, built once when the calibration is
        fitted, extended or loaded: ``mean_tokens`` then finds a cell's segment with one index.
        With ``centres``, the segments join the knots of :func:`monotone_knots`; without (files
        saved before them), each bin is a line through 0 of slope s_b: the step rule they were
        saved with, bit for bit."""
        if self.centres is None:
            zero = np.zeros_like(self.smearing)
            bounds, (lower, at_lower, slope) = self.edges, (zero, zero, self.smearing)
        else:
            knot_u, knot_y = monotone_knots(self.centres, self.smearing)
            bounds, (lower, at_lower, slope) = knot_u[:, 1:-1] - 1.0, segments(knot_u, knot_y)
        object.__setattr__(self, "_bounds", np.asarray(bounds, np.float64))
        for name, part in (("_lower", lower), ("_at_lower", at_lower), ("_slope", slope)):
            object.__setattr__(self, name, np.ascontiguousarray(part, np.float64).ravel())
        object.__setattr__(self, "_row_start", np.arange(len(slope)) * slope.shape[1])

    def mean_tokens(self, tokens_hat: np.ndarray) -> np.ndarray:
        """Geometric-type t̂ [N, K] → mean tokens [N, K] float32, at most the cap; NaN stays NaN.
        Non-decreasing in t̂ per arm (:func:`monotone_knots`): ĉ = price × t̂ keeps the order
        of a query's t̂ within an arm, and the cost a query is charged never jumps down.

        Worked in row chunks of about ``CHUNK_CELLS`` cells, so the float64 temporaries stay in
        cache: 100,000 rows × 176 arms took 0.13 s against 0.72 s in one piece (the same values,
        bit for bit), which is what bounds ``predict`` on a GPU, where the network is nearly free
        and this runs on the host (``docs/design.md``, the H200 run)."""
        rows = max(1, CHUNK_CELLS // max(1, tokens_hat.shape[1]))
        out = np.empty(tokens_hat.shape, dtype=np.float32)
        for start in range(0, len(tokens_hat), rows):
            chunk = np.maximum(tokens_hat[start:start + rows], 0.0).astype(np.float64)
            index = self._row_start + (chunk > self._bounds[:, 0])  # (rows, K): flat segment
            for bound in self._bounds.T[1:]:
                index += chunk > bound
            mean = (self._at_lower.take(index) + self._slope.take(index)
                    * (1.0 + chunk - self._lower.take(index)) - 1.0)
            # clip as two ufuncs: np.clip's dispatch cost a one-row call ~10 µs cold; same values
            out[start:start + rows] = np.minimum(np.maximum(mean, 0.0), self.cap_tokens)
        return out

    def to_json(self) -> dict:
        names = ("edges", "smearing", "cap_tokens") + (("centres",) if self.centres is not None
                                                       else ())
        return {n: getattr(self, n).tolist() for n in names}

    @classmethod
    def from_json(cls, document: dict) -> TokenCalibration:
        return cls(*(np.asarray(document[n], dtype=np.float64)
                     for n in ("edges", "smearing", "cap_tokens")),
                   np.asarray(document["centres"], dtype=np.float64)
                   if "centres" in document else None)


def monotone_knots(centres: np.ndarray, smearing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (1 + t̂ [K, N_BINS + 2], E[1 + T] [K, N_BINS + 2]) of a map non-decreasing by
    construction: (0, 0), each used bin's (1 + c_b, (1 + c_b)·s_b) pooled where they fall
    (pool adjacent violators, bins weighted alike: equal-count bins), then knots far out on the
    last one's line through 0, so below the first knot and above the last t̂ is scaled by their
    factor. Each bin's own factor applied on its side of an edge was not monotone: regression to
    the mean gives high-t̂ bins s < 1, and carrot_linear_all's calibrated t̂ fell by up to 25 %
    just across an edge (3,000 synthetic queries)."""
    n_arms, n_bins = smearing.shape
    knot_u = np.empty((n_arms, n_bins + 2))
    knot_y = np.empty((n_arms, n_bins + 2))
    for j in range(n_arms):
        used = centres[j] < BEYOND_TOKENS
        u = list(1.0 + centres[j][used]) or [1.0]
        y = list(np.asarray(u) * smearing[j][used]) if used.any() else [smearing[j][0]]
        pooled_u, pooled_y, weight = [], [], []
        for uu, yy in zip(u, y):
            pooled_u.append(uu), pooled_y.append(yy), weight.append(1.0)
            while len(pooled_y) > 1 and pooled_y[-2] > pooled_y[-1]:
                w = weight[-2] + weight[-1]
                pooled_u[-2] = (pooled_u[-2] * weight[-2] + pooled_u[-1] * weight[-1]) / w
                pooled_y[-2] = (pooled_y[-2] * weight[-2] + pooled_y[-1] * weight[-1]) / w
                weight[-2] = w
                del pooled_u[-1], pooled_y[-1], weight[-1]
        factor = pooled_y[-1] / pooled_u[-1]
        far = BEYOND_TOKENS * np.arange(1, n_bins + 2 - len(pooled_u))
        knot_u[j] = [0.0, *pooled_u, *far]
        knot_y[j] = [0.0, *pooled_y, *(far * factor)]
    return knot_u, knot_y


def segments(knot_u: np.ndarray, knot_y: np.ndarray) -> tuple[np.ndarray, ...]:
    """(lower 1 + t̂, value there, slope) [K, knots − 1] of the lines joining adjacent knots."""
    slope = np.diff(knot_y, axis=1) / np.diff(knot_u, axis=1)
    return knot_u[:, :-1], knot_y[:, :-1], slope


def arm_caps_tokens(catalog: Catalog) -> np.ndarray:
    """[K] ``max_tokens`` of each arm for an empty prompt (the context leaves the most room)."""
    return arm_caps(catalog, np.zeros(1, dtype=np.int64))[0].astype(np.float64)


def fit_token_calibration(tokens_hat: np.ndarray, tokens: np.ndarray,
                          catalog: Catalog) -> TokenCalibration:
    """Per-arm t̂ bins, their smearing factors and mean t̂ from held-out predictions
    ``tokens_hat`` [M, K] (uncorrected) and realised ``tokens`` [M, K] (NaN where unobserved or
    not predicted)."""
    tokens_hat = np.maximum(tokens_hat, 0.0).astype(np.float64)
    ratio = (1.0 + np.maximum(tokens, 0.0)) / (1.0 + tokens_hat)  # exp(r)
    observed = np.isfinite(ratio)
    n_arms = ratio.shape[1]
    edges = np.full((n_arms, N_BINS - 1), BEYOND_TOKENS)
    smearing = np.full((n_arms, N_BINS), ratio[observed].mean() if observed.any() else 1.0)
    centres = np.full((n_arms, N_BINS), BEYOND_TOKENS)
    for j in range(n_arms):
        n_bins = min(N_BINS, int(observed[:, j].sum()) // ROWS_PER_BIN)
        if n_bins == 0:
            continue
        hat, r = tokens_hat[observed[:, j], j], ratio[observed[:, j], j]
        edges[j, :n_bins - 1] = np.quantile(hat, np.arange(1, n_bins) / n_bins)
        bins = (hat[:, None] > edges[j][None]).sum(axis=1)
        smearing[j] = [bin_factor(hat[bins == b], r[bins == b]) if (bins == b).any()
                       else r.mean() for b in range(N_BINS)]
        centres[j] = [hat[bins == b].mean() if (bins == b).any() else BEYOND_TOKENS
                      for b in range(N_BINS)]
    return TokenCalibration(edges, smearing, arm_caps_tokens(catalog), centres)


def bin_factor(tokens_hat: np.ndarray, ratio: np.ndarray) -> float:
    """Σ (1 + T) ÷ Σ (1 + t̂) over a bin's rows (``ratio`` = (1 + T) / (1 + t̂)): the factor
    that takes the bin's mean t̂ (its knot, :func:`monotone_knots`) to its mean tokens. The mean
    of the ratios, weighting the bin's smallest t̂ most, put a bin of t̂ 0–250 whose T averaged
    265 at 4.3 × 126 tokens: that knot above the next bin's, and the two pooled."""
    return float((ratio * (1.0 + tokens_hat)).sum() / (1.0 + tokens_hat).sum())


def cross_fitted_mean_tokens(tokens_hat: np.ndarray, tokens: np.ndarray, catalog: Catalog,
                             folds: int | np.ndarray = 2, seed: int = 0) -> np.ndarray:
    """Mean tokens [M, K] for held-out rows, each row corrected by a calibration fitted on the
    *other* rows: what the router would have seen, for judging the calibrated predictor on the
    same rows the calibration learns from (the spend simulation does). ``folds``: as
    :func:`cross_fit`'s."""
    return cross_fit(tokens_hat, tokens, lambda hat, observed, rows: fit_token_calibration(
        hat, observed, catalog).mean_tokens(rows), False, folds, seed)


def cross_fit(predicted: np.ndarray, observed: np.ndarray, fit_apply, keep: bool = False,
              folds: int | np.ndarray = 2, seed: int = 0) -> np.ndarray:
    """[M, K] float32: each row of ``predicted`` mapped by ``fit_apply(predicted of the other
    folds' rows, observed of those rows, this fold's predicted rows)``; a fold with no other rows
    (M < 2) stays NaN, or as predicted with ``keep``. ``folds``: that many seeded random folds,
    or [M] the fold of each row (out-of-fold predictions: their model's folds, so no row is mapped
    by a calibration fitted on rows its own fold model predicted)."""
    part = (np.asarray(folds) if np.ndim(folds)
            else np.random.default_rng(seed).permutation(len(predicted)) % folds)
    out = (np.array(predicted, dtype=np.float32, copy=True) if keep
           else np.full(predicted.shape, np.nan, dtype=np.float32))
    for fold in np.unique(part):
        rows = part == fold
        if rows.any() and not rows.all():
            out[rows] = fit_apply(predicted[~rows], observed[~rows], predicted[rows])
    return out


def extend_token_calibration(old: TokenCalibration | None, new: TokenCalibration | None,
                             arm_map: np.ndarray, catalog: Catalog) -> TokenCalibration | None:
    """The calibration of a predictor extended to ``catalog`` (:mod:`r2ray.predictor.extend`):
    the old arms (at ``arm_map`` [K_old]) keep ``old``'s bins, factors and centres, the others take
    ``new``'s (fitted over ``catalog`` on the new arms' held-out rows); None: no correction."""
    if old is None and new is None:
        return None
    k = catalog.n_arms
    edges = new.edges.copy() if new is not None else np.full((k, N_BINS - 1), BEYOND_TOKENS)
    smearing = new.smearing.copy() if new is not None else np.ones((k, N_BINS))
    edges[arm_map] = old.edges if old is not None else BEYOND_TOKENS
    smearing[arm_map] = old.smearing if old is not None else 1.0
    return TokenCalibration(edges, smearing, arm_caps_tokens(catalog),
                            extended_centres(old, new, arm_map, k))


def extended_centres(old: TokenCalibration | None, new: TokenCalibration | None,
                     arm_map: np.ndarray, n_arms: int) -> np.ndarray | None:
    """:func:`extend_token_calibration`'s bin centres; None (every arm by the step rule) when the
    old arms' calibration was saved before centres, since one table maps every arm one way."""
    if old is not None and old.centres is None:
        return None
    centres = (new.centres.copy() if new is not None and new.centres is not None
               else np.full((n_arms, N_BINS), BEYOND_TOKENS))
    centres[arm_map] = old.centres if old is not None else BEYOND_TOKENS
    return centres
