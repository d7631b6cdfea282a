"""The jointly conditioned network: query embedding × model × budget → q̂ and log t̂ for all K arms.

Reads top to bottom:

1. ``NetworkConfig`` — every size and option, with its default.
2. ``ArmTable`` — what the network knows about each arm, built from the catalogue: model index,
   budget index, and numeric features (log budget, default flag, log prices, log context).
3. ``R2Net`` — a query tower gives h_i (B, H); an arm tower gives a_j (K, H) from a learned model
   embedding, a learned budget embedding and the arm features. The first joint layer of an MLP
   over the concatenation [query; arm] is additive, so z_ij = GELU(h_i + a_j) (B, K, H) costs one
   broadcast; a small shared head turns each z_ij into (quality logit, log tokens). One forward
   pass yields every arm. Optional (``rank`` > 0): a low-rank bilinear term (x_i P)·F_j — a shared
   query projection P times per-arm factors F_j — the per-arm linear signal independent per-arm
   models live on. It helped on ~5k training queries (synthetic world: AUDC 0.919 vs 0.881 after
   6 epochs) but not on 16k (0.928 vs 0.933 after 12), so it is off by default.
4. The optional monotone head: within a model, the quality logit is a running sum of one free
   value (the smallest budget) and softplus increments over the budgets in ascending order, so q̂
   never falls as the budget grows. ``monotone="budgets"`` chains the numeric budgets and leaves
   the default arm free (an unconstrained answer can be worse than a long budgeted one: rambling,
   context overflow); ``"budgets+default"`` puts default at the top of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from r2ray.catalog import DEFAULT_BUDGET, Catalog

MONOTONE_OPTIONS = ("none", "budgets", "budgets+default")


@dataclass
class NetworkConfig:
    embedding_dim: int               # D, the encoder's output size
    n_arms: int                      # K
    n_models: int
    n_budget_values: int             # distinct budgets in the catalogue, default included
    n_arm_features: int = 5
    query_hidden: int = 256          # query tower width
    joint_hidden: int = 128          # H, width of the joint (query, arm) representation
    head_hidden: int = 64            # 0: a linear head straight from the joint layer
    rank: int = 0                    # low-rank bilinear part (query factors · arm factors); 0: off
    model_embedding_dim: int = 16
    budget_embedding_dim: int = 8
    dropout: float = 0.1
    monotone: str = "none"           # one of MONOTONE_OPTIONS


# ---- what the network knows about each arm ------------------------------------------------------
@dataclass
class ArmTable:
    model_index: np.ndarray   # [K] int64
    budget_index: np.ndarray  # [K] int64, budget embedding rows: budget_values order, an
                              # extension's new values appended (extended_arm_table)
    features: np.ndarray      # [K, 5] float32, standardised over arms
    n_models: int
    n_budget_values: int


def _raw_arm_features(catalog: Catalog) -> np.ndarray:
    """[K, 5] float64 unstandardised arm features: log budget tokens, default flag, log USD per M
    tokens in and out, log context tokens."""
    arrays = catalog.arm_arrays
    budgets = arrays["budget_tokens"].astype(np.int64)
    is_default = budgets == DEFAULT_BUDGET
    context = np.array([catalog.model(arm.model).context for arm in catalog.arms], dtype=np.float64)
    return np.stack([
        np.where(is_default, 0.0, np.log(np.maximum(budgets, 1))),
        is_default.astype(np.float64),
        np.log(arrays["price_in_usd"] * 1e6 + 1e-3),
        np.log(arrays["price_out_usd"] * 1e6 + 1e-3),
        np.log(context),
    ], axis=1)


def budget_values(catalog: Catalog) -> list[int]:
    """Distinct budgets of the catalogue's arms, ascending, default last: the budget embedding's
    rows."""
    budgets = set(catalog.arm_arrays["budget_tokens"].astype(np.int64).tolist())
    return sorted(budgets, key=lambda b: (b == DEFAULT_BUDGET, b))


def arm_table(catalog: Catalog) -> ArmTable:
    """The arm inputs of ``catalog``: features standardised over its arms, budgets on the rows of
    :func:`budget_values`."""
    raw = _raw_arm_features(catalog)
    spread = raw.std(axis=0)
    return _table(catalog, raw.mean(axis=0), np.where(spread > 0, spread, 1.0),
                  {b: i for i, b in enumerate(budget_values(catalog))})


def extended_arm_table(catalog: Catalog, trained: Catalog, features: np.ndarray,
                       budget_rows: np.ndarray) -> ArmTable:
    """The arm inputs of ``catalog``, which extends ``trained`` (:mod:`r2ray.predictor.extend`),
    as a network over ``trained`` sees them: its own arms' standardised ``features`` [K_trained,
    5] and ``budget_rows`` [K_trained] (its buffers) give the statistics its arm tower was trained
    with and its budget embedding's rows (new budget values appended), so the frozen tower sees
    old arms' inputs unchanged. Read back from the network, not recomputed from ``trained``: a
    network extended before was standardised with the catalogue it was first trained on, and its
    rows are in that catalogue's order (recomputed, a second warm start was refused). A feature
    its arms all share (one context window for the whole pool) taught the tower nothing, and its
    spread was rounding noise (1.8e-15): new arms take the old arms' value there, not their raw
    difference over that noise (a longer context read as 7.8e14, and q̂ = 1 on every query)."""
    raw = _raw_arm_features(trained)
    varied = (np.ptp(raw, axis=0) > 0) & (np.ptp(features, axis=0) > 0)
    scale = np.ones(raw.shape[1])
    scale[varied] = raw[:, varied].std(axis=0) / features[:, varied].std(axis=0)
    rows = dict(zip(trained.arm_arrays["budget_tokens"].astype(np.int64).tolist(),
                    np.asarray(budget_rows).tolist()))
    for value in budget_values(catalog):
        rows.setdefault(value, len(rows))
    table = _table(catalog, (raw - features * scale).mean(axis=0), scale, rows)
    table.features[:, ~varied] = features[0, ~varied]
    return table


def _table(catalog: Catalog, mean: np.ndarray, scale: np.ndarray, rows: dict[int, int]
           ) -> ArmTable:
    """``catalog``'s arms with features (raw - ``mean``) / ``scale`` and budget embedding rows
    ``rows`` ({budget tokens: row})."""
    budgets = catalog.arm_arrays["budget_tokens"].astype(np.int64)
    return ArmTable(
        model_index=catalog.arm_arrays["model_index"].astype(np.int64),
        budget_index=np.array([rows[b] for b in budgets.tolist()], dtype=np.int64),
        features=((_raw_arm_features(catalog) - mean) / scale).astype(np.float32),
        n_models=len(catalog.models),
        n_budget_values=len(rows),
    )


def budget_chains(catalog: Catalog, monotone: str) -> list[np.ndarray]:
    """Per model, its arm indices in ascending budget order (default last with
    ``budgets+default``, left out with ``budgets``); none with ``none``."""
    if monotone not in MONOTONE_OPTIONS:
        raise ValueError(f"monotone must be one of {MONOTONE_OPTIONS}, got {monotone!r}")
    if monotone == "none":
        return []
    # arms are model-major, budgets ascending, default last: the chain order is arm order
    return [np.array([catalog.arm_of(model, b) for b in catalog.budgets_of(model)
                      if b != DEFAULT_BUDGET or monotone == "budgets+default"])
            for model in catalog.model_names]


def budget_chain(catalog: Catalog, monotone: str) -> tuple[np.ndarray, np.ndarray]:
    """(C [K, K] float32, first [K] bool) for the monotone head.

    C[j, l] = 1 when arms j and l are of the same model, both in the chain, and l comes at or
    before j; the running-sum logit of arm j is Σ_l C[j, l] · increment_l. Rows of arms outside
    the chain are zero. ``first`` marks the smallest budget of each chain (its value is free).
    """
    k = catalog.n_arms
    chain = np.zeros((k, k), dtype=np.float32)
    first = np.zeros(k, dtype=bool)
    for members in budget_chains(catalog, monotone):
        for position, j in enumerate(members):
            chain[j, members[:position + 1]] = 1.0
        if len(members):
            first[members[0]] = True
    return chain, first


def chain_bias(target_logit: np.ndarray, chain: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per-arm raw biases that make the monotone head start at (a running max of) ``target_logit``."""
    bias = target_logit.astype(np.float64).copy()
    in_chain = chain.any(axis=1)
    for j in np.flatnonzero(in_chain & ~first):
        previous = np.flatnonzero(chain[j])[-2]  # the arm just below j in its chain
        step = max(target_logit[j] - _chain_value(bias, chain, first, previous), 0.05)
        bias[j] = np.log(np.expm1(step))  # softplus⁻¹
    return bias.astype(np.float32)


