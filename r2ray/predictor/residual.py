"""``r2ray_residual``: the joint network as a shrunk correction of per-arm Ridge, for small data.

With a few thousand labelled queries a linear map per arm is the right bias (per-arm Ridge ties or
beats the joint network on every real bench we have), so this predictor starts *from* it:

1. **Base**: per-arm Ridge (:func:`r2ray.predictor.per_arm.fit_ridge`) on the embedding, for q̂ and
   log(1 + t̂). The network sees the base's *out-of-fold* predictions on its training rows
   (``base_folds``-fold), so it learns how Ridge errs on queries it did not see, not its in-sample
   fit; at predict time the base is refitted on every training row.
2. **Neighbour outcomes** (``knn`` > 0): per arm, the mean observed quality and log tokens of
   the ``knn`` nearest training queries by cosine (CARROT's KNN signal; leave-self-out on the
   training rows). The base becomes a per-arm convex blend of Ridge and the neighbours
   (:func:`r2ray.predictor.stacked.fit_stack` on their out-of-fold predictions), and the
   neighbours' quality is a network input too.
3. **Residual**: a jointly conditioned network (:class:`r2ray.predictor.network.R2Net`) on
   [embedding, base logit, base log tokens, neighbour quality] whose output is *added* to the
   base (quality in logit space). Its last layer starts at zero, so training starts at the base;
   a member whose early-stopping loss never beats its starting (base) loss is dropped.
   ``members`` such networks (seeds ``seed``, ``seed + 1``, …, each with its own early-stopping
   slice) are averaged in logit space. ``members=0, knn=0`` is per-arm Ridge exactly.

``monotone`` (``budgets`` / ``budgets+default``, as in the joint network) makes q̂ non-decreasing
in the budget within each model by isotonic regression per query: it moved AUDC by at most 0.002
on RouterArena, so it is off by default. Query-length features are not here: ``predict`` receives
embeddings only.

Measured (``benchmarks/small_data.py``, AUDC mean over random 80/20 splits, paired gap to per-arm
Ridge): ParetoBandit −0.0005, RouterArena −0.0015, their ``tests/data`` copies −0.002 / −0.0016
(all inside one split sd); synthetic world 0.914 vs CARROT KNN (all arms) 0.907 and Ridge 0.901;
the noisier 44-arm world −0.003. It does not reach the issue's +0.01 over the best baseline on any
real bench.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


from r2ray.catalog import Catalog
from r2ray.encoders import default_device
from r2ray.predictor.base import (ArmPredictions, BasePredictor, carve_validation, column_means,
                                  log_tokens, model_fold_ids, tokens_from_log)
from r2ray.predictor.carrot import masked_neighbour_mean, nearest_rows, unit_rows
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.network import NetworkConfig, R2Net, arm_table, budget_chain, budget_chains
from r2ray.predictor.per_arm import ridge_coef, ridge_predict
from r2ray.predictor.stacked import apply_stack, fit_stack
from r2ray.predictor.torch_fit import (FitSettings, Targets, evaluate_loss, fit_module,
                                       inference_rows, input_normalisation, torch_threads)

LOGIT_EPS = 1e-3  # base q̂ clipped to [eps, 1 - eps] before its logit (Ridge is unbounded)


# ---- the base and the neighbour features: numpy, no torch --------------------------------------
def out_of_fold_ridge(x: np.ndarray, train: BenchArrays, catalog: Catalog, alpha: float,
                      folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ridge's q̂ and log t̂ [N, K] on each training row by a fit on the other folds; a model on a
    few queries is spread over two folds (:func:`~r2ray.predictor.base.model_fold_ids`): all in
    one, its rows' base was NaN, and the network read it as q̂ 0.5 and 0 log tokens."""
    fold = model_fold_ids(train, catalog, folds, seed)
    quality = np.empty(train.quality.shape, np.float32)
    tokens = np.empty(train.quality.shape, np.float32)
    for f in range(folds):
        rows, other = fold == f, fold != f
        quality[rows], tokens[rows] = ridge_predict(
            ridge_coef(x[other], train.subset(np.flatnonzero(other)), alpha), x[rows])
    return quality, tokens


