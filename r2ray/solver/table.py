"""The hull-step table: each query's hull chain as Arrow columns, one row per query.

This module owns the table: its schema, the writer (``step_columns``, ``steps_to_table``), the
reader (``table_to_steps``) and the chosen-arm lookup (``chosen_on_chain``). The batch job's
scored blocks are step tables with the query's other columns beside them; the distributed solve
reads them in place.

Columns (``STEP_SCHEMA``):
    query_pos     int64              position of the query in the backlog (unique)
    query_key     uint64             key hashed by the tie rule (the online side uses the same)
    tenant        int32              optional; index into the per-tenant budgets
    base_arm      int32              cheapest hull arm (NO_ARM if none)
    base_q        float64            its quality
    base_c        float64            its cost, USD
    invalid_arms  int32              NaN/inf arms removed
    step_arm      large_list<int32>  the hull chain: arm reached by each step
    dq, dc        large_list<float64>  quality and USD added by each step
    key           large_list<float32>  efficiency_key(dq / dc)
A table may carry per-hull-arm values beside them (``hull_values``: the base arm, then each
step's arm), such as the predicted output tokens the batch job renders.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from r2ray.solver.hull import HullSteps

STEP_SCHEMA = pa.schema([
    ("query_pos", pa.int64()), ("query_key", pa.uint64()), ("tenant", pa.int32()),
    ("base_arm", pa.int32()), ("base_q", pa.float64()), ("base_c", pa.float64()),
    ("invalid_arms", pa.int32()), ("step_arm", pa.large_list(pa.int32())),
    ("dq", pa.large_list(pa.float64())), ("dc", pa.large_list(pa.float64())),
    ("key", pa.large_list(pa.float32())),
])
CHAIN_COLUMNS = ("base_arm", "base_q", "base_c", "invalid_arms", "step_arm", "dq", "dc", "key")


def step_columns(steps: HullSteps) -> dict[str, pa.Array]:
    """The chain columns of :data:`STEP_SCHEMA` (everything but the query's keys)."""
    offsets = pa.array(steps.offsets, pa.int64())

    def chain(values, kind):
        return pa.LargeListArray.from_arrays(offsets, pa.array(values, kind))

    return {"base_arm": pa.array(steps.base_arm, pa.int32()),
            "base_q": pa.array(steps.base_q, pa.float64()),
            "base_c": pa.array(steps.base_c, pa.float64()),
            "invalid_arms": pa.array(steps.invalid_arms, pa.int32()),
            "step_arm": chain(steps.step_arm, pa.int32()), "dq": chain(steps.dq, pa.float64()),
            "dc": chain(steps.dc, pa.float64()), "key": chain(steps.key, pa.float32())}


def hull_values(steps: HullSteps, values: np.ndarray, kind=pa.float32()) -> pa.Array:
    """``values`` [N, K] read at each query's hull arms (base arm first) as a list column."""
    n = steps.n_queries
    hull_offsets = steps.offsets + np.arange(n + 1)
    arm = np.empty(hull_offsets[-1], dtype=np.int64)
    is_base = np.zeros(hull_offsets[-1], dtype=bool)
    is_base[hull_offsets[:-1]] = True
    arm[is_base] = np.maximum(steps.base_arm, 0)
    arm[~is_base] = steps.step_arm
    row = np.repeat(np.arange(n), steps.steps_per_query + 1)
    return pa.LargeListArray.from_arrays(pa.array(hull_offsets, pa.int64()),
                                         pa.array(values[row, arm], kind))


def steps_to_table(steps: HullSteps, *, query_key=None, tenant=None, start: int = 0) -> pa.Table:
    """Step table of in-memory chains; query positions start at ``start``."""
    pos = np.arange(start, start + steps.n_queries, dtype=np.int64)
    keys = pos.astype(np.uint64) if query_key is None else np.asarray(query_key, np.uint64)
    columns = {"query_pos": pos, "query_key": keys,
               "tenant": None if tenant is None else np.asarray(tenant, np.int32),
               **step_columns(steps)}
    schema = STEP_SCHEMA if tenant is not None else STEP_SCHEMA.remove(2)
    return pa.table({k: v for k, v in columns.items() if v is not None}, schema=schema)


def table_to_steps(table: pa.Table):
    """(HullSteps, query_pos, query_key, tenant or None) of a step table or record batch; the
    arrays are views of the table's buffers wherever Arrow allows (no copy)."""
    col = lambda name, dtype: table.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
    lists = {name: list_values(table.column(name)) for name in ("step_arm", "dq", "dc", "key")}
    offsets = lists["dq"][0]
    steps = HullSteps(col("base_arm", np.int32), col("base_q", np.float64),
                      col("base_c", np.float64), offsets,
                      lists["step_arm"][1].astype(np.int32, copy=False), lists["dq"][1],
                      lists["dc"][1], lists["key"][1].astype(np.float32, copy=False),
                      col("invalid_arms", np.int32))
    tenant = col("tenant", np.int32) if "tenant" in table.column_names else None
    return steps, col("query_pos", np.int64), col("query_key", np.uint64), tenant


def list_values(column) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets from 0, flat values) of a (large_)list column, slices respected."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets - offsets[0], arr.flatten().to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class ChosenOnChain:
    """Each query's chosen arm read off its chain: predicted q̂, ĉ (USD) and its hull position
    (0 = the base arm, t = the arm reached by step t; index into ``hull_values`` lists)."""

    quality: np.ndarray    # float64 [N]
    cost_usd: np.ndarray   # float64 [N]
    position: np.ndarray   # int64 [N]


def chosen_on_chain(table: pa.Table, arm: np.ndarray) -> ChosenOnChain:
    """Sum the steps up to each query's chosen ``arm`` (which must be on its chain)."""
    offsets, step_arm = list_values(table.column("step_arm"))
    _, dq = list_values(table.column("dq"))
    _, dc = list_values(table.column("dc"))
    n = table.num_rows
    step_query = np.repeat(np.arange(n), np.diff(offsets))
    local = np.arange(len(step_arm)) - offsets[:-1][step_query]
    position = np.zeros(n, dtype=np.int64)
    hit = step_arm == arm[step_query]
    position[step_query[hit]] = local[hit] + 1
    taken = local < position[step_query]
    return ChosenOnChain(
        table.column("base_q").to_numpy()
        + np.bincount(step_query[taken], weights=dq[taken], minlength=n),
        table.column("base_c").to_numpy()
        + np.bincount(step_query[taken], weights=dc[taken], minlength=n),
        position)
