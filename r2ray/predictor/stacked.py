"""``stacked``: a per-arm convex blend of other predictors' q̂ and t̂ (stacking).

Members are registry entries with their settings. Per arm j the blend is q̂_j = Σ_m w_jm q̂_jm
and log(1 + t̂_j) = Σ_m v_jm log(1 + t̂_jm), with w_j and v_j on the simplex (non-negative, summing
to 1), chosen to minimise the squared error (Brier for q̂) on *out-of-fold* predictions: each
member is fitted ``folds`` times on the other folds and predicts the held-out one, so the weights
reward members that generalise, not those that memorise. The folds are cross-validation's
(:func:`~r2ray.predictor.base.model_fold_ids`: a model with a few queries is spread over two or
more folds, so no member predicts its held-out rows from none of its outcomes). An arm's weights
are shrunk toward the weights pooled over all arms (a prior worth ``PRIOR_CELLS`` cells), so arms
with few outcomes take the pooled blend. The members are then refitted on all of ``train``. Where a member has no
prediction (NaN) the others' weights are renormalised.

The stack's own held-out predictions blend each fold's out-of-fold member predictions with
weights fitted on the other folds' rows only (:func:`cross_fitted_stack`; cross-validation scores
the stack by the same function): its token and quality calibrations and spend simulation, which
sizes the spend guarantee's κ, are fitted on them, with no further refits. Blending with the
weights fitted on every row, as the refitted stack predicts, let each row's weights see its own
label, a small optimism in that view.
"""

from __future__ import annotations

import numpy as np

from r2ray.catalog import Catalog
from r2ray.predictor.base import (ArmPredictions, BasePredictor, HeldOut, check_fold_count,
                                  log_tokens, model_fold_ids, out_of_fold, tokens_from_log,
                                  training_embedding)
from r2ray.predictor.data import BenchArrays

PRIOR_CELLS = 50.0   # strength of the pull of an arm's weights toward the pooled weights
ITERATIONS = 300     # projected-gradient steps of the simplex least squares


