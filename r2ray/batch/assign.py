"""The assign stage: each block's chosen arms → routed prompts, written per model; sums for the
report. It runs inside the solver's last pass (``solve_dataset(..., then=...)``), on the block
whose arms were just chosen, so nothing is re-read or re-aligned.

``c_hat_usd`` is always the predicted cost ((input × p_in + t̂ × p_out) × the reconciliation's
per-arm factor, when one applies); a strict-budget solve
spent worst-case costs, so there it is recomputed from t̂. Each row's worst case at its cap goes
into the sums.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from r2ray import storage
from r2ray.batch.report import STATS_SCHEMA
from r2ray.bench.io import write_table
from r2ray.catalog import Catalog, catalog_from_yaml
from r2ray.manifest import routed_partition
from r2ray.prompting import MESSAGE_TYPE, render_messages_array
from r2ray.routing import arm_caps, call_cost_usd, worst_case_usd
from r2ray.solver import DEFER_ARM, chosen_on_chain
from r2ray.solver.table import list_values

ROUTED_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()),
    pa.field("tenant", pa.string()),
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),            # output tokens, 0 = default
    pa.field("messages", pa.list_(MESSAGE_TYPE)),
    pa.field("max_tokens", pa.int64()),        # hard cap sent to the model
    pa.field("q_hat", pa.float32()),           # predicted quality
    pa.field("t_hat", pa.float32()),           # predicted output tokens
    pa.field("c_hat_usd", pa.float64()),       # predicted cost, USD
    pa.field("lambda_star", pa.float64()),     # price of budget, quality per USD
    pa.field("model_version", pa.string()),
    pa.field("run_id", pa.string()),
])

DEFERRED_SCHEMA = pa.schema([        # a backlog's columns, so deferred/ can be re-queued as is
    pa.field("query_id", pa.string()),
    pa.field("query", pa.string()),
    pa.field("input_tokens", pa.int64()),      # as validated: given, or estimated from the text
    pa.field("tenant", pa.string()),
    pa.field("reason", pa.string()),           # why it was not routed
])


def assign_stage(batch: pa.Table, catalog_yaml: str, routed_uri: str, deferred_uri: str,
                 model_version: str, run_id: str, strict_budget: bool = False,
                 cost_factors: list[float] | None = None) -> pa.Table:
    """A scored block with the solve's ``arm`` and ``lambda_star`` columns → routed prompts
    written per model. ``strict_budget``: the chain's costs are worst case, not predicted.

    Returns per-(model, budget) sums for the report; queries on the defer arm or on no arm are
    written to ``deferred/`` with the reason.
    """
    catalog = catalog_from_yaml(catalog_yaml, "catalogue")
    arm = batch.column("arm").to_numpy()
    routed = arm >= 0
    part = f"part-{int(batch.column('order').to_numpy().min()):016x}.parquet" \
        if batch.num_rows else "part-empty.parquet"
    if (~routed).any():
        reasons = np.where(arm[~routed] == DEFER_ARM, "deferred: the budget could not pay for it",
                           "no arm available: every prediction was NaN/inf or too long")
        write_table(_deferred_table(batch.filter(pa.array(~routed)), reasons),
                    storage.join(deferred_uri, part))
    batch = batch.filter(pa.array(routed))
    chosen = _chosen(batch, arm[routed], catalog, strict_budget, cost_factors)
    stats = []
    for model in sorted(set(chosen["model"])):
        rows = chosen["model"] == model
        table = _routed_table(batch.filter(pa.array(rows)), {k: v[rows] for k, v in chosen.items()},
                              model, model_version, run_id)
        write_table(table, storage.join(routed_uri, routed_partition(model), part))
        for budget in np.unique(chosen["budget"][rows]):
            sel = rows & (chosen["budget"] == budget)
            stats.append({"model": model, "budget": int(budget), "queries": int(sel.sum()),
                          "spend_usd": float(chosen["c_hat"][sel].sum(dtype=np.float64)),
                          "worst_case_usd": float(chosen["worst_usd"][sel].sum(dtype=np.float64)),
                          "quality_sum": float(chosen["q_hat"][sel].sum(dtype=np.float64)),
                          "tokens_sum": float(chosen["t_hat"][sel].sum(dtype=np.float64))})
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


def _deferred_table(rest: pa.Table, reasons: np.ndarray) -> pa.Table:
    """Deferred rows as a backlog (``query_id, query, input_tokens, tenant``) plus the
    ``reason``, so ``deferred/`` can be read straight back as tomorrow's input, per tenant, with
    the token counts (tokens) the night was priced on. The embedding is not among them: scoring
    drops it, so a model without a text encoder needs it joined back from the input."""
    return pa.table({"query_id": rest.column("query_id"), "query": rest.column("query"),
                     "input_tokens": rest.column("input_tokens"),
                     "tenant": rest.column("tenant_name"),
                     "reason": pa.array(reasons, pa.string())}, schema=DEFERRED_SCHEMA)


def _chosen(batch: pa.Table, arm: np.ndarray, catalog: Catalog, strict_budget: bool,
            cost_factors: list[float] | None = None) -> dict[str, np.ndarray]:
    """Model, budget, predicted q̂, ĉ (USD, × ``cost_factors`` as scored), t̂ and worst-case
    cost (USD) of each chosen arm."""
    on_chain = chosen_on_chain(batch, arm)
    token_offsets, tokens = list_values(batch.column("hull_tokens"))
    t_hat = tokens[token_offsets[:-1] + on_chain.position]
    input_tokens = batch.column("input_tokens").to_numpy()
    arrays = catalog.arm_arrays
    if strict_budget:
        factor = 1.0 if cost_factors is None else np.asarray(cost_factors, np.float64)[arm]
        c_hat = call_cost_usd(catalog, input_tokens, t_hat, arm) * factor
    else:
        c_hat = on_chain.cost_usd
    rows = np.arange(len(arm))
    caps = arm_caps(catalog, input_tokens)   # [N, K]: routing.worst_case_usd's caps
    return {"arm": arm,
            "model": np.array(catalog.model_names, dtype=object)[arrays["model_index"][arm]],
            "budget": arrays["budget_tokens"][arm], "max_tokens": caps[rows, arm],
            "q_hat": on_chain.quality, "c_hat": c_hat, "t_hat": t_hat,
            "worst_usd": worst_case_usd(catalog, input_tokens, caps)[rows, arm]}


def _routed_table(batch: pa.Table, chosen: dict, model: str, model_version: str,
                  run_id: str) -> pa.Table:
    """One model's routed rows: :func:`r2ray.routing.routed_request` of each, as columns."""
    n = batch.num_rows
    return pa.table({
        "query_id": batch.column("query_id"),
        "tenant": batch.column("tenant_name"),
        "model": pa.repeat(pa.scalar(model, pa.string()), n),
        "budget": pa.array(chosen["budget"], pa.int32()),
        "messages": render_messages_array(batch.column("query"), chosen["budget"]),
        "max_tokens": pa.array(chosen["max_tokens"], pa.int64()),
        "q_hat": pa.array(chosen["q_hat"], pa.float32()),
        "t_hat": pa.array(chosen["t_hat"], pa.float32()),
        "c_hat_usd": pa.array(chosen["c_hat"], pa.float64()),
        "lambda_star": batch.column("lambda_star"),
        "model_version": pa.repeat(pa.scalar(model_version, pa.string()), n),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
    }, schema=ROUTED_SCHEMA)
