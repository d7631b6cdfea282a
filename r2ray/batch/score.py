"""The score stage: validated queries → predictions → each query's hull chain, as Arrow columns.

Only the upper convex hull of a query's arms can be chosen by the budget solve, so a scored row
keeps just that chain (typically 5–6 arms of 176): the base arm plus steps (``step_arm``, ``dq``,
``dc`` USD, ``key`` = dq/dc as float32) and the predicted output tokens of every hull arm. That
keeps the materialised dataset small and lets the solve read it in constant passes.

The chain's costs are what the solve spends: predicted costs ĉ, or with ``strict_budget`` each
arm's worst case at its ``max_tokens`` cap, so the solve's Σ ≤ budget holds on any bill.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa


from r2ray.catalog import Catalog, catalog_from_yaml
from r2ray.encoders import check_embedding_dimension, embed_or_encode
from r2ray.failpoints import kill_worker_once
from r2ray.predictor.data import embedding_matrix
from r2ray.routing import arm_scores, query_key, solve_costs
from r2ray.solver import HullSteps, hull_steps, hull_values, step_columns
from r2ray.solver.table import CHAIN_COLUMNS

SCORED_COLUMNS = [*CHAIN_COLUMNS, "hull_tokens"]


def query_embeddings(table: pa.Table, encoder, dimension: int) -> np.ndarray:
    """[N, D] float32: the ``embedding`` column where given (non-null), the encoder elsewhere."""
    column = (table.column("embedding").combine_chunks()
              if "embedding" in table.column_names else None)
    if column is not None and table.num_rows and column.null_count == 0:  # all given: one copy
        return check_embedding_dimension(embedding_matrix(column), dimension, "the embeddings")
    given = np.full((table.num_rows, dimension), np.nan, dtype=np.float32)
    if column is not None:
        present = ~column.is_null().to_numpy(zero_copy_only=False)
        if present.any():
            given[present] = embedding_matrix(column.filter(pa.array(present)))
    return embed_or_encode(table.column("query").to_pylist(), given, encoder, dimension)


def hull_columns(steps: HullSteps, output_tokens: np.ndarray) -> dict[str, pa.Array]:
    """The step-table columns of :mod:`r2ray.solver.table` plus ``hull_tokens``: predicted output
    tokens of each hull arm, base arm first."""
    return {**step_columns(steps), "hull_tokens": hull_values(steps, output_tokens)}


def score_batch(table: pa.Table, predictor, catalog: Catalog, encoder=None,
                strict_budget: bool = False, cost_factors: np.ndarray | None = None) -> pa.Table:
    """Validated queries (``query_id, query, input_tokens, tenant, order`` [+ ``embedding``]) →
    the same rows without the embedding, plus the hull columns of :data:`SCORED_COLUMNS`; the
    hull's costs (USD) are predicted (× ``cost_factors`` [K] from a reconciliation), or worst
    case at the caps with ``strict_budget``."""
    if table.num_rows == 0:
        return _empty_scored(table)
    embedding = query_embeddings(table, encoder, predictor.embedding_dim_)
    predictions = predictor.predict(embedding)
    input_tokens = table.column("input_tokens").to_numpy()
    scores = arm_scores(predictions.quality, predictions.output_tokens, catalog, input_tokens,
                        cost_factors=cost_factors)
    cost_usd = solve_costs(scores, catalog, input_tokens, strict_budget)   # same mask (NaN)
    columns = hull_columns(hull_steps(scores.quality, cost_usd), scores.output_tokens)
    return _with_columns(table, columns)


def _with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Drop the embedding, keep the tenant as ``tenant_name`` (the solver's ``tenant`` is an
    index), add the solver's keys and the hull. ``query_pos`` is the input order (unique);
    ``query_key`` is :func:`r2ray.routing.query_key` of the id, the key Serve hashes too."""
    out = table.drop_columns([c for c in ("embedding",) if c in table.column_names])
    out = out.rename_columns(["tenant_name" if c == "tenant" else c for c in out.column_names])
    keys = np.fromiter((query_key("", qid) for qid in out.column("query_id").to_pylist()),
                       dtype=np.uint64, count=out.num_rows)
    out = out.append_column("query_pos", pa.array(out.column("order").to_numpy(), pa.int64()))
    out = out.append_column("query_key", pa.array(keys, pa.uint64()))
    for name, column in columns.items():
        out = out.append_column(name, column)
    return out


def _empty_scored(table: pa.Table) -> pa.Table:
    steps = hull_steps(np.zeros((0, 1), np.float32), np.zeros((0, 1)))
    return _with_columns(table, hull_columns(steps, np.zeros((0, 1), np.float32)))


def predictor_files(directory: str) -> dict[str, bytes]:
    """The files of a saved predictor, to ship to workers through Ray's object store."""
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


def use_threads(predictor, threads: int) -> None:
    """Set the torch threads a loaded predictor predicts with, in it and in the fitted members a
    composite holds (its saved ``threads`` is the training setting)."""
    if hasattr(predictor, "threads"):
        predictor.threads = threads
    for member in [*(getattr(predictor, "members_", None) or []),
                   getattr(predictor, "winner_", None)]:
        if member is not None:
            use_threads(member, threads)


class ScoreWorker:
    """Ray Data actor: loads the predictor (and encoder) once, then scores batches on its device.

    Takes the saved predictor's files as bytes so workers on other nodes need no shared disk.
    ``threads``: torch intra-op threads for the encoder and the predictor (Ray's own guess from a
    fractional CPU request is one; the pool's shape says, :mod:`r2ray.batch.pool`).
    ``precision``: the encoder's forward pass (:func:`r2ray.encoders.load_encoder`). ``label``:
    the model's URI or folder, named when its encoder here is not the one it was trained with.
    """

    def __init__(self, files: dict[str, bytes], catalog_yaml: str | None = None,
                 device: str | None = None, strict_budget: bool = False,
                 cost_factors: list[float] | None = None, threads: int | None = None,
                 precision: str | None = "auto", label: str = "the model"):
        import torch

        from r2ray.encoders import default_device, model_encoder
        from r2ray.predictor.persist import load_predictor

        if threads:
            torch.set_num_threads(threads)
        device = device or default_device()
        with tempfile.TemporaryDirectory(prefix="r2ray-worker-") as folder:
            for name, data in files.items():
                with open(os.path.join(folder, name), "wb") as handle:
                    handle.write(data)
            self.predictor = load_predictor(folder, device=device)
        if threads:
            use_threads(self.predictor, threads)
        self.catalog = (self.predictor.catalog_ if catalog_yaml is None
                        else catalog_from_yaml(catalog_yaml, "--catalog"))
        self.encoder = model_encoder(self.predictor.encoder_spec,
                                     self.predictor.encoder_fingerprint, label, device=device,
                                     precision=precision)
        self.strict_budget = strict_budget
        self.cost_factors = None if cost_factors is None else np.asarray(cost_factors, np.float64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        kill_worker_once()
        return score_batch(batch, self.predictor, self.catalog, self.encoder, self.strict_budget,
                           self.cost_factors)


class EncodeOnlyWorker(ScoreWorker):
    """The scoring pool's encoder pass alone (no predictor call, no hull): ``benchmarks/batch.py``
    runs it in the job's own pool shape to tell the encoder's cost from the rest of scoring."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = query_embeddings(batch, self.encoder, self.predictor.embedding_dim_)
        return pa.table({"rows": [len(vectors)]})
