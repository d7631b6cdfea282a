"""Mean output tokens from log-space predictions: the one correction every predictor shares.

Every predictor regresses log(1 + tokens), so exp(μ̂) − 1 estimates a geometric-mean-type centre,
which lies below the mean for right-skewed lengths (by exp(σ²/2) for log-normal ones). The solver
sums expected costs, so t̂ must estimate the mean tokens of the arm as sent, E[min(T, max_tokens)].

Duan's smearing, per arm and per quantile bin of t̂: on rows the fit did not see, the factor
s = mean((1 + T) / (1 + t̂)) = mean(exp(r)) of the log residuals r turns 1 + t̂ into an estimate of
E[1 + T], with no assumption on the shape of r; then t̂ ≤ cap, the arm's ``max_tokens`` for an
empty prompt. Binning by t̂ follows residuals that change with t̂: regression to the mean of an
overfitted fit, and answers that bunch below the cap (held-out T already stop there). Measured
(Σ ĉ ÷ Σ realised cost on a held-out 30 %, synthetic world; see issue 10): carrot_linear_all 0.914
before, 1.066 with one factor per arm, 0.997 with four bins; a log-normal capped mean instead cut
at the cap twice (per_arm_ridge 0.974 against 0.995).
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
    smearing: np.ndarray    # [K, N_BINS] float64, mean (1 + T) / (1 + t̂) on held-out rows
    cap_tokens: np.ndarray  # [K] float64, max_tokens each arm is sent with (empty prompt)

    def __post_init__(self):
        """The factors as one flat table and each arm's row start in it, built once when the
        calibration is fitted, extended or loaded: ``mean_tokens`` then picks an arm's factor
        with one index (take_along_axis on the [K, bins] table cost a one-row Serve request,
        with cold caches, ~25 µs more)."""
        object.__setattr__(self, "_factors", self.smearing.ravel())
        object.__setattr__(self, "_row_start",
                           np.arange(len(self.smearing)) * self.smearing.shape[1])

    def mean_tokens(self, tokens_hat: np.ndarray) -> np.ndarray:
        """Geometric-type t̂ [N, K] → mean tokens [N, K] float32, at most the cap; NaN stays NaN.

        Worked in row chunks of about ``CHUNK_CELLS`` cells, so the float64 temporaries stay in
        cache: 100,000 rows × 176 arms took 0.13 s against 0.72 s in one piece (the same values,
        bit for bit), which is what bounds ``predict`` on a GPU, where the network is nearly free
        and this runs on the host (``docs/design.md``, the H200 run)."""
        rows = max(1, CHUNK_CELLS // max(1, tokens_hat.shape[1]))
        out = np.empty(tokens_hat.shape, dtype=np.float32)
        for start in range(0, len(tokens_hat), rows):
            chunk = np.maximum(tokens_hat[start:start + rows], 0.0).astype(np.float64)
            index = self._row_start + (chunk > self.edges[:, 0])     # (rows, K): flat factor index
            for edge in self.edges.T[1:]:
                index += chunk > edge
            mean = (1.0 + chunk) * self._factors.take(index) - 1.0
            # clip as two ufuncs: np.clip's dispatch cost a one-row call ~10 µs cold; same values
            out[start:start + rows] = np.minimum(np.maximum(mean, 0.0), self.cap_tokens)
        return out

    def to_json(self) -> dict:
        return {n: getattr(self, n).tolist() for n in ("edges", "smearing", "cap_tokens")}

    @classmethod
    def from_json(cls, document: dict) -> TokenCalibration:
        return cls(*(np.asarray(document[n], dtype=np.float64)
                     for n in ("edges", "smearing", "cap_tokens")))


def arm_caps_tokens(catalog: Catalog) -> np.ndarray:
    """[K] ``max_tokens`` of each arm for an empty prompt (the context leaves the most room)."""
    return arm_caps(catalog, np.zeros(1, dtype=np.int64))[0].astype(np.float64)


def fit_token_calibration(tokens_hat: np.ndarray, tokens: np.ndarray,
                          catalog: Catalog) -> TokenCalibration:
    """Per-arm t̂ bins and smearing factors from held-out predictions ``tokens_hat`` [M, K]
    (uncorrected) and realised ``tokens`` [M, K] (NaN where unobserved or not predicted)."""
    tokens_hat = np.maximum(tokens_hat, 0.0).astype(np.float64)
    ratio = (1.0 + np.maximum(tokens, 0.0)) / (1.0 + tokens_hat)  # exp(r)
    observed = np.isfinite(ratio)
    n_arms = ratio.shape[1]
    edges = np.full((n_arms, N_BINS - 1), BEYOND_TOKENS)
    smearing = np.full((n_arms, N_BINS), ratio[observed].mean() if observed.any() else 1.0)
    for j in range(n_arms):
        n_bins = min(N_BINS, int(observed[:, j].sum()) // ROWS_PER_BIN)
        if n_bins == 0:
            continue
        hat, r = tokens_hat[observed[:, j], j], ratio[observed[:, j], j]
        edges[j, :n_bins - 1] = np.quantile(hat, np.arange(1, n_bins) / n_bins)
        bins = (hat[:, None] > edges[j][None]).sum(axis=1)
        smearing[j] = [r[bins == b].mean() if (bins == b).any() else r.mean()
                       for b in range(N_BINS)]
    return TokenCalibration(edges, smearing, arm_caps_tokens(catalog))


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
    the old arms (at ``arm_map`` [K_old]) keep ``old``'s bins and factors, the others take
    ``new``'s (fitted over ``catalog`` on the new arms' held-out rows); None: no correction."""
    if old is None and new is None:
        return None
    k = catalog.n_arms
    edges = new.edges.copy() if new is not None else np.full((k, N_BINS - 1), BEYOND_TOKENS)
    smearing = new.smearing.copy() if new is not None else np.ones((k, N_BINS))
    edges[arm_map] = old.edges if old is not None else BEYOND_TOKENS
    smearing[arm_map] = old.smearing if old is not None else 1.0
    return TokenCalibration(edges, smearing, arm_caps_tokens(catalog))
