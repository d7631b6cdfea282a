"""The budget solve when hull chains live in Ray Data blocks (step tables: :mod:`.table`).

One Ray task per block first keeps only the step columns (the batch job's blocks carry the
query's text and predictions beside them). When those fit one process (``local_limit_bytes``),
a :class:`SolveWorker` actor gathers them and runs the in-memory passes: a round of Ray tasks
costs far more than the whole solve of a few hull steps per query (measured in
``benchmarks/solver.py``); the actor, not the driver, so that the driver's memory does not grow
with the backlog. Past the limit, each pass is one Ray task per block; the driver merges exact integer
histograms (at most 65,536 bins per tenant), per-tenant scalars and at most ``fill_limit``
fill candidates, so its memory does not depend on the number of queries. Either way the
passes are the same pure functions with exact merges, so the result is bit-identical to the
in-memory ``solve_budget`` on the same chains and keys.

The chosen arms stay in the cluster: ``DatasetSolveResult.arms`` is a Dataset of
``query_pos, arm, filled`` — or, with ``then``, of what ``then`` made of each block with its
``arm`` and ``lambda_star`` columns, where the block is (the solver's arms are sent to a block
elsewhere as a slice: no second pass and no re-aligning of blocks).
"""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from r2ray.solver.blocks import StepBlock, with_defer_arm
from r2ray.solver.budget import (
    CertifiedResult, DualCertificate, LocalPasses, certificates, validated_budgets)
from r2ray.solver.hull import HullSteps, empty_steps, hull_steps
from r2ray.solver.passes import block_assign
from r2ray.solver.search import FILL_LIMIT, run_solve
from r2ray.solver.table import CHAIN_COLUMNS, steps_to_table, table_to_steps

LOCAL_SOLVE_BYTES = 1 << 30     # step columns solved in one process at most (about 4M queries
                                # at 10 steps each; the solve then holds ~4x this, ~10 s/4M)
LOCAL_SOLVE_ENV = "R2RAY_LOCAL_SOLVE_BYTES"   # overrides the default limit
MEMORY_SHARE = 8                # the gathered columns may use 1/8 of the node's free memory
log = logging.getLogger(__name__)