def _chain_value(bias: np.ndarray, chain: np.ndarray, first: np.ndarray, j: int) -> float:
    members = np.flatnonzero(chain[j])
    return float(sum(bias[m] if first[m] else np.log1p(np.exp(bias[m])) for m in members))


# ---- the network -----------------------------------------------------------------------------
class R2Net(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        c = config
        k = c.n_arms
        # fixed per-arm inputs and normalisation, set by load_arms(); saved with the weights
        self.register_buffer("x_mean", torch.zeros(c.embedding_dim))
        self.register_buffer("x_scale", torch.ones(c.embedding_dim))
        self.register_buffer("arm_model", torch.zeros(k, dtype=torch.long))
        self.register_buffer("arm_budget", torch.zeros(k, dtype=torch.long))
        self.register_buffer("arm_features", torch.zeros(k, c.n_arm_features))
        self.register_buffer("chain", torch.zeros(k, k))
        self.register_buffer("chain_first", torch.zeros(k, dtype=torch.bool))

        self.query_tower = nn.Sequential(
            nn.Linear(c.embedding_dim, c.query_hidden), nn.GELU(), nn.Dropout(c.dropout),
            nn.Linear(c.query_hidden, c.joint_hidden))
        self.model_embedding = nn.Embedding(c.n_models, c.model_embedding_dim)
        self.budget_embedding = nn.Embedding(c.n_budget_values, c.budget_embedding_dim)
        arm_in = c.model_embedding_dim + c.budget_embedding_dim + c.n_arm_features
        self.arm_tower = nn.Sequential(
            nn.Linear(arm_in, c.joint_hidden), nn.GELU(), nn.Linear(c.joint_hidden, c.joint_hidden))
        self.head = (nn.Sequential(nn.Linear(c.joint_hidden, c.head_hidden), nn.GELU(),
                                   nn.Linear(c.head_hidden, 2))
                     if c.head_hidden else nn.Linear(c.joint_hidden, 2))
        self.arm_bias = nn.Parameter(torch.zeros(2, k))  # (quality raw, log tokens) per arm
        # bilinear part: a shared query projection (D → r) times per-arm factors (r → 2 outputs);
        # starts at zero so training begins from the joint MLP alone
        self.query_factors = nn.Linear(c.embedding_dim, c.rank, bias=False) if c.rank else None
        self.arm_factors = nn.Parameter(torch.zeros(c.rank, k * 2)) if c.rank else None

    def load_arms(self, arms: ArmTable, chain: np.ndarray, first: np.ndarray,
                  x_mean: np.ndarray, x_scale: np.ndarray) -> None:
        self.arm_model.copy_(torch.as_tensor(arms.model_index))
        self.arm_budget.copy_(torch.as_tensor(arms.budget_index))
        self.arm_features.copy_(torch.as_tensor(arms.features))
        self.chain.copy_(torch.as_tensor(chain))
        self.chain_first.copy_(torch.as_tensor(first))
        self.x_mean.copy_(torch.as_tensor(x_mean))
        self.x_scale.copy_(torch.as_tensor(x_scale))

    def arm_vectors(self, model_weights: torch.Tensor | None = None,
                    budget_weights: torch.Tensor | None = None,
                    arms: torch.Tensor | None = None) -> torch.Tensor:
        """(K, H), or (A, H) for ``arms``; ``model_weights`` / ``budget_weights`` stand in for the
        embedding tables (the warm start fits new rows of them: :mod:`r2ray.predictor.extend`)."""
        models = self.model_embedding.weight if model_weights is None else model_weights
        budgets = self.budget_embedding.weight if budget_weights is None else budget_weights
        index = slice(None) if arms is None else arms
        arm_in = torch.cat([models[self.arm_model[index]], budgets[self.arm_budget[index]],
                            self.arm_features[index]], dim=1)
        return self.arm_tower(arm_in)

    def query_side(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, D) → h (B, H) and the bilinear part's query factors (B, r), or None."""
        x = (x - self.x_mean) / self.x_scale
        return self.query_tower(x), (self.query_factors(x) if self.query_factors is not None
                                     else None)

    def joint(self, h: torch.Tensor, factors: torch.Tensor | None, arm_vectors: torch.Tensor,
              arm_factors: torch.Tensor | None, bias: torch.Tensor, chain: torch.Tensor,
              first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query side × arm side → quality logits, log(1 + output tokens) (B, A) over the arms
        whose vectors (A, H), factors (r, 2A), biases (2, A) and chain (A, A) are given."""
        out = self.head(F.gelu(h[:, None, :] + arm_vectors[None, :, :]))   # (B, A, 2)
        if factors is not None:
            out = out + (factors @ arm_factors).view(len(h), -1, 2)
        return self.monotone_logits(out[..., 0] + bias[0], chain, first), out[..., 1] + bias[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) → quality logits (B, K), log(1 + output tokens) (B, K)."""
        return self.joint(*self.query_side(x), self.arm_vectors(), self.arm_factors,
                          self.arm_bias, self.chain, self.chain_first)

    def monotone_logits(self, raw: torch.Tensor, chain: torch.Tensor | None = None,
                        first: torch.Tensor | None = None) -> torch.Tensor:
        """Running sums of softplus increments along each model's budget chain (B, K), or along
        the ``chain`` / ``first`` given for a subset of the arms."""
        if self.config.monotone == "none":
            return raw
        return chain_sums(raw, self.chain if chain is None else chain,
                          self.chain_first if first is None else first)


def chain_sums(raw: torch.Tensor, chain: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The monotone head on raw logits (B, K): running sums of softplus increments along the
    chains of ``chain`` (K, K); arms in no chain keep their raw value."""
    increments = torch.where(first, raw, F.softplus(raw))
    in_chain = chain.sum(dim=1) > 0
    return torch.where(in_chain, increments @ chain.T, raw)
