"""The training loop and base class shared by the torch predictors (joint network, per-arm heads).

Any module whose ``forward(x (B, D))`` returns ``(quality logits (B, K), log tokens (B, K))``
trains here: BCE on soft quality labels plus a weighted squared error on log(1 + tokens), both
only over observed (query, arm) cells; AdamW; early stopping on a validation set carved from the
training data, restoring the best weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from r2ray.catalog import Catalog
from r2ray.encoders import default_device, resolve_precision
from r2ray.predictor.base import (
    ArmPredictions, BasePredictor, carve_validation, column_means, log_tokens, tokens_from_log)
from r2ray.predictor.data import BenchArrays

log = logging.getLogger(__name__)


@dataclass
class FitSettings:
    epochs: int | None = 30          # None: as many as ``steps`` needs (training_schedule)
    batch_size: int | None = 512     # queries per step (each carries all K arms); None: from the
                                     # number of training queries (training_schedule)
    steps: int = 1000                # most optimiser steps a plan without epochs takes
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 3                # epochs without validation improvement before stopping
    token_weight: float = 0.5        # weight of the log-token loss next to the quality BCE
    seed: int = 0
    device: str | None = None        # None: cuda when available, else cpu
    threads: int | None = 1          # torch CPU threads during fit and predict; None: torch's
                                     # setting. 1 by default: the joint network is memory-bound,
                                     # and on 2 busy cores two threads ran 5× slower per step
    time_limit_s: float | None = None
    precision: str = "auto"          # "bfloat16": autocast the training forward pass; weights stay
                                     # float32; "auto": bfloat16 where the hardware has it


STEPS_PER_EPOCH = 16
"""Optimiser steps per pass a derived batch size aims at (``training_schedule``)."""
BATCH_LIMITS = (128, 512)  # smallest and largest derived batch size, in queries
MAX_EPOCHS = 40            # most passes of a derived plan
EPOCH_PLAN_BATCH = 512     # the batch of a plan given in epochs alone (as before the step budget)


def training_schedule(n_train: int, batch_size: int | None, epochs: int | None,
                      steps: int) -> tuple[int, int]:
    """(batch size, epochs) for ``n_train`` training queries; a value given is kept.

    Why steps, not epochs: the network's quality depends on how many optimiser steps it takes; 12
    epochs at batch 512 gave 2,160 queries 60 steps (synthetic world AUDC 0.880 vs per-arm Ridge
    0.901; batch 128 for 40 epochs, patience 8: 0.920, ``benchmarks/small_data.py``). With neither
    given, the batch is the power of two nearest ``n_train / STEPS_PER_EPOCH`` within
    ``BATCH_LIMITS`` (128 up to ~2,900 queries, 512 from ~5,800) and the epochs reach ``steps``,
    at most ``MAX_EPOCHS`` (40 at 2,160: 680 steps; 32 at 16,000: 1,000 steps); early stopping
    ends most fits far sooner. The floor of 128 keeps small sets from overfitting: batch 32 on
    150 queries took 300 steps and failed on RouterArena's 204-query copy (QNC 1.0 on 2 of 3
    splits). Epochs given alone keep the epoch plan's batch, ``EPOCH_PLAN_BATCH``: a short fit
    asked for in epochs (``--epochs 3``, the tests' tiny fits) stays as short as it was.
    """
    if batch_size is None and epochs is not None:
        batch_size = EPOCH_PLAN_BATCH
    if batch_size is None:
        target = max(1.0, n_train / STEPS_PER_EPOCH)
        batch_size = int(np.clip(2 ** round(math.log2(target)), *BATCH_LIMITS))
    if epochs is None:
        per_epoch = max(1, math.ceil(n_train / batch_size))
        epochs = min(MAX_EPOCHS, max(1, math.ceil(steps / per_epoch)))
    return batch_size, epochs


@dataclass
class Targets:
    """Training tensors for one set, on the training device."""
    x: torch.Tensor           # (N, D) float32
    quality: torch.Tensor     # (N, K) float32, 0 where unobserved
    log_tokens: torch.Tensor  # (N, K) float32, 0 where unobserved
    quality_mask: torch.Tensor  # (N, K) bool
    tokens_mask: torch.Tensor   # (N, K) bool

    @classmethod
    def from_arrays(cls, arrays: BenchArrays, x: np.ndarray, device: str) -> Targets:
        quality_mask = ~np.isnan(arrays.quality)
        tokens_mask = ~np.isnan(arrays.output_tokens)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
        return cls(as_tensor(x), as_tensor(np.nan_to_num(arrays.quality)),
                   as_tensor(np.nan_to_num(log_tokens(arrays.output_tokens))),
                   as_tensor(quality_mask), as_tensor(tokens_mask))

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, index: torch.Tensor) -> Targets:
        return Targets(*(t[index] for t in (self.x, self.quality, self.log_tokens,
                                            self.quality_mask, self.tokens_mask)))


@dataclass
class FitHistory:
    precision: str = "float32"       # as resolved for this fit
    batch_size: int = 0              # as resolved for this fit (training_schedule)
    epochs_run: int = 0
    steps_run: int = 0               # optimiser steps taken
    best_epoch: int = 0
    best_validation_loss: float = math.inf
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def masked_loss(quality_logits: torch.Tensor, log_tokens_hat: torch.Tensor, targets: Targets,
                token_weight: float) -> torch.Tensor:
    """Mean BCE over observed quality cells + token_weight × mean squared log-token error."""
    bce = F.binary_cross_entropy_with_logits(quality_logits, targets.quality, reduction="none")
    bce = (bce * targets.quality_mask).sum() / targets.quality_mask.sum().clamp(min=1)
    squared = (log_tokens_hat - targets.log_tokens) ** 2
    squared = (squared * targets.tokens_mask).sum() / targets.tokens_mask.sum().clamp(min=1)
    return bce + token_weight * squared


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Use ``threads`` CPU threads inside the block, then restore; None keeps torch's setting
    (one per physical core unless OMP_NUM_THREADS / torch.set_num_threads said otherwise).
    On a busy shared machine fewer threads than cores can be much faster (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads or before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_loss(module: nn.Module, targets: Targets, settings: FitSettings) -> float:
    module.eval()
    total, n = 0.0, len(targets)
    with torch.no_grad():
        for start in range(0, n, 4 * settings.batch_size):
            part = targets.batch(torch.arange(start, min(n, start + 4 * settings.batch_size)))
            q, t = module(part.x)
            total += float(masked_loss(q, t, part, settings.token_weight)) * len(part)
    return total / max(n, 1)


def train_epoch(module: nn.Module, train: Targets, optimiser: torch.optim.Optimizer,
                schedule, generator: torch.Generator, settings: FitSettings) -> float:
    """One pass over ``train`` in shuffled batches; returns the mean training loss."""
    module.train()
    device_type = train.x.device.type
    running = 0.0
    for index in torch.randperm(len(train), generator=generator).split(settings.batch_size):
        part = train.batch(index.to(train.x.device))
        with torch.autocast(device_type, dtype=torch.bfloat16,
                            enabled=settings.precision == "bfloat16"):
            q, t = module(part.x)
        loss = masked_loss(q.float(), t.float(), part, settings.token_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach()) * len(index)
    return running / len(train)


def fit_module(module: nn.Module, train: Targets, validation: Targets,
               settings: FitSettings) -> FitHistory:
    """Train ``module`` in place with early stopping; the best validation weights are kept."""
    batch_size, epochs = training_schedule(len(train), settings.batch_size, settings.epochs,
                                           settings.steps)
    settings = replace(settings, batch_size=batch_size, epochs=epochs,
                       precision=resolve_precision(settings.precision, train.x.device.type))
    history, started = FitHistory(settings.precision, batch_size), time.monotonic()
    optimiser = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch,
        pct_start=0.1)
    generator = torch.Generator().manual_seed(settings.seed)
    best_state, stale = copy.deepcopy(module.state_dict()), 0
    for epoch in range(settings.epochs):
        history.train_loss.append(train_epoch(module, train, optimiser, schedule, generator,
                                              settings))
        history.validation_loss.append(evaluate_loss(module, validation, settings))
        history.epochs_run, history.steps_run = epoch + 1, (epoch + 1) * steps_per_epoch
        if history.validation_loss[-1] < history.best_validation_loss - 1e-5:
            history.best_validation_loss, history.best_epoch = history.validation_loss[-1], epoch + 1
            best_state, stale = copy.deepcopy(module.state_dict()), 0
        else:
            stale += 1
        log.info("epoch %d: train %.4f validation %.4f", epoch + 1, history.train_loss[-1],
                 history.validation_loss[-1])
        elapsed = time.monotonic() - started
        if stale >= settings.patience or (settings.time_limit_s and elapsed > settings.time_limit_s):
            break
    module.load_state_dict(best_state)
    module.eval()
    history.seconds = time.monotonic() - started
    return history


PREDICT_WORKING_SET_BYTES = 8 << 20
"""Bytes the widest inference activation may take on a CPU: kept within cache, the joint network's
forward pass ran 2.4× faster at 64 rows than at 2,048 (one thread; 176 arms × 128 wide)."""
GPU_PREDICT_ROWS = 2048  # a GPU wants large batches: no cache to fit, launch overhead to amortise


def inference_rows(floats_per_row: int, device: str = "cpu",
                   working_set_bytes: int = PREDICT_WORKING_SET_BYTES) -> int:
    """Rows per inference batch: on a CPU the largest power of two (≥ 8) whose widest activation,
    rows × ``floats_per_row`` float32, fits in ``working_set_bytes``; on a GPU, 2,048."""
    if not str(device).startswith("cpu"):
        return GPU_PREDICT_ROWS
    rows = max(1, working_set_bytes // (4 * max(1, floats_per_row)))
    return max(8, 1 << (rows.bit_length() - 1))


def predict_module(module: nn.Module, x: np.ndarray, device: str,
                   batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(quality [N, K] float32 in [0, 1], log tokens [N, K] float32) in batches, no autograd."""
    module.eval()
    quality, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            part = torch.as_tensor(x[start:start + batch_size], device=device)
            q, t = module(part)
            quality.append(torch.sigmoid(q).float().cpu().numpy())
            tokens.append(t.float().cpu().numpy())
    k = module.config.n_arms
    if not quality:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.float32)
    return np.concatenate(quality), np.concatenate(tokens)