def local_solve_limit(available_bytes: int | None = None) -> int:
    """Bytes of step columns solved in memory in one :class:`SolveWorker`:
    ``R2RAY_LOCAL_SOLVE_BYTES`` if set, else ``LOCAL_SOLVE_BYTES`` capped at 1/``MEMORY_SHARE``
    of ``available_bytes``, the memory available now on the solver's node
    (:meth:`SolveWorker.placement`; default: this node's)."""
    override = local_solve_limit_override()
    if override is not None:
        return override
    return min(LOCAL_SOLVE_BYTES, (available_bytes if available_bytes is not None
                                   else available_memory()) // MEMORY_SHARE)


def local_solve_limit_override() -> int | None:
    """``R2RAY_LOCAL_SOLVE_BYTES`` as bytes of step columns (None: unset). A value that is not a
    whole number of bytes of at least 0 is an error naming the variable: read as it was, "1GB"
    raised a ValueError traceback once every query was scored, and "-5" sent every solve to the
    distributed passes without a word."""
    from r2ray.errors import R2RayError

    value = os.environ.get(LOCAL_SOLVE_ENV, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):   # no sign, point, exponent or unit
        raise R2RayError(f"{LOCAL_SOLVE_ENV}={value!r}: give a whole number of bytes of at "
                         f"least 0 (default {LOCAL_SOLVE_BYTES:,}, at most 1/{MEMORY_SHARE} of "
                         "the free memory), or unset it")
    return int(value)


def available_memory() -> int:
    """Bytes of memory available now on this node (psutil's ``available``)."""
    import psutil
    return int(psutil.virtual_memory().available)


def _step_names(grouped: bool) -> list[str]:
    return ["query_pos", "query_key", *(["tenant"] if grouped else []), *CHAIN_COLUMNS]


def _project(table: pa.Table, grouped: bool):
    """The block's step columns only, and their size in bytes."""
    steps = table.select(_step_names(grouped))
    return steps, steps.nbytes


def _block(table: pa.Table, defer: bool, grouped: bool) -> StepBlock:
    steps, pos, keys, tenant = table_to_steps(table)
    return StepBlock(with_defer_arm(steps) if defer else steps, pos, keys,
                     tenant if grouped else None)


def _one_block(tables: list[pa.Table], defer: bool, grouped: bool) -> StepBlock:
    """The step tables copied into one block (their list columns may mix 32- and 64-bit
    offsets: promoted to 64-bit)."""
    return _block(pa.concat_tables(tables, promote_options="permissive"), defer, grouped)


def _run_pass(table, defer, grouped, fn, args):
    return fn(_block(table, defer, grouped), *args)


def _with_arms(table: pa.Table, query_pos, arm, filled, lam_row, then) -> pa.Table:
    """``then`` of the block with its ``arm`` and ``lambda_star`` columns, or without ``then``
    the ``query_pos, arm, filled`` table."""
    if then is None:
        return pa.table({"query_pos": query_pos, "arm": arm, "filled": filled})
    fn, kwargs = then
    return fn(table.append_column("arm", pa.array(arm)).append_column(
        "lambda_star", pa.array(lam_row, pa.float64())), **kwargs)


def _lambda_per_query(lam64: np.ndarray, group: np.ndarray | None, n: int) -> np.ndarray:
    """float64 [n]: the λ* of each query's budget group."""
    lam = np.asarray(lam64, np.uint64).view(np.float64)
    return lam[group] if group is not None else np.full(n, lam[0])


def _run_assign(table, defer, grouped, selection, fill_pos, then):
    block = _block(table, defer, grouped)
    (arm, filled), totals = block_assign(block, selection, fill_pos)
    lam_row = _lambda_per_query(selection.lam64, block.group, len(arm))
    out = _with_arms(table, block.query_pos, arm, filled, lam_row, then)
    return out, (totals, _block_metadata(out))


def _attach(then, lam64, grouped: bool, table: pa.Table, arm: np.ndarray):
    """The last step of the in-memory solve for one block (in a thread of the solver for its
    node's blocks, in a task where the block lives for the others): the block with its slice of the
    arms, through ``then``. Returns the output and its Ray Data block metadata, which tells the
    driver it is done (or raises ``then``'s error there, as the passes would) and spares
    ``from_arrow_refs`` a round of tasks computing it."""
    group = table.column("tenant").to_numpy().astype(np.int64) if grouped else None
    out = _with_arms(table, None, arm, None, _lambda_per_query(lam64, group, len(arm)), then)
    return out, _block_metadata(out)


def _node_cpus(ray) -> int:
    """CPUs of the node this driver runs on (at least 1)."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0)
    return max(1, int(cpus))


def _block_metadata(table: pa.Table):
    try:
        from ray.data._internal.util import get_table_block_metadata_schema
    except ImportError:                         # another Ray: from_arrow_refs computes it
        return None
    return get_table_block_metadata_schema(table)


def _arms_dataset(refs: list, metadata: list):
    """A Dataset of the output tables, from the metadata their tasks computed (what
    ``ray.data.from_arrow_refs`` does after one more round of tasks), or that round."""
    from ray.data import from_arrow_refs
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:
        return from_arrow_refs(refs)
    if any(m is None for m in metadata):
        return from_arrow_refs(refs)
    context = DataContext.get_current().copy()
    stats = DatasetStats(metadata={"FromArrow": metadata}, parent=None)
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metadata), context), context, stats)


class RayPasses:
    """Runs each pass as one Ray task per block and merges the parts as they arrive.

    refs: the blocks ``then`` sees; step_refs: their step columns, which the passes read."""

    def __init__(self, refs, step_refs, *, defer: bool, grouped: bool, num_cpus: float,
                 then=None):
        import ray
        self.ray, self.defer, self.grouped = ray, defer, grouped
        self.then = None if then is None else ray.put(then)
        self.refs, self.step_refs = refs, step_refs
        self.task = ray.remote(num_cpus=num_cpus)(_run_pass)
        self.assign_task = ray.remote(num_cpus=num_cpus, num_returns=2)(_run_assign)

    def reduce(self, fn, args: tuple, merge):
        args_ref = self.ray.put(args)
        pending = [self.task.remote(ref, self.defer, self.grouped, fn, args_ref)
                   for ref in self.step_refs]
        return self._merged(pending, merge)

    def assign(self, selection, fill_pos):
        refs = self.refs if self.then is not None else self.step_refs
        parts = [self.assign_task.remote(ref, self.defer, self.grouped, selection, fill_pos,
                                         self.then) for ref in refs]
        done = self.ray.get([t for _, t in parts])
        totals = done[0][0]
        for part, _ in done[1:]:
            totals = totals.merge(part)
        return totals, _arms_dataset([a for a, _ in parts], [meta for _, meta in done])

    def _merged(self, pending, merge):
        out = None
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            part = self.ray.get(done[0])
            out = part if out is None else merge(out, part)
        return out


def _solve_gathered(refs, here: list[bool], step_tables: list[pa.Table], budgets, *, defer,
                    grouped, seed, fill_limit, then):
    """The in-memory passes over the gathered step columns, copied into one block (200,000
    queries in 16 blocks: the whole solve took 157 ms, in one block 129 ms, the same arms).

    Returns the outcome and, per block, what goes back to the caller: without ``then``, its
    ``query_pos, arm, filled`` table; with ``then``, for a block in this node's object store
    (``here``: read in place) ``then``'s output, else the block's slice of the arms for a task
    where the block lives. Beside each, the output's Ray Data block metadata (None for a slice)."""
    import ray
    block = _one_block(step_tables, defer, grouped)
    pos = block.query_pos
    outcome, (arm, filled) = run_solve(LocalPasses([block]), budgets, seed=seed,
                                       fill_limit=fill_limit)
    bounds = np.cumsum([0, *(t.num_rows for t in step_tables)])
    rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if then is None:
        tables = [_with_arms(None, pos[r], arm[r], filled[r], None, None) for r in rows]
        return outcome, tables, [_block_metadata(t) for t in tables]
    outs, metadata = [arm[r] for r in rows], [None] * len(refs)
    # this node's blocks, read in place, go through ``then`` in threads, one per CPU: a task
    # would wake or start a worker process and import ``then``'s module first (1-2 s per task
    # on a busy 2-core host, more than the batch job's assign of 200,000 rows)
    local = [i for i, h in enumerate(here) if h]

    def attach_here(i: int, table: pa.Table):
        return _attach(then, outcome.selection.lam64, grouped, table, arm[rows[i]])

    with ThreadPoolExecutor(max_workers=_node_cpus(ray), thread_name_prefix="r2ray-then") as pool:
        for i, (out, meta) in zip(local, pool.map(attach_here, local,
                                                  ray.get([refs[i] for i in local]))):
            outs[i], metadata[i] = out, meta
    return outcome, outs, metadata


class SolveWorker:
    """The process the in-memory solve runs in: a Ray actor, so the driver holds none of the
    step columns nor the solve's arrays (about 0.7 KB per query at its peak, measured on the
    batch job; the driver's memory stays flat in N) and the solve runs on a node that runs
    work, not on a head started with no CPUs for work (as ``infra/k8s`` starts it).

    Started with no CPUs (:func:`start_solver`): it waits while the workers score (on 2 CPUs,
    actors holding 1.75 of them left Ray Data's repartition tasks no room and the job hung) and
    computes once they are done. ``warm_up`` loads the solve's compiled kernels and ``then``'s
    module meanwhile, so its first solve starts warm."""

    def warm_up(self, defer: bool = False, modules: tuple[str, ...] = ()) -> str:
        import importlib
        warm_up(defer)
        _block_metadata(pa.table({"x": [0]}))   # imports Ray Data: 0.8 s on a block's first use
        for module in modules:
            importlib.import_module(module)
        return self.node()

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def placement(self) -> tuple[str, int]:
        """(this actor's node, the bytes of memory available on it): where the solve reads
        blocks in place, and what caps its size."""
        return self.node(), available_memory()

    def solve(self, refs: list, projected: list, here: list[bool], budgets, defer: bool,
              grouped: bool, seed: int, fill_limit: int, then):
        """((outcome, metadata per block), outputs per block...): see :func:`_solve_gathered`;
        the outputs are returned one object each, so the caller owns them. ``here``: the
        blocks in this node's object store, whose step columns are read in place;
        ``projected``: refs to the others' step columns."""
        import ray
        local = iter(ray.get([ref for ref, h in zip(refs, here) if h]))
        tables = [_project(next(local), grouped)[0] if h else ray.get(p)
                  for h, p in zip(here, projected)]
        outcome, outs, metadata = _solve_gathered(
            refs, here, tables, budgets, defer=defer, grouped=grouped, seed=seed,
            fill_limit=fill_limit, then=then)
        return ((outcome, metadata), *outs)


def start_solver(defer: bool = False, modules: tuple[str, ...] = ()):
    """A :class:`SolveWorker` actor on :func:`_solver_node`, its ``warm_up`` sent (not awaited:
    the batch job starts it before its workers score). ``modules``: what ``then`` imports."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    actor = ray.remote(SolveWorker).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(_solver_node(ray),
                                                                       soft=True)).remote()
    actor.warm_up.remote(defer, tuple(modules))
    return actor


def _solver_node(ray) -> str:
    """The node with the most memory among those that run work (CPU > 0); this one on a tie or
    when none does."""
    this = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        return this
    best = max(nodes, key=lambda n: (n["Resources"].get("memory", 0), n["NodeID"] == this))
    return best["NodeID"]


def _solve_in_worker(solver, solver_node: str, refs, steps: list, here: list[bool], budgets, *,
                     defer, grouped, seed, fill_limit, num_cpus, then):
    """The in-memory solve in ``solver`` (a :class:`SolveWorker`); the driver only passes refs
    and gets the certificate back. ``steps``: per block, the step columns the driver read in
    place (a table) or a ref to the ones a task projected where the block lives. Blocks outside
    the solver's node go through ``then`` in a task where they live."""
    import ray
    at_solver = here if solver_node == ray.get_runtime_context().get_node_id() else \
        _on_this_node(ray, refs, solver_node)
    project = ray.remote(num_cpus=num_cpus, num_returns=2)(_project)
    projected = [None if h else step if isinstance(step, ray.ObjectRef)
                 else project.remote(ref, grouped)[0]
                 for h, step, ref in zip(at_solver, steps, refs)]
    returns = solver.solve.options(num_returns=1 + len(refs)).remote(
        refs, projected, at_solver, budgets, defer, grouped, seed, fill_limit, then)
    try:
        outcome, metadata = ray.get(returns[0])
    except ray.exceptions.RayTaskError as err:      # the solver's own error, not Ray's wrapper
        _read_failed_returns(ray, returns[1:])
        raise err.cause if isinstance(err.cause, Exception) else err from None
    outs = list(returns[1:])
    others = [] if then is None else [i for i, h in enumerate(at_solver) if not h]
    if others:
        attach, then_ref = ray.remote(num_cpus=num_cpus, num_returns=2)(_attach), ray.put(then)
        for i in others:
            outs[i], metadata[i] = attach.remote(then_ref, outcome.selection.lam64, grouped,
                                                 refs[i], outs[i])
        for i, meta in zip(others, ray.get([metadata[i] for i in others])):   # one wait
            metadata[i] = meta
    return outcome, _arms_dataset(outs, metadata)


def _read_failed_returns(ray, refs) -> None:
    """Read the arm refs of a solve that raised, so Ray counts their error (the one the caller
    gets) as handled: dropped unread, each logged an "Unhandled error" with the solver's
    traceback after the run's own message (an infeasible budget on two blocks printed two)."""
    for ref in refs:
        with contextlib.suppress(ray.exceptions.RayTaskError):
            ray.get(ref)


@dataclass(frozen=True)
class DatasetSolveResult(CertifiedResult):
    """Arms as a Dataset (``query_pos, arm, filled``) and the certificate(s)."""

    arms: object                                # ray.data.Dataset
    certificates: tuple[DualCertificate, ...]
    in_memory: bool = False                     # solved in memory, in a SolveWorker


def warm_up(defer: bool = False) -> None:
    """Load the compiled kernels of the in-memory solve before it is needed: numba reads its
    on-disk cache on a kernel's first use in a process (~1.5 s for the solve's kernels on a
    2-core host), and compiles a signature it has not met (seconds). A :class:`SolveWorker` runs
    this while the batch job's workers score. Numba keeps a signature per dtype and array flag,
    so this solves small problems the way :func:`_solve_gathered` does, from one step table read
    in place (read-only arrays) and from several copied into one block (writable), with λ* among
    steps that tie exactly (the hash cut) or in float32 only (the float64 passes), at a tight and
    a loose budget: the real solve then meets no signature it lacks."""
    rng = np.random.default_rng(0)
    rounded = (np.round(rng.random((64, 4)), 1).astype(np.float32),
               np.round(rng.random((64, 4)), 1) + 0.1)
    quality = np.tile(np.float32([0.2, 0.5, 0.7, 0.9]), (64, 1))    # every query alike: all tied
    cost = np.tile([0.1, 0.2, 0.4, 0.8], (64, 1))
    near = cost * (1 + 1e-9 * rng.random(cost.shape))                 # tied in float32 only
    for problem in (rounded, (quality, cost), (quality, near)):
        table = steps_to_table(hull_steps(*problem))
        for tables in ([table], [table.slice(0, 32), table.slice(32)]):
            block = _one_block(tables, defer, grouped=False)
            for share in (0.05, 0.5):
                budget = block.steps.base_c.sum() + share * block.steps.dc.sum()
                run_solve(LocalPasses([block]), [float(budget)], seed=0)


def solve_dataset(dataset, budget_usd, *, seed: int = 0, defer: bool = False,
                  fill_limit: int = FILL_LIMIT, num_cpus: float = 0.5,
                  then: tuple | None = None,
                  local_limit_bytes: int | None = None, solver=None) -> DatasetSolveResult:
    """``solve_budget`` over a Dataset of step tables (see the module docstring).

    budget_usd: one budget for the whole backlog, or a sequence of per-tenant budgets indexed
    by the ``tenant`` column. then: ``(fn, kwargs)``; ``fn(block + arm, lambda_star columns,
    **kwargs)`` runs where each block's arms are chosen; the Arrow tables it returns make ``arms``.
    local_limit_bytes: solve in memory, in one :class:`SolveWorker`, when the step columns take
    at most this many bytes (default :func:`local_solve_limit` of the free memory on ``solver``'s
    node, or on this one when no solver is given; 0 forces the distributed passes).
    solver: that worker (:func:`start_solver`, warmed ahead); default: one started for this call
    once the size is known (so this node's free memory decides). If its process or node is lost
    (killed, out of memory, unreachable: it is then killed) before or during the call, the
    distributed passes solve instead (``in_memory`` False, the same arms); ``then`` may then run
    twice on a block, one run after the other, as on any retried task. The arms the solver
    returned are its objects: a node lost after the call loses them as it loses any task's.
    """
    import ray
    budgets = validated_budgets(budget_usd)
    grouped = np.ndim(budget_usd) > 0
    if grouped and "tenant" not in dataset.schema().names:
        raise ValueError("per-tenant budgets need a 'tenant' column in the step tables")
    refs = dataset.to_arrow_refs()
    if not refs:                                # an empty backlog still needs one (empty) block
        tenant = np.zeros(0, np.int32) if grouped else None
        refs = [ray.put(steps_to_table(empty_steps(), tenant=tenant))]
    # the solver's (node, free bytes), asked while this node's blocks are read; it answers once
    # it is up and warmed (an actor's calls run in order)
    placement = None if solver is None else solver.placement.remote()
    here = _on_this_node(ray, refs)
    steps, sizes = _step_columns(ray, refs, here, grouped, num_cpus)
    total = sum(sizes)
    node = free = lost = None
    if placement is not None and (local_limit_bytes is None or total <= local_limit_bytes):
        try:                                    # (else the distributed passes need no solver)
            node, free = ray.get(placement)
        except _solver_lost(ray) as err:
            lost = err
    limit = local_limit_bytes if local_limit_bytes is not None else local_solve_limit(free)
    in_memory = lost is None and total <= limit
    if in_memory:
        try:
            if solver is None:
                solver = start_solver(defer)
                node, _ = ray.get(solver.placement.remote())
            outcome, arms = _solve_in_worker(
                solver, node, refs, steps, here, budgets, defer=defer, grouped=grouped,
                seed=seed, fill_limit=fill_limit, num_cpus=num_cpus, then=then)
        except _solver_lost(ray) as err:
            lost, in_memory = err, False
    if lost is not None:   # an unreachable actor may still be running ``then``: stop it first
        if isinstance(solver, ray.actor.ActorHandle):
            ray.kill(solver, no_restart=True)
        log.warning("the in-memory solver was lost (%s); solving with the distributed passes, "
                    "whose tasks Ray retries (same arms)", type(lost).__name__)
    if not in_memory:   # tasks read the blocks on this node in place, the others' projections
        step_refs = [t if isinstance(t, ray.ObjectRef) else ref for t, ref in zip(steps, refs)]
        passes = RayPasses(refs, step_refs, defer=defer, grouped=grouped, num_cpus=num_cpus,
                           then=then)
        outcome, arms = run_solve(passes, budgets, seed=seed, fill_limit=fill_limit)
    return DatasetSolveResult(arms, certificates(outcome), in_memory)


def _solver_lost(ray) -> tuple[type, ...]:
    """What Ray raises when the solver's process or node is gone or cannot come up (its own
    errors come back as ``RayTaskError`` and are re-raised as themselves)."""
    e = ray.exceptions
    return (e.RayActorError, e.OutOfMemoryError, e.ActorUnschedulableError,
            e.RuntimeEnvSetupError)


def _step_columns(ray, refs, here: list[bool], grouped: bool, num_cpus: float):
    """Per block: its step columns — a table read in place when the block is in this node's
    object store (``here``), else a ref to them projected by a task where the block is — and
    their bytes."""
    parts = blocks_in_place(refs, _project, grouped, num_cpus=num_cpus, num_returns=2,
                            here=here)
    sizes = [ray.get(n) if isinstance(n, ray.ObjectRef) else n for _, n in parts]
    return [t for t, _ in parts], sizes


def blocks_in_place(refs, fn, *args, num_cpus: float, num_returns: int = 1,
                    here: list[bool] | None = None) -> list:
    """``fn(block, *args)`` of every block: here, on the blocks in this node's object store
    (read in place: mapped, not copied, so no task is started), and in a task where the block
    lives for the others (only what ``fn`` returns travels). ``here``: which blocks are local
    (default: asked of Ray). Returns values for the local blocks, refs for the others."""
    import ray
    here = _on_this_node(ray, refs) if here is None else here
    local = iter(ray.get([ref for ref, h in zip(refs, here) if h]))
    task = ray.remote(num_cpus=num_cpus, num_returns=num_returns)(fn)
    return [fn(next(local), *args) if h else task.remote(ref, *args)
            for ref, h in zip(refs, here)]


def _on_this_node(ray, refs, node: str | None = None) -> list[bool]:
    """Whether each object is in this node's object store (then ``ray.get`` maps it, no copy),
    or in ``node``'s, or is held inline by its owner (:func:`_inlined`): read where it is asked
    for."""
    try:
        from ray.experimental import get_object_locations
        where = get_object_locations(refs)
    except (ImportError, AttributeError, RuntimeError):   # no locations: project them all
        return [False] * len(refs)
    node = node or ray.get_runtime_context().get_node_id()
    return [node in where.get(ref, {}).get("node_ids", ()) or _inlined(where.get(ref))
            for ref in refs]


def _inlined(location: dict | None) -> bool:
    """A block in no object store and not spilled: a task's return under Ray's inline limit
    (100 KB), kept in its owner's memory (the batch job's 64-row blocks are). Reading it costs
    one small copy; projecting it cost a task per block (60 such blocks, 3,000 queries: the
    in-memory solve took 3.1 s on the first call, its tasks starting workers, then 0.14-0.20 s;
    read, 0.10-0.14 s from the first call)."""
    return location is not None and not location.get("node_ids") and not location.get("did_spill")


def steps_dataset(steps: HullSteps, *, query_key=None, tenant=None, n_blocks: int = 8):
    """A Ray Dataset of step tables split into ``n_blocks`` blocks (for tests and demos)."""
    import ray.data
    table = steps_to_table(steps, query_key=query_key, tenant=tenant)
    size = -(-max(table.num_rows, 1) // n_blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
