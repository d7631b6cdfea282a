"""The paper's baselines: independent per-arm heads (its design) and per-arm Ridge (its released code).

``per_arm_mlp``: one MLP per (model, budget) arm on the frozen query embedding, hidden sizes
256/128/64 with a sigmoid quality output (the paper), plus a log-token output so cost can be
computed. The K MLPs share nothing; they are stored as stacked weights (K, in, out) and run as one
grouped einsum, which is the same maths as K separate networks, only faster. It is still the
costliest method: 24M weights at D = 384 and K = 176, about 25 GFLOP forward per 512 queries, so
roughly a minute of one CPU core per epoch over 18k queries; hence few epochs by default.

``per_arm_ridge``: closed-form Ridge (α = 10) per arm on the embedding, for quality (clipped to
[0, 1]) and log(1 + output tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from r2ray.catalog import Catalog
from r2ray.predictor.base import ArmPredictions, BasePredictor, log_tokens, tokens_from_log
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.torch_fit import TorchPredictor, arm_means, input_normalisation


# ---- per-arm MLP heads -------------------------------------------------------------------------
@dataclass
class PerArmConfig:
    embedding_dim: int
    n_arms: int
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64])
    dropout: float = 0.0


class PerArmNet(nn.Module):
    """K independent MLPs, D → 256 → 128 → 64 → (quality logit, log tokens), as stacked weights."""

    def __init__(self, config: PerArmConfig):
        super().__init__()
        self.config = config
        sizes = [config.embedding_dim, *config.hidden, 2]
        self.register_buffer("x_mean", torch.zeros(config.embedding_dim))
        self.register_buffer("x_scale", torch.ones(config.embedding_dim))
        self.register_buffer("arm_observed", torch.ones(config.n_arms, dtype=torch.bool))
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per arm
            self.weights.append(nn.Parameter(
                torch.empty(config.n_arms, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(config.n_arms, fan_out)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) → quality logits (B, K), log(1 + output tokens) (B, K)."""
        x = (x - self.x_mean) / self.x_scale
        h = torch.einsum("bd,kdo->bko", x, self.weights[0]) + self.biases[0]  # (B, K, 256)
        for weight, bias in zip(self.weights[1:], self.biases[1:]):
            h = self.dropout(torch.relu(h))
            h = torch.einsum("bki,kio->bko", h, weight) + bias               # (B, K, out)
        return h[..., 0], h[..., 1]


class PerArmMLP(TorchPredictor):
    name = "per_arm_mlp"
    network_class, config_class = PerArmNet, PerArmConfig

    def __init__(self, hidden: tuple[int, ...] | list[int] = (256, 128, 64), dropout: float = 0.0,
                 epochs: int = 6, batch_size: int = 512, learning_rate: float = 2e-3,
                 weight_decay: float = 1e-4, patience: int = 2, token_weight: float = 0.5,
                 validation_fraction: float = 0.1, seed: int = 0, device: str | None = None,
                 threads: int | None = 1, time_limit_s: float | None = None,
                 precision: str = "auto"):
        self.hidden, self.dropout = list(hidden), dropout
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.weight_decay, self.patience, self.token_weight = weight_decay, patience, token_weight
        self.validation_fraction, self.seed = validation_fraction, seed
        self.device, self.threads, self.time_limit_s = device, threads, time_limit_s
        self.precision = precision

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        """An arm with no training observation has an untrained head: NaN, not a guess."""
        prediction = super()._predict(x)
        unobserved = ~self.network_.arm_observed.numpy()
        prediction.quality[:, unobserved] = prediction.output_tokens[:, unobserved] = np.nan
        return prediction

    def _activation_width(self) -> int:
        # activations are (B, K, 256); no hidden layer: a linear head, (B, K, 2)
        return max(self.network_.config.hidden, default=2)

    def _network_config(self, embedding_dim: int, catalog: Catalog) -> PerArmConfig:
        return PerArmConfig(embedding_dim, catalog.n_arms, list(self.hidden), self.dropout)

    def _initialise(self, network: PerArmNet, train: BenchArrays, catalog: Catalog) -> None:
        """Input normalisation and output biases at each arm's training means."""
        x_mean, x_scale = input_normalisation(train.embedding)
        quality_logit, mean_log_tokens = arm_means(train)
        with torch.no_grad():
            network.x_mean.copy_(torch.as_tensor(x_mean))
            network.x_scale.copy_(torch.as_tensor(x_scale))
            network.arm_observed.copy_(torch.as_tensor(train.mask.any(axis=0)))
            network.biases[-1][:, 0] = torch.as_tensor(quality_logit)
            network.biases[-1][:, 1] = torch.as_tensor(mean_log_tokens)


# ---- per-arm Ridge -------------------------------------------------------------------------------
def fit_ridge(x: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge per target column over its observed (non-NaN) rows, intercept unpenalised.

    x [N, D], targets [N, K] → (weights [D, K], intercept [K]); a column with no observation
    gets zero weights and a NaN intercept. Columns observed on every row share one solve.
    """
    n, d = x.shape
    weights = np.zeros((d, targets.shape[1]), dtype=np.float64)
    intercept = np.full(targets.shape[1], np.nan)
    observed = ~np.isnan(targets)
    full = np.flatnonzero(observed.all(axis=0))
    groups = [(np.arange(n), full)] if full.size else []
    groups += [(np.flatnonzero(observed[:, j]), np.array([j]))
               for j in np.flatnonzero(~observed.all(axis=0) & observed.any(axis=0))]
    for rows, columns in groups:
        xs = x[rows].astype(np.float64)
        ys = targets[np.ix_(rows, columns)].astype(np.float64)
        x_mean, y_mean = xs.mean(axis=0), ys.mean(axis=0)
        xc = xs - x_mean
        gram = xc.T @ xc + alpha * np.eye(d)
        weights[:, columns] = np.linalg.solve(gram, xc.T @ (ys - y_mean))
        intercept[columns] = y_mean - x_mean @ weights[:, columns]
    return weights.astype(np.float32), intercept.astype(np.float32)


def ridge_predict(coef: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q̂ [N, K] clipped to [0, 1], log(1 + t̂) [N, K]) of per-arm Ridge coefficients."""
    quality = np.clip(x @ coef["quality_weights"] + coef["quality_intercept"], 0.0, 1.0)
    return (quality.astype(np.float32),
            (x @ coef["log_tokens_weights"] + coef["log_tokens_intercept"]).astype(np.float32))


def ridge_coef(x: np.ndarray, train: BenchArrays, alpha: float) -> dict[str, np.ndarray]:
    """Per-arm Ridge coefficients of quality and log(1 + tokens) on ``x`` [N, D] (what
    :class:`PerArmRidge` saves; ``r2ray_residual``'s base)."""
    wq, bq = fit_ridge(x, train.quality, alpha)
    wt, bt = fit_ridge(x, log_tokens(train.output_tokens), alpha)
    return {"quality_weights": wq, "quality_intercept": bq,
            "log_tokens_weights": wt, "log_tokens_intercept": bt}


class PerArmRidge(BasePredictor):
    name = "per_arm_ridge"

    def __init__(self, alpha: float = 10.0):
        self.alpha = alpha
        self.coef_: dict[str, np.ndarray] | None = None

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        self.coef_ = ridge_coef(x, train, self.alpha)

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        quality, log_tok = ridge_predict(self.coef_, x)
        return ArmPredictions(quality, tokens_from_log(log_tok))

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, dict(self.coef_)

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.coef_ = dict(tensors)