def project_simplex(w: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``w`` [K, M] onto the probability simplex."""
    u = -np.sort(-w, axis=1)
    cumulative = np.cumsum(u, axis=1) - 1.0
    index = np.arange(1, w.shape[1] + 1)
    rho = (u - cumulative / index > 0).sum(axis=1)
    theta = cumulative[np.arange(len(w)), rho - 1] / rho
    return np.maximum(w - theta[:, None], 0.0)


def simplex_least_squares(gram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin_w wᵀGw − 2bᵀw on the simplex, per row: ``gram`` [K, M, M], ``target`` [K, M]."""
    k, m = target.shape
    w = np.full((k, m), 1.0 / m)
    step = 1.0 / np.maximum(np.linalg.eigvalsh(gram)[:, -1], 1e-12)  # 1 / Lipschitz / 2
    for _ in range(ITERATIONS):
        gradient = np.einsum("kab,kb->ka", gram, w) - target
        w = project_simplex(w - step[:, None] * gradient)
    return w


def blend_weights(members: list[np.ndarray], observed: np.ndarray) -> np.ndarray:
    """Per-arm convex weights [K, M] from member predictions [N, K] each and outcomes [N, K]
    (NaN: no outcome), minimising the squared error, shrunk toward the pooled weights."""
    p = np.stack(members, axis=2).astype(np.float64)                   # (N, K, M)
    cells = np.isfinite(observed) & np.isfinite(p).all(axis=2)
    p = np.where(cells[..., None], p, 0.0)
    y = np.where(cells, observed, 0.0).astype(np.float64)
    gram = np.einsum("nka,nkb->kab", p, p)                             # (K, M, M)
    target = np.einsum("nka,nk->ka", p, y)                             # (K, M)
    pooled = simplex_least_squares(gram.sum(axis=0)[None], target.sum(axis=0)[None])[0]
    eye = np.eye(len(members))[None]
    return simplex_least_squares(gram + PRIOR_CELLS * eye, target + PRIOR_CELLS * pooled[None])


def blend(members: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Σ_m w_jm · member_m [N, K], renormalised over the members with a finite value; NaN where
    none has one."""
    p = np.stack(members, axis=2).astype(np.float64)
    finite = np.isfinite(p)
    w = np.where(finite, weights[None], 0.0)
    total = w.sum(axis=2)
    plain = np.where(finite, 1.0, 0.0)  # all weights 0 on the finite members: their plain mean
    w = np.where((total > 0)[..., None], w, plain)
    total = w.sum(axis=2)
    value = (w * np.where(finite, p, 0.0)).sum(axis=2) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, value, np.nan).astype(np.float32)


def fit_stack(member_predictions: list[ArmPredictions], train: BenchArrays
              ) -> dict[str, np.ndarray]:
    """Blend weights for q̂ and for log t̂ from out-of-fold member predictions on ``train``."""
    return {"quality_weights": blend_weights([p.quality for p in member_predictions],
                                             train.quality),
            "tokens_weights": blend_weights([log_tokens(p.output_tokens)
                                             for p in member_predictions],
                                            log_tokens(train.output_tokens))}


def apply_stack(member_predictions: list[ArmPredictions],
                weights: dict[str, np.ndarray]) -> ArmPredictions:
    quality = blend([p.quality for p in member_predictions], weights["quality_weights"])
    log_tok = blend([log_tokens(p.output_tokens) for p in member_predictions],
                    weights["tokens_weights"])
    return ArmPredictions(np.clip(quality, 0.0, 1.0), tokens_from_log(log_tok))


def cross_fitted_stack(members: list[ArmPredictions], train: BenchArrays,
                       fold: np.ndarray) -> ArmPredictions:
    """The stack's out-of-fold predictions [N, K] from its members' [N, K] each: per fold, the
    weights are fitted on the other folds' rows, so no row's blend saw its own outcomes."""
    quality = np.full(train.quality.shape, np.nan, dtype=np.float32)
    tokens = np.full(train.quality.shape, np.nan, dtype=np.float32)
    for f in np.unique(fold):
        rows, other = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        weights = fit_stack([m.subset(other) for m in members], train.subset(other))
        blended = apply_stack([m.subset(rows) for m in members], weights)
        quality[rows], tokens[rows] = blended.quality, blended.output_tokens
    return ArmPredictions(quality, tokens)


def member_factory(member: dict, seed: int | None = None):
    """A builder of fresh ``member``s (``{"kind": ..., "settings": {...}}``); one with a ``seed``
    setting it was not given gets ``seed``, the composite's: ``--seed`` reaches a network member."""
    from r2ray.predictor import make_predictor

    settings = dict(member.get("settings", {}))
    if seed is not None and "seed" in make_predictor(member["kind"], **settings).settings():
        settings.setdefault("seed", seed)
    return lambda: make_predictor(member["kind"], **settings)


class StackedPredictor(BasePredictor):
    """A per-arm convex blend of ``members`` (``[{"kind": ..., "settings": {...}}, ...]``)."""

    name = "stacked"

    def __init__(self, members: list[dict] | None = None, folds: int = 3, seed: int = 0):
        self.members = members if members is not None else [
            {"kind": "per_arm_ridge", "settings": {}}, {"kind": "carrot_knn_all", "settings": {}}]
        self.folds, self.seed = folds, seed
        self.members_: list[BasePredictor] | None = None
        self.weights_: dict[str, np.ndarray] | None = None
        self.member_out_of_fold: tuple[list[ArmPredictions], np.ndarray] | None = None
        # (the members' out-of-fold predictions, the [N] folds that made them): given by the
        # caller, else computed in _fit (cross-validation already has them)

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        given, self.member_out_of_fold = self.member_out_of_fold, None
        if given is None:
            check_fold_count(train.n_queries, self.folds, self.name)
            folds = model_fold_ids(train, catalog, self.folds)  # cross-validation's folds
            oof = [out_of_fold(member_factory(m, self.seed), train, catalog, folds)
                   for m in self.members]
        else:
            oof, folds = given
        self.weights_ = fit_stack(oof, train)
        self.out_of_fold_ = (train, cross_fitted_stack(oof, train, folds), folds)
        self.members_ = []
        for member in self.members:
            fitted = member_factory(member, self.seed)()
            fitted.catalog_, fitted.embedding_dim_ = catalog, int(x.shape[1])
            fitted._fit(train, training_embedding(train), catalog, validation)
            self.members_.append(fitted)

    def _held_out_predictions(self, train: BenchArrays, validation: BenchArrays | None
                              ) -> HeldOut:
        """The cross-fitted blend of the members' out-of-fold predictions (no refits), with
        their folds."""
        return self.out_of_fold_

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        return apply_stack([m._predict(x) for m in self.members_], self.weights_)

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        fitted, tensors = {"members": []}, dict(self.weights_)
        for i, member in enumerate(self.members_):
            member_fitted, member_tensors = member._fitted_tensors()
            fitted["members"].append(member_fitted)
            tensors |= {f"member{i}.{name}": value for name, value in member_tensors.items()}
        return fitted, tensors

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.weights_ = {n: tensors[n] for n in ("quality_weights", "tokens_weights")}
        self.members_ = []
        for i, (member, member_fitted) in enumerate(zip(self.members, fitted["members"])):
            restored = member_factory(member, self.seed)()
            restored.catalog_, restored.embedding_dim_ = self.catalog_, self.embedding_dim_
            prefix = f"member{i}."
            restored._restore(member_fitted, {n.removeprefix(prefix): v for n, v in tensors.items()
                                              if n.startswith(prefix)})
            self.members_.append(restored)