def neighbour_means(unit_query: np.ndarray, unit_train: np.ndarray, values: np.ndarray, k: int,
                    exclude_self: bool = False, chunk: int = 2048) -> np.ndarray:
    """[Q, A] mean of the observed ``values`` [N, A] over each query's ``k`` nearest training
    queries (cosine); ``exclude_self``: the queries are the training rows, each leaves itself
    out. A column none of the neighbours observed gets its training mean."""
    fallback = column_means(values, fallback=0.5)
    out = []
    for neighbours in nearest_rows(unit_query, unit_train, k, exclude_self, chunk):
        out.append(masked_neighbour_mean(values, neighbours, fallback))
    return np.concatenate(out) if out else np.zeros((0, values.shape[1]), np.float32)


def monotone_in_budget(quality: np.ndarray, chains: list[np.ndarray]) -> np.ndarray:
    """q̂ [N, K] made non-decreasing along each chain by isotonic regression per query (the
    closest monotone values in squared error, not a running max: a noisy high q̂ at a small
    budget is pulled down as much as the larger budgets are pulled up)."""
    from sklearn.isotonic import isotonic_regression   # seconds to import: only this pays

    out = quality.copy()
    for chain in chains:
        if len(chain) < 2:
            continue
        for row in np.flatnonzero(np.isfinite(quality[:, chain]).all(axis=1)):
            out[row, chain] = isotonic_regression(quality[row, chain].astype(np.float64))
    return out


def as_predictions(quality: np.ndarray, log_tok: np.ndarray) -> ArmPredictions:
    return ArmPredictions(quality, tokens_from_log(log_tok))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p / (1.0 - p)).astype(np.float32)


def network_inputs(x: np.ndarray, base_quality: np.ndarray, base_log_tokens: np.ndarray,
                   neighbours: np.ndarray | None) -> np.ndarray:
    """[N, D + 2K (+ K)]: embedding, base logit, base log tokens (the offsets the residual is
    added to: columns D..D+2K), neighbour quality. An arm the base cannot predict (no training
    outcome) gets 0s; its output is NaN anyway."""
    parts = [x, np.nan_to_num(logit(base_quality)), np.nan_to_num(base_log_tokens)]
    return np.concatenate(parts + ([neighbours] if neighbours is not None else []),
                          axis=1).astype(np.float32)


# ---- the residual network -----------------------------------------------------------------------
@dataclass
class ResidualConfig:
    embedding_dim: int     # D: the offsets sit at columns D..D+2K of the input
    network: dict          # NetworkConfig of the residual R2Net (its input is the whole row)

    @property
    def n_arms(self) -> int:
        return self.network["n_arms"]


class ResidualNet(nn.Module):
    """(base logit, base log tokens) read from the input row, plus an R2Net's output."""

    def __init__(self, config: ResidualConfig):
        super().__init__()
        self.config = config
        self.residual = R2Net(NetworkConfig(**config.network))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, k = self.config.embedding_dim, self.config.n_arms
        quality, tokens = self.residual(z)
        return z[:, d:d + k] + quality, z[:, d + k:d + 2 * k] + tokens

    def start_at_base(self) -> None:
        """Zero the residual's last layer and per-arm biases: the output is the base exactly."""
        with torch.no_grad():
            last = self.residual.head[-1] if isinstance(self.residual.head, nn.Sequential) \
                else self.residual.head
            last.weight.zero_()
            last.bias.zero_()
            self.residual.arm_bias.zero_()


