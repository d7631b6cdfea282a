"""``r2ray``: the jointly conditioned predictor (the network is in :mod:`r2ray.predictor.network`)."""

from __future__ import annotations

import torch

from r2ray.catalog import Catalog
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.network import NetworkConfig, R2Net, arm_table, budget_chain, chain_bias
from r2ray.predictor.torch_fit import TorchPredictor, arm_means, input_normalisation


class R2RayPredictor(TorchPredictor):
    """Query embedding × model × budget → q̂ and t̂ for every arm, in one forward pass.

    Trained for up to ``steps`` optimiser steps: ``batch_size`` and ``epochs`` left None are
    derived from the number of training queries (:func:`~r2ray.predictor.torch_fit.
    training_schedule`: batch 128 and 40 epochs at a few thousand queries); given, they are kept
    (``epochs`` alone: batch 512, the old plan; predictors saved with epochs 12, batch 512 refit
    as they were). ``patience`` is in epochs: 8, as the measured plan had it.
    """

    name = "r2ray"
    network_class, config_class = R2Net, NetworkConfig

    def __init__(self, query_hidden: int = 256, joint_hidden: int = 128, head_hidden: int = 64,
                 rank: int = 0, model_embedding_dim: int = 16, budget_embedding_dim: int = 8,
                 dropout: float = 0.1, monotone: str = "none", epochs: int | None = None,
                 batch_size: int | None = None, steps: int = 1000, learning_rate: float = 3e-3,
                 weight_decay: float = 1e-4, patience: int = 8, token_weight: float = 0.5,
                 validation_fraction: float = 0.1,
                 seed: int = 0, device: str | None = None, threads: int | None = 1,
                 time_limit_s: float | None = None,
                 precision: str = "auto"):
        self.query_hidden, self.joint_hidden = query_hidden, joint_hidden
        self.head_hidden, self.rank = head_hidden, rank
        self.model_embedding_dim = model_embedding_dim
        self.budget_embedding_dim = budget_embedding_dim
        self.dropout, self.monotone = dropout, monotone
        self.epochs, self.batch_size, self.steps = epochs, batch_size, steps
        self.learning_rate = learning_rate
        self.weight_decay, self.patience, self.token_weight = weight_decay, patience, token_weight
        self.validation_fraction, self.seed = validation_fraction, seed
        self.device, self.threads, self.time_limit_s = device, threads, time_limit_s
        self.precision = precision

    def _activation_width(self) -> int:
        return self.network_.config.joint_hidden  # z is (B, K, H)

    def _network_config(self, embedding_dim: int, catalog: Catalog) -> NetworkConfig:
        arms = arm_table(catalog)
        return NetworkConfig(
            embedding_dim=embedding_dim, n_arms=catalog.n_arms, n_models=arms.n_models,
            n_budget_values=arms.n_budget_values, query_hidden=self.query_hidden,
            joint_hidden=self.joint_hidden, head_hidden=self.head_hidden, rank=self.rank,
            model_embedding_dim=self.model_embedding_dim,
            budget_embedding_dim=self.budget_embedding_dim, dropout=self.dropout,
            monotone=self.monotone)

    def _initialise(self, network: R2Net, train: BenchArrays, catalog: Catalog) -> None:
        """Fixed arm inputs, input normalisation, and per-arm biases at the training means."""
        chain, first = budget_chain(catalog, network.config.monotone)
        network.load_arms(arm_table(catalog), chain, first, *input_normalisation(train.embedding))
        quality_logit, mean_log_tokens = arm_means(train)
        if network.config.monotone != "none":
            quality_logit = chain_bias(quality_logit, chain, first)
        with torch.no_grad():
            network.arm_bias[0] = torch.as_tensor(quality_logit)
            network.arm_bias[1] = torch.as_tensor(mean_log_tokens)
