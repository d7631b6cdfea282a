"""The budget solve when hull chains live in Ray Data blocks (step tables: :mod:`.table`).

Each pass is one Ray task per block; the driver merges exact integer histograms (at most
65,536 bins per tenant), per-tenant scalars and at most ``fill_limit`` fill candidates, so its
memory does not depend on the number of queries, and the result is bit-identical to the
in-memory ``solve_budget`` on the same chains and keys. The chosen arms stay in the cluster:
``DatasetSolveResult.arms`` is a Dataset of ``query_pos, arm, filled`` — or, with ``then``, of
what ``then`` made of each block with its ``arm`` and ``lambda_star`` columns, in the same task
(no second pass and no re-aligning of blocks).
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
from r2ray.solver.table import steps_to_table, table_to_steps


def _block(table: pa.Table, defer: bool, grouped: bool) -> StepBlock:
    steps, pos, keys, tenant = table_to_steps(table)
    return StepBlock(with_defer_arm(steps) if defer else steps, pos, keys,
                     tenant if grouped else None)


def _run_pass(table, defer, grouped, fn, args):
    return fn(_block(table, defer, grouped), *args)


def _run_assign(table, defer, grouped, selection, fill_pos, then):
    block = _block(table, defer, grouped)
    (arm, filled), totals = block_assign(block, selection, fill_pos)
    if then is not None:   # the block itself, with its arms and the price of its budget group
        fn, kwargs = then
        lam = np.asarray(selection.lam64, np.uint64).view(np.float64)
        group = block.group if block.group is not None else np.zeros(len(arm), np.int64)
        table = table.append_column("arm", pa.array(arm)).append_column(
            "lambda_star", pa.array(lam[group], pa.float64()))
        return fn(table, **kwargs), totals
    return pa.table({"query_pos": block.query_pos, "arm": arm, "filled": filled}), totals


class RayPasses:
    """Runs each pass as one Ray task per block and merges the parts as they arrive."""

    def __init__(self, dataset, *, defer: bool, grouped: bool, num_cpus: float, then=None):
        import ray
        self.ray, self.defer, self.grouped = ray, defer, grouped
        self.then = None if then is None else ray.put(then)
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
        parts = [self.assign_task.remote(ref, self.defer, self.grouped, selection, fill_pos,
                                         self.then) for ref in self.refs]
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
                  fill_limit: int = FILL_LIMIT, num_cpus: float = 0.5,
                  then: tuple | None = None) -> DatasetSolveResult:
    """``solve_budget`` over a Dataset of step tables (see the module docstring).

    budget_usd: one budget for the whole backlog, or a sequence of per-tenant budgets indexed
    by the ``tenant`` column. then: ``(fn, kwargs)``; ``fn(block + arm, lambda_star columns,
    **kwargs)`` runs where each block's arms are chosen; the Arrow tables it returns make ``arms``.
    """
    budgets = validated_budgets(budget_usd)
    grouped = np.ndim(budget_usd) > 0
    if grouped and "tenant" not in dataset.schema().names:
        raise ValueError("per-tenant budgets need a 'tenant' column in the step tables")
    passes = RayPasses(dataset, defer=defer, grouped=grouped, num_cpus=num_cpus, then=then)
    outcome, arms = run_solve(passes, budgets, seed=seed, fill_limit=fill_limit)
    return DatasetSolveResult(arms, certificates(outcome))


def steps_dataset(steps: HullSteps, *, query_key=None, tenant=None, n_blocks: int = 8):
    """A Ray Dataset of step tables split into ``n_blocks`` blocks (for tests and demos)."""
    import ray.data
    table = steps_to_table(steps, query_key=query_key, tenant=tenant)
    size = -(-max(table.num_rows, 1) // n_blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
