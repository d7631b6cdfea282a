"""A tiny world with planted structure for predictor tests (numpy only, seeded).

Queries are random vectors; each model has a skill direction, so which model answers a query well
depends on the embedding. Longer budgets help up to the query's needed length; output tokens follow
the budget (or the model's verbosity at default). Labels are Bernoulli draws of the true quality,
so a predictor that learns the structure beats the per-arm mean by a clear margin.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from r2ray.catalog import DEFAULT_BUDGET, Catalog, catalog_from_dict
from r2ray.predictor.base import ArmPredictions
from r2ray.predictor.data import BenchArrays

TOPICS = ["math", "code", "chat"]


def small_catalog(budgets=(20, 100, 400, "default"), n_models: int = 3) -> Catalog:
    models = [{"name": f"model-{m}", "input_per_m": 0.1 * (m + 1), "output_per_m": 0.5 * (m + 1) ** 2,
               "context": 8192} for m in range(n_models)]
    return catalog_from_dict({"budgets": list(budgets), "models": models})


def planted_truth(catalog: Catalog, n_queries: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_queries, dim)).astype(np.float32)
    skills = np.random.default_rng(1234).normal(size=(len(catalog.models), dim))  # fixed per world
    arms = catalog.arm_arrays
    model, budget = arms["model_index"], arms["budget_tokens"].astype(np.float64)
    logit = x @ skills.T / np.sqrt(dim) * 2.5 + 0.3 * np.arange(len(skills))          # [N, M]
    capability = 1 / (1 + np.exp(-logit))
    needed = np.exp(4.0 + 0.8 * np.tanh(x[:, :1]))                                    # [N, 1]
    sufficiency = np.where(budget == DEFAULT_BUDGET, 0.9, 1 - np.exp(-budget / needed))  # [N, K]
    quality = capability[:, model] * sufficiency
    verbosity = 1.0 + 0.5 * model
    natural = needed * verbosity[model] * 1.3
    tokens = np.where(budget == DEFAULT_BUDGET, natural, np.minimum(0.9 * budget, natural))
    return {"x": x, "quality": quality.astype(np.float32), "tokens": tokens.astype(np.float32)}


def planted_arrays(catalog: Catalog, n_queries: int = 600, dim: int = 16, seed: int = 0,
                   missing_share: float = 0.1) -> tuple[BenchArrays, np.ndarray]:
    """(BenchArrays with embeddings and some cells missing, true expected quality [N, K])."""
    truth = planted_truth(catalog, n_queries, dim, seed)
    rng = np.random.default_rng(seed + 1)
    labels = (rng.random(truth["quality"].shape) < truth["quality"]).astype(np.float32)
    tokens = np.round(truth["tokens"] * np.exp(0.1 * rng.normal(size=labels.shape)))
    missing = rng.random(labels.shape) < missing_share
    labels[missing], tokens[missing] = np.nan, np.nan
    n = n_queries
    input_tokens = np.full(n, 50.0)
    cost = catalog.arm_cost_usd(input_tokens, np.nan_to_num(tokens))
    arrays = BenchArrays(
        query_id=np.array([f"q{i}" for i in range(n)]),
        query=np.array([f"planted query {i} about {TOPICS[i % 3]}" for i in range(n)]),
        category=np.array([TOPICS[i % 3] for i in range(n)]),
        input_tokens=input_tokens, quality=labels, output_tokens=tokens.astype(np.float32),
        cost_usd=np.where(missing, np.nan, cost), embedding=truth["x"])
    return arrays, truth["quality"]


def planted_bench_table(catalog: Catalog, n_queries: int = 300, dim: int = 16,
                        seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(long bench table, queries table with query_id + embedding) of a planted world."""
    arrays, _ = planted_arrays(catalog, n_queries, dim, seed, missing_share=0.0)
    rows = {name: [] for name in ("query_id", "query", "category", "model", "budget",
                                  "input_tokens", "output_tokens", "quality", "truncated")}
    for i in range(arrays.n_queries):
        for j, arm in enumerate(catalog.arms):
            rows["query_id"].append(str(arrays.query_id[i]))
            rows["query"].append(str(arrays.query[i]))
            rows["category"].append(str(arrays.category[i]))
            rows["model"].append(arm.model)
            rows["budget"].append(arm.budget_tokens)
            rows["input_tokens"].append(int(arrays.input_tokens[i]))
            rows["output_tokens"].append(int(arrays.output_tokens[i, j]))
            rows["quality"].append(float(arrays.quality[i, j]))
            rows["truncated"].append(False)
    queries = pa.table({"query_id": arrays.query_id.tolist(),
                        "embedding": pa.array(arrays.embedding.tolist(), pa.list_(pa.float32()))})
    return pa.table(rows), queries


def model_folder(path, weights: bytes) -> str:
    """A stand-in encoder folder (a config and weights): enough to fingerprint, not to load."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return str(path)


def sampled_arrays(catalog: Catalog, n_queries: int, without_model: int,
                   never_dealt: np.ndarray) -> BenchArrays:
    """A sampled bench (one arm dealt per query, ``bench collect --arms 1``) of a planted world,
    whose queries ``never_dealt`` were dealt no arm of model ``without_model``."""
    arrays, _ = planted_arrays(catalog, n_queries, dim=8, seed=0, missing_share=0.0)
    model = catalog.arm_arrays["model_index"]
    rng = np.random.default_rng(0)
    dealt = rng.integers(0, catalog.n_arms, n_queries)
    dealt[never_dealt] = rng.choice(np.flatnonzero(model != without_model), len(never_dealt))
    kept = np.zeros(arrays.quality.shape, bool)
    kept[np.arange(n_queries), dealt] = True
    return replace(arrays, **{name: np.where(kept, getattr(arrays, name), np.nan)
                              for name in ("quality", "output_tokens", "cost_usd")})


class OneModelBeliever:
    """A learned method sure that ``model`` answers everything: every pick is an arm of it."""

    def __init__(self, catalog: Catalog, model: int):
        self.believed = (catalog.arm_arrays["model_index"] == model).astype(np.float32)

    def fit(self, train: BenchArrays, catalog: Catalog) -> OneModelBeliever:
        return self

    def predict(self, embedding: np.ndarray, raw_quality: bool = False) -> ArmPredictions:
        quality = np.repeat(self.believed[None], len(embedding), axis=0)
        return ArmPredictions(quality, np.full(quality.shape, 10.0, np.float32))


def budget_skewed(catalog, n, seed):
    """q̂ rising with the budget in each model, default on top; labels better than said at budget
    20 and worse at 100, so maps fitted per arm would reverse the two."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, (n, 1))
    budget = catalog.arm_arrays["budget_tokens"]
    step = np.select([budget == 20, budget == 100, budget == 400], [0.0, 0.05, 0.1], 0.15)
    shift = np.select([budget == 20, budget == 100], [0.15, -0.15], 0.0)
    said = (base + step).astype(np.float32)
    labels = (rng.random(said.shape) < np.clip(said + shift, 0, 1)).astype(np.float32)
    return said, labels
