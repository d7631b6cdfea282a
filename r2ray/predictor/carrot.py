"""CARROT-style baselines (Somerstep et al., 2025): predict each model's quality and cost, separately.

Two estimators on the frozen query embedding, each run on two arm sets:

* ``arms="default"`` — the paper's protocol: only each model's default arm (no length budget) is
  learned and predicted; every budgeted arm is NaN, so a router using it can only pick models.
* ``arms="all"`` — the fair variant: every (model, budget) arm is treated as its own "model".

``carrot_knn_*``: the k nearest training queries by cosine similarity; q̂ is the mean observed
quality of the neighbours, t̂ the mean of their log(1 + tokens), per arm (an arm none of them
has, on a bench with holes: its mean over the training queries that have it).
``carrot_linear_*``: L2-regularised logistic regression on the soft quality labels (per arm,
scikit-learn's at C = 1 / l2; fitted with L-BFGS, all arms at once) and Ridge (α) on
log(1 + tokens), both on the standardised embedding.
"""

from __future__ import annotations

import numpy as np
import torch

from r2ray.catalog import Catalog
from r2ray.predictor.base import (
    ArmPredictions, BasePredictor, column_means, default_arm_mask, expand_arms, log_tokens,
    tokens_from_log)
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.per_arm import fit_ridge
from r2ray.predictor.torch_fit import torch_threads

ARM_SETS = ("default", "all")


def covered_arms(catalog: Catalog, arms: str) -> np.ndarray:
    """Indices of the arms a CARROT baseline learns: default arms only, or all."""
    if arms not in ARM_SETS:
        raise ValueError(f"arms must be one of {ARM_SETS}, got {arms!r}")
    return np.flatnonzero(default_arm_mask(catalog)) if arms == "default" else np.arange(
        catalog.n_arms)


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def masked_neighbour_mean(values: np.ndarray, neighbours: np.ndarray,
                          fallback: np.ndarray | None = None) -> np.ndarray:
    """[Q, k] neighbour rows of values [N, A] (NaN = unobserved) → [Q, A] mean over observed;
    where no neighbour observed a column, ``fallback`` [A] (its training mean), or NaN if None.
    Values with no NaN (a full bench) take one gather and a sum, without the masks (2,048
    queries × 2,000 rows × 176 arms, one thread: 91 → 30 ms per call)."""
    gathered = values[neighbours]                       # (Q, k, A)
    if not np.isnan(values).any():
        return (gathered.sum(axis=1) / np.float32(neighbours.shape[1])).astype(np.float32)
    observed = ~np.isnan(gathered)
    counts = observed.sum(axis=1)
    sums = np.where(observed, gathered, 0.0).sum(axis=1)
    none = np.nan if fallback is None else fallback
    return np.where(counts > 0, sums / np.maximum(counts, 1), none).astype(np.float32)


def nearest_rows(unit_query: np.ndarray, unit_train: np.ndarray, k: int,
                 exclude_self: bool = False, chunk: int = 2048):
    """Yields, chunk by chunk of queries (bounding the (Q, N) similarity matrix), the [q, k]
    indices of each query's ``k`` nearest training rows by cosine (unit rows in, ``k`` clipped to
    what there is); ``exclude_self``: the queries are the training rows, each leaves itself out."""
    k = min(k, len(unit_train) - int(exclude_self))
    for start in range(0, len(unit_query), chunk):
        similarity = unit_query[start:start + chunk] @ unit_train.T
        if exclude_self:
            rows = np.arange(len(similarity))
            similarity[rows, rows + start] = -np.inf
        yield np.argpartition(-similarity, k - 1, axis=1)[:, :k]