class ResidualPredictor(BasePredictor):
    name = "r2ray_residual"

    def __init__(self, alpha: float = 10.0, base_folds: int = 5, knn: int = 32,
                 members: int = 1, query_hidden: int = 128, joint_hidden: int = 64,
                 head_hidden: int = 32, dropout: float = 0.1, epochs: int = 40,
                 batch_size: int = 128, learning_rate: float = 3e-3, weight_decay: float = 1e-2,
                 patience: int = 10, token_weight: float = 0.5, validation_fraction: float = 0.15,
                 monotone: str = "none", seed: int = 0, device: str | None = None,
                 threads: int | None = 1, time_limit_s: float | None = None):
        self.monotone = monotone
        self.alpha, self.base_folds, self.knn, self.members = alpha, base_folds, knn, members
        self.query_hidden, self.joint_hidden, self.head_hidden = query_hidden, joint_hidden, head_hidden
        self.dropout, self.epochs, self.batch_size = dropout, epochs, batch_size
        self.learning_rate, self.weight_decay, self.patience = learning_rate, weight_decay, patience
        self.token_weight, self.validation_fraction, self.seed = token_weight, validation_fraction, seed
        self.device, self.threads, self.time_limit_s = device, threads, time_limit_s
        self.coef_: dict[str, np.ndarray] | None = None
        self.networks_: list[ResidualNet] = []

    # ---- fit ----------------------------------------------------------------------------------
    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        self.coef_ = ridge_coef(x, train, self.alpha)
        self.networks_ = []
        if not self.knn and not self.members:
            return
        ridge = out_of_fold_ridge(x, train, catalog, self.alpha, self.base_folds, self.seed)
        if self.knn:
            self.coef_ |= {"unit_embedding": unit_rows(x), "train_outcomes": np.concatenate(
                [train.quality, log_tokens(train.output_tokens)], axis=1).astype(np.float32)}
            neighbours = self._neighbours(x, exclude_self=True)
            blend = fit_stack([as_predictions(*ridge), as_predictions(*neighbours)], train)
            self.coef_ |= {f"blend_{name}": value for name, value in blend.items()}
        quality, tokens, neighbour_q = self._base(ridge, neighbours if self.knn else None)
        z = network_inputs(x, quality, tokens, neighbour_q)
        for member in range(self.members):
            network = self._fit_member(train, z, catalog, self.seed + member)
            if network is not None:
                self.networks_.append(network)

    def _neighbours(self, x: np.ndarray, exclude_self: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(quality, log tokens) [N, K]: the ``knn`` nearest training queries' means."""
        k = self.catalog_.n_arms
        means = neighbour_means(unit_rows(x), self.coef_["unit_embedding"],
                                self.coef_["train_outcomes"], self.knn, exclude_self)
        return means[:, :k], means[:, k:]

    def _base(self, ridge: tuple[np.ndarray, np.ndarray],
              neighbours: tuple[np.ndarray, np.ndarray] | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(q̂, log t̂, neighbour q̂ or None) of the base: Ridge, or with ``knn`` its per-arm
        convex blend with the neighbours (weights fitted on out-of-fold predictions)."""
        if neighbours is None:
            return *ridge, None
        weights = {name: self.coef_[f"blend_{name}"] for name in ("quality_weights",
                                                                  "tokens_weights")}
        blended = apply_stack([as_predictions(*ridge), as_predictions(*neighbours)], weights)
        return blended.quality, log_tokens(blended.output_tokens), neighbours[0]

    def _fit_member(self, train: BenchArrays, z: np.ndarray, catalog: Catalog,
                    seed: int) -> ResidualNet | None:
        """One residual network on its own early-stopping slice; None when it never beat the base
        there."""
        device = self.device or default_device()
        rows = train.subset(np.arange(train.n_queries)).with_embedding(z)
        fit_rows, held_out = carve_validation(rows, None, self.validation_fraction, seed)
        settings = FitSettings(epochs=self.epochs, batch_size=self.batch_size,
                               learning_rate=self.learning_rate, weight_decay=self.weight_decay,
                               patience=self.patience, token_weight=self.token_weight, seed=seed,
                               device=device, threads=self.threads,
                               time_limit_s=self.time_limit_s, precision="float32")
        with torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = self._network(z.shape[1], catalog, fit_rows.embedding).to(device)
            fit_targets = Targets.from_arrays(fit_rows, fit_rows.embedding, device)
            held_targets = Targets.from_arrays(held_out, held_out.embedding, device)
            base_loss = evaluate_loss(network, held_targets, settings)
            history = fit_module(network, fit_targets, held_targets, settings)
        return network.to("cpu") if history.best_validation_loss < base_loss - 1e-5 else None

    def _network(self, input_dim: int, catalog: Catalog, z_train: np.ndarray) -> ResidualNet:
        arms = arm_table(catalog)
        config = NetworkConfig(embedding_dim=input_dim, n_arms=catalog.n_arms,
                               n_models=arms.n_models, n_budget_values=arms.n_budget_values,
                               query_hidden=self.query_hidden, joint_hidden=self.joint_hidden,
                               head_hidden=self.head_hidden, dropout=self.dropout)
        network = ResidualNet(ResidualConfig(self.embedding_dim_, asdict(config)))
        chain, first = budget_chain(catalog, "none")
        network.residual.load_arms(arms, chain, first, *input_normalisation(z_train))
        network.start_at_base()
        return network

    # ---- predict ------------------------------------------------------------------------------
    def _predict(self, x: np.ndarray) -> ArmPredictions:
        prediction = self._predict_unconstrained(x)
        chains = budget_chains(self.catalog_, self.monotone)
        return ArmPredictions(monotone_in_budget(prediction.quality, chains),
                              prediction.output_tokens) if chains else prediction

    def _predict_unconstrained(self, x: np.ndarray) -> ArmPredictions:
        ridge = ridge_predict(self.coef_, x)
        quality, log_tok, neighbour_q = self._base(ridge, self._neighbours(x) if self.knn else None)
        if self.networks_ and len(x):
            quality, log_tok = self._members_mean(x, quality, log_tok, neighbour_q)
        # an arm with no training outcome (the base's NaN) is NaN, not the neighbours' fallback or
        # a network's output, with or without members
        unobserved = np.isnan(ridge[0])
        return ArmPredictions(np.where(unobserved, np.nan, quality).astype(np.float32),
                              np.where(unobserved, np.nan, tokens_from_log(log_tok))
                              .astype(np.float32))

    def _members_mean(self, x: np.ndarray, quality: np.ndarray, log_tok: np.ndarray,
                      neighbour_q: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(q̂, log t̂) [N, K]: the members' mean logit and log tokens, in row batches whose (B, K,
        H) joint activation stays within cache (all N at once: 18 GB at 200k rows × 176 arms)."""
        network = self.networks_[0].config.network
        rows = inference_rows(network["n_arms"] * network["joint_hidden"])
        parts = []
        with torch_threads(self.threads), torch.inference_mode():
            for start in range(0, len(x), rows):
                part = slice(start, start + rows)
                z = torch.as_tensor(network_inputs(
                    x[part], quality[part], log_tok[part],
                    None if neighbour_q is None else neighbour_q[part]))
                outputs = [member(z) for member in self.networks_]
                parts.append((torch.sigmoid(torch.stack([q for q, _ in outputs]).mean(dim=0)),
                              torch.stack([t for _, t in outputs]).mean(dim=0)))
        return (torch.cat([q for q, _ in parts]).numpy(),
                torch.cat([t for _, t in parts]).numpy())

    # ---- persistence --------------------------------------------------------------------------
    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        tensors = dict(self.coef_)
        for i, network in enumerate(self.networks_):
            tensors |= {f"member{i}.{name}": value.detach().cpu().numpy()
                        for name, value in network.state_dict().items()}
        configs = [asdict(network.config) for network in self.networks_]
        return {"networks": configs}, tensors

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.coef_ = {n: v for n, v in tensors.items() if not n.startswith("member")}
        self.networks_ = []
        for i, config in enumerate(fitted["networks"]):
            network = ResidualNet(ResidualConfig(**config))
            prefix = f"member{i}."
            network.load_state_dict({n.removeprefix(prefix): torch.as_tensor(v)
                                     for n, v in tensors.items() if n.startswith(prefix)})
            self.networks_.append(network.eval())
