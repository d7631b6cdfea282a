"""The budget solve when hull chains live in Ray Data blocks.

Column layout of a step table (one row per query; ``STEP_SCHEMA``):
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

Each pass is one Ray task per block; the driver merges exact integer histograms (at most
65,536 bins per tenant), per-tenant scalars and at most ``fill_limit`` fill candidates, so its
memory does not depend on the number of queries, and the result is bit-identical to the
in-memory ``solve_budget`` on the same chains and keys. The chosen arms stay in the cluster:
``DatasetSolveResult.arms`` is a Dataset of ``query_pos, arm, filled``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from r2ray.solver.blocks import StepBlock, with_defer_arm
from r2ray.solver.budget import (
    CertifiedResult, DualCertificate, certificates, validated_budgets)
from r2ray.solver.hull import HullSteps, empty_steps
from r2ray.solver.passes import block_assign
from r2ray.solver.search import FILL_LIMIT, run_solve

STEP_SCHEMA = pa.schema([
    ("query_pos", pa.int64()), ("query_key", pa.uint64()), ("tenant", pa.int32()),
    ("base_arm", pa.int32()), ("base_q", pa.float64()), ("base_c", pa.float64()),
    ("invalid_arms", pa.int32()), ("step_arm", pa.large_list(pa.int32())),
    ("dq", pa.large_list(pa.float64())), ("dc", pa.large_list(pa.float64())),
    ("key", pa.large_list(pa.float32())),
])


def steps_to_table(steps: HullSteps, *, query_key=None, tenant=None, start: int = 0) -> pa.Table:
    """Step table of in-memory chains; query positions start at ``start``."""
    n = steps.n_queries
    pos = np.arange(start, start + n, dtype=np.int64)
    keys = pos.astype(np.uint64) if query_key is None else np.asarray(query_key, np.uint64)
    offsets = pa.array(steps.offsets, pa.int64())
    def chain(values, kind):
        return pa.LargeListArray.from_arrays(offsets, pa.array(values, kind))

    columns = {
        "query_pos": pos, "query_key": keys,
        "tenant": None if tenant is None else np.asarray(tenant, np.int32),
        "base_arm": steps.base_arm, "base_q": steps.base_q, "base_c": steps.base_c,
        "invalid_arms": steps.invalid_arms,
        "step_arm": chain(steps.step_arm, pa.int32()), "dq": chain(steps.dq, pa.float64()),
        "dc": chain(steps.dc, pa.float64()), "key": chain(steps.key, pa.float32()),
    }
    schema = STEP_SCHEMA if tenant is not None else STEP_SCHEMA.remove(2)
    return pa.table({k: v for k, v in columns.items() if v is not None}, schema=schema)


def table_to_steps(table: pa.Table):
    """(HullSteps, query_pos, query_key, tenant or None) of a step table or record batch."""
    col = lambda name: table.column(name).to_numpy()   # noqa: E731
    lists = {name: _flat_list(table.column(name)) for name in ("step_arm", "dq", "dc", "key")}
    offsets = lists["dq"][0]
    steps = HullSteps(col("base_arm").astype(np.int32), col("base_q"), col("base_c"), offsets,
                      lists["step_arm"][1].astype(np.int32), lists["dq"][1], lists["dc"][1],
                      lists["key"][1].astype(np.float32), col("invalid_arms").astype(np.int32))
    tenant = col("tenant").astype(np.int32) if "tenant" in table.column_names else None
    return steps, col("query_pos").astype(np.int64), col("query_key").astype(np.uint64), tenant


def _flat_list(column) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets from 0, flat values) of a (large_)list column, slices respected."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets - offsets[0], arr.flatten().to_numpy(zero_copy_only=False)


def _block(table: pa.Table, defer: bool, grouped: bool) -> StepBlock:
    steps, pos, keys, tenant = table_to_steps(table)
    return StepBlock(with_defer_arm(steps) if defer else steps, pos, keys,
                     tenant if grouped else None)


def _run_pass(table, defer, grouped, fn, args):
    return fn(_block(table, defer, grouped), *args)


def _run_assign(table, defer, grouped, selection, fill_pos):
    block = _block(table, defer, grouped)
    (arm, filled), totals = block_assign(block, selection, fill_pos)
    arms = pa.table({"query_pos": block.query_pos, "arm": arm, "filled": filled})
    return arms, totals


class RayPasses:
    """Runs each pass as one Ray task per block and merges the parts as they arrive."""

    def __init__(self, dataset, *, defer: bool, grouped: bool, num_cpus: float):
        import ray
        self.ray, self.defer, self.grouped = ray, defer, grouped
        self.refs = dataset.to_arrow_refs()
        if not self.refs:                       # an empty backlog still needs one (empty) block
            tenant = np.zeros(0, np.int32) if grouped else None
            self.refs = [ray.put(steps_to_table(empty_steps(), tenant=tenant))]
        self.task = ray.remote(num_cpus=num_cpus)(_run_pass)
        self.assign_task = ray.remote(num_cpus=num_cpus, num_returns=2)(_run_assign)

    def reduce(self, fn, args: tuple, merge):
        args_ref = self.ray.put(args)
        pending = [self.task.remote(ref, self.defer, self.grouped, fn, args_ref)
                   for ref in self.refs]
        return self._merged(pending, merge)

    def assign(self, selection, fill_pos):
        from ray.data import from_arrow_refs
        parts = [self.assign_task.remote(ref, self.defer, self.grouped, selection, fill_pos)
                 for ref in self.refs]
        totals = self._merged([t for _, t in parts], lambda a, b: a.merge(b))
        return totals, from_arrow_refs([a for a, _ in parts])

    def _merged(self, pending, merge):
        out = None
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            part = self.ray.get(done[0])
            out = part if out is None else merge(out, part)
        return out


@dataclass(frozen=True)
class DatasetSolveResult(CertifiedResult):
    """Arms as a Dataset (``query_pos, arm, filled``) and the certificate(s)."""

    arms: object                                # ray.data.Dataset
    certificates: tuple[DualCertificate, ...]


def solve_dataset(dataset, budget_usd, *, seed: int = 0, defer: bool = False,
                  fill_limit: int = FILL_LIMIT, num_cpus: float = 0.5) -> DatasetSolveResult:
    """``solve_budget`` over a Dataset of step tables (see the module docstring).

    budget_usd: one budget for the whole backlog, or a sequence of per-tenant budgets indexed
    by the ``tenant`` column.
    """
    budgets = validated_budgets(budget_usd)
    grouped = np.ndim(budget_usd) > 0
    if grouped and "tenant" not in dataset.schema().names:
        raise ValueError("per-tenant budgets need a 'tenant' column in the step tables")
    passes = RayPasses(dataset, defer=defer, grouped=grouped, num_cpus=num_cpus)
    outcome, arms = run_solve(passes, budgets, seed=seed, fill_limit=fill_limit)
    return DatasetSolveResult(arms, certificates(outcome))


def steps_dataset(steps: HullSteps, *, query_key=None, tenant=None, n_blocks: int = 8):
    """A Ray Dataset of step tables split into ``n_blocks`` blocks (for tests and demos)."""
    import ray.data
    table = steps_to_table(steps, query_key=query_key, tenant=tenant)
    size = -(-max(table.num_rows, 1) // n_blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
