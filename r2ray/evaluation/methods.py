"""The methods that need no learning: each single model, random, and the two oracles.

A method is described by :class:`MethodScores`: what it believes about every (query, arm) —
quality and cost in USD — with NaN on the arms it cannot use. The λ sweep in
:func:`r2ray.evaluation.metrics.deferral_points` turns beliefs into choices.

- ``single:<model>`` — that model's default arm for every query (one point). A model whose
  catalogue entry offers no default budget has no single-model method.
- ``random`` — a uniformly random default arm per query (among the default arms the bench has for
  it). No λ can steer it, so it is one point: the exact expectation of that draw, not a sample.
- ``oracle_default`` / ``oracle_all`` — the bench's true quality and cost, on default arms only /
  on every arm: the best any router restricted to those arms can do at each λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.catalog import DEFAULT_BUDGET, Catalog
from r2ray.predictor.base import ArmPredictions, default_arm_mask
from r2ray.predictor.data import BenchArrays

SINGLE_PREFIX = "single:"
RANDOM, ORACLE_DEFAULT, ORACLE_ALL = "random", "oracle_default", "oracle_all"


@dataclass(frozen=True)
class MethodScores:
    """A method's belief per (query, arm): quality [N, K] and cost_usd [N, K]; NaN = unusable."""

    quality: np.ndarray
    cost_usd: np.ndarray


def scores_from_predictions(predictions: ArmPredictions, catalog: Catalog,
                            input_tokens: np.ndarray) -> MethodScores:
    """A learned method's q̂ and ĉ = input tokens × price in + t̂ × price out (USD)."""
    return MethodScores(np.asarray(predictions.quality, dtype=np.float64),
                        predictions.cost_usd(catalog, input_tokens))


def single_model_names(catalog: Catalog) -> list[str]:
    """``single:<model>`` for every model that offers a default arm, in catalogue order."""
    return [SINGLE_PREFIX + name for name in catalog.model_names
            if DEFAULT_BUDGET in catalog.budgets_of(name)]


def single_model(test: BenchArrays, catalog: Catalog, model: str) -> MethodScores:
    """Always the model's default arm."""
    quality = np.full(test.quality.shape, np.nan)
    quality[:, catalog.arm_of(model, DEFAULT_BUDGET)] = 1.0
    return MethodScores(quality, test.cost_usd)


def oracle(test: BenchArrays, arms: np.ndarray) -> MethodScores:
    """The bench's true outcomes on the arms in ``arms`` ([K] bool)."""
    quality = np.where(arms[None, :], test.quality.astype(np.float64), np.nan)
    return MethodScores(quality, test.cost_usd)


def random_point(test: BenchArrays, arms: np.ndarray,
                 replay: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cost USD [1], quality [1]): the expected outcome of a uniform pick among ``arms`` per query.

    ``replay`` (a sampled bench): the mean over every (query, arm in ``arms``) the bench has,
    which estimates the same expectation when the dealt arms do not depend on the query."""
    present = arms[None, :] & test.mask
    if replay:
        if not present.any():
            raise ValueError("the bench has none of the arms random picks from")
        return np.array([test.cost_usd[present].mean()]), np.array([test.quality[present].mean()])
    count = present.sum(axis=1)
    if (count == 0).any():
        raise ValueError(f"query {str(test.query_id[int(np.argmax(count == 0))])!r} has none of the "
                         "arms random picks from")
    quality = np.where(present, test.quality, 0.0).sum(axis=1) / count
    cost = np.where(present, test.cost_usd, 0.0).sum(axis=1) / count
    return np.array([cost.mean()]), np.array([quality.mean()])


def non_learned_scores(test: BenchArrays, catalog: Catalog) -> dict[str, MethodScores]:
    """Every λ-steered method that needs no training: single models and both oracles."""
    scores = {name: single_model(test, catalog, name.removeprefix(SINGLE_PREFIX))
              for name in single_model_names(catalog)}
    scores[ORACLE_DEFAULT] = oracle(test, default_arm_mask(catalog))
    scores[ORACLE_ALL] = oracle(test, np.ones(catalog.n_arms, dtype=bool))
    return scores