def arm_means(train: BenchArrays) -> tuple[np.ndarray, np.ndarray]:
    """([K] logit of the mean quality, [K] mean log tokens) per arm: starting output biases."""
    p = np.clip(column_means(train.quality, fallback=0.5), 0.02, 0.98)
    target = log_tokens(train.output_tokens)
    observed = target[~np.isnan(target)]
    fallback = float(observed.mean()) if observed.size else 0.0
    return np.log(p / (1 - p)).astype(np.float32), column_means(target, fallback)


def input_normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], scale [D]) of the training embeddings; constant dimensions get scale 1."""
    scale = x.std(axis=0)
    return x.mean(axis=0), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


class TorchPredictor(BasePredictor):
    """A predictor whose learned state is one torch module trained by :func:`fit_module`.

    Subclasses set ``network_class`` / ``config_class`` and implement ``_network_config`` and
    ``_initialise``; the settings below are shared constructor arguments.
    """

    network_class: type[nn.Module]
    config_class: type
    steps: int = FitSettings.steps   # a subclass without a ``steps`` setting plans in epochs only
    network_: nn.Module | None = None
    history_: FitHistory | None = None
    saved_history_: dict | None = None   # the fit's record as a loaded document had it

    def _fit_settings(self) -> FitSettings:
        return FitSettings(epochs=self.epochs, batch_size=self.batch_size,
                           steps=self.steps,
                           learning_rate=self.learning_rate, weight_decay=self.weight_decay,
                           patience=self.patience, token_weight=self.token_weight, seed=self.seed,
                           device=self.device, threads=self.threads, time_limit_s=self.time_limit_s,
                           precision=self.precision)

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        device = self.device or default_device()
        train, validation = carve_validation(train, validation, self.validation_fraction, self.seed)
        with torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = self.network_class(self._network_config(x.shape[1], catalog))
            self._initialise(network, train, catalog)
            network.to(device)
            self.history_ = fit_module(network, Targets.from_arrays(train, train.embedding, device),
                                       Targets.from_arrays(validation, validation.embedding, device),
                                       self._fit_settings())
        self.network_ = network.to("cpu")

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        device = self.device or default_device()
        with torch_threads(self.threads):
            rows = inference_rows(self.network_.config.n_arms * self._activation_width(), device)
            quality, log_tok = predict_module(self.network_.to(device), x, device, rows)
        return ArmPredictions(quality, tokens_from_log(log_tok))

    def _held_out_tokens(self, train: BenchArrays,
                         validation: BenchArrays | None) -> tuple[np.ndarray, np.ndarray]:
        """The early-stopping set the fit carved (no refit): t̂ there and the realised tokens."""
        _, held_out = carve_validation(train, validation, self.validation_fraction, self.seed)
        return self._predict(held_out.embedding).output_tokens, held_out.output_tokens

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        fitted = {"network": asdict(self.network_.config)}
        history = self._history_record()
        if history is not None:
            fitted["history"] = history
        tensors = {k: v.detach().cpu().numpy() for k, v in self.network_.state_dict().items()}
        return fitted, tensors

    def _history_record(self) -> dict | None:
        """The fit's record a save writes (epochs, steps, batch size, precision, seconds): this
        fit's, else the one the loaded document had, as it had it; dropped on load, a predictor
        loaded and saved again was another document, so another fingerprint (``document_sha256``,
        which its cost corrections are matched by). None: an extension's network, never fitted
        whole."""
        if self.history_ is None:
            return self.saved_history_
        return {"epochs_run": self.history_.epochs_run, "best_epoch": self.history_.best_epoch,
                "steps_run": self.history_.steps_run, "batch_size": self.history_.batch_size,
                "precision": self.history_.precision, "seconds": round(self.history_.seconds, 3)}

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        network = self.network_class(self.config_class(**fitted["network"]))
        network.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
        self.network_ = network.eval()
        self.saved_history_ = fitted.get("history")

    # ---- subclass hooks -------------------------------------------------------------------------
    def _network_config(self, embedding_dim: int, catalog: Catalog):
        raise NotImplementedError

    def _initialise(self, network: nn.Module, train: BenchArrays, catalog: Catalog) -> None:
        raise NotImplementedError

    def _activation_width(self) -> int:
        """Floats per (query, arm) in the widest activation of the forward pass."""
        raise NotImplementedError