class CarrotKNN(BasePredictor):
    def __init__(self, arms: str = "default", k: int = 32, chunk_queries: int = 2048):
        self.arms, self.k, self.chunk_queries = arms, k, chunk_queries
        self.train_: dict[str, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return f"carrot_knn_{self.arms}"

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        arms = covered_arms(catalog, self.arms)
        self.train_ = {"arms": arms.astype(np.int64), "unit_embedding": unit_rows(x),
                       "quality": train.quality[:, arms].astype(np.float32),
                       "log_tokens": log_tokens(train.output_tokens[:, arms])}

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        """Per arm, the neighbours' mean; where none of them has the arm (a bench with holes),
        its mean over the training rows that have it: NaN only on an arm no row has, not on a
        query whose k nearest happen to miss it (a router would never pick the arm there)."""
        t = self.train_
        prior_quality = column_means(t["quality"], fallback=np.nan)
        prior_log_tokens = column_means(t["log_tokens"], fallback=np.nan)
        quality, log_tok = [], []
        for neighbours in nearest_rows(unit_rows(x), t["unit_embedding"], self.k,
                                       chunk=self.chunk_queries):
            quality.append(masked_neighbour_mean(t["quality"], neighbours, prior_quality))
            log_tok.append(masked_neighbour_mean(t["log_tokens"], neighbours, prior_log_tokens))
        n_arms = self.catalog_.n_arms
        a = len(t["arms"])
        quality = np.concatenate(quality) if quality else np.zeros((0, a), np.float32)
        log_tok = np.concatenate(log_tok) if log_tok else np.zeros((0, a), np.float32)
        return ArmPredictions(expand_arms(quality, t["arms"], n_arms),
                              expand_arms(tokens_from_log(log_tok), t["arms"], n_arms))

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, dict(self.train_)

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.train_ = dict(tensors)


def fit_logistic(x: np.ndarray, targets: np.ndarray, l2: float, max_iter: int = 100,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multi-output logistic regression on soft labels in [0, 1] over observed (non-NaN) cells.

    x [N, D], targets [N, A] → (weights [D, A], intercept [A]); loss = (Σ masked BCE
    + l2 / 2 · ‖W‖²) / (observed cells) (intercept unpenalised), minimised with L-BFGS: per
    column, scikit-learn's ``LogisticRegression(C=1 / l2)`` on its observed rows, whatever other
    columns are fitted beside it (a mean BCE over all cells with the penalty over N had scaled
    each column's penalty by the observed cells per row: 16× stronger on 176 arms than on 11).
    A column with no observation gets a NaN intercept, as in :func:`fit_ridge`.
    """
    with torch_threads(threads):
        xt = torch.as_tensor(x, dtype=torch.float32)
        observed = torch.as_tensor(~np.isnan(targets))
        y = torch.as_tensor(np.nan_to_num(targets), dtype=torch.float32)
        weights = torch.zeros(x.shape[1], targets.shape[1], requires_grad=True)
        p = np.clip(column_means(targets, fallback=0.5), 0.02, 0.98)
        intercept = torch.tensor(np.log(p / (1 - p)), dtype=torch.float32, requires_grad=True)
        optimiser = torch.optim.LBFGS([weights, intercept], max_iter=max_iter,
                                      line_search_fn="strong_wolfe")
        n_observed = observed.sum().clamp(min=1)

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                xt @ weights + intercept, y, reduction="none")
            loss = ((bce * observed).sum() + 0.5 * l2 * (weights ** 2).sum()) / n_observed
            loss.backward()
            return loss

        optimiser.step(closure)
    intercept = intercept.detach().numpy()
    intercept[np.isnan(targets).all(axis=0)] = np.nan  # no observation: no prediction
    return weights.detach().numpy(), intercept


class CarrotLinear(BasePredictor):
    def __init__(self, arms: str = "default", l2: float = 1.0, alpha: float = 1.0,
                 max_iter: int = 100, threads: int | None = 1):
        self.arms, self.l2, self.alpha, self.max_iter = arms, l2, alpha, max_iter
        self.threads = threads
        self.coef_: dict[str, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return f"carrot_linear_{self.arms}"

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        arms = covered_arms(catalog, self.arms)
        x_mean, x_scale = x.mean(axis=0), np.where(x.std(axis=0) > 1e-6, x.std(axis=0), 1.0)
        xs = (x - x_mean) / x_scale
        wq, bq = fit_logistic(xs, train.quality[:, arms], self.l2, self.max_iter, self.threads)
        wt, bt = fit_ridge(xs, log_tokens(train.output_tokens[:, arms]), self.alpha)
        self.coef_ = {"arms": arms.astype(np.int64), "x_mean": x_mean.astype(np.float32),
                      "x_scale": x_scale.astype(np.float32), "quality_weights": wq,
                      "quality_intercept": bq, "log_tokens_weights": wt, "log_tokens_intercept": bt}

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        c = self.coef_
        xs = (x - c["x_mean"]) / c["x_scale"]
        quality = 1.0 / (1.0 + np.exp(-(xs @ c["quality_weights"] + c["quality_intercept"])))
        log_tok = xs @ c["log_tokens_weights"] + c["log_tokens_intercept"]
        n_arms = self.catalog_.n_arms
        return ArmPredictions(expand_arms(quality.astype(np.float32), c["arms"], n_arms),
                              expand_arms(tokens_from_log(log_tok), c["arms"], n_arms))

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, dict(self.coef_)

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.coef_ = dict(tensors)
