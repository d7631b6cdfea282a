"""solve_dataset in memory (step columns gathered in a SolveWorker) and over the blocks (distributed passes):
each path forced, both bit-identical to the in-memory solve, ``then`` run per block on either
(``then`` is a package function: Ray workers cannot import test modules)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from r2ray.errors import R2RayError
from r2ray.solver import hull_steps, solve_budget, solve_groups
from r2ray.solver.distributed import LOCAL_SOLVE_ENV, local_solve_limit, solve_dataset
from r2ray.solver.table import steps_to_table

PATHS = {"memory": 1 << 40, "blocks": 0}     # local_limit_bytes forcing each path


def random_steps(seed: int, n: int = 600, k: int = 12):
    rng = np.random.default_rng(seed)
    q, c = rng.random((n, k)).round(1), rng.random((n, k)).round(2)   # many exact ties
    q[rng.random(q.shape) < 0.05] = np.nan
    return hull_steps(q, c)


def dataset_keys(steps) -> np.ndarray:
    """The query keys :func:`scattered_dataset` gives its step tables."""
    return np.arange(steps.n_queries, dtype=np.uint64) * 7919


def scattered_dataset(ray, steps, *, tenant=None, n_blocks=5, extra=True):
    """Step tables whose query positions are not 0..N-1 (as after dedupe), with keys, and a
    column the solve must carry through untouched (as the batch job's blocks have)."""
    import ray.data  # noqa: F401  (ray.data below)
    n = steps.n_queries
    table = steps_to_table(steps, query_key=dataset_keys(steps), tenant=tenant)
    pos = np.arange(n, dtype=np.int64) * 3 + 11
    table = table.set_column(0, "query_pos", pa.array(pos))
    if extra:
        table = table.append_column("payload", pa.array([f"q{i}" for i in range(n)]))
    size = -(-n // n_blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, n, size)]), pos


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fraction, defer, seed",
                         [(0.35, False, 5), (-0.2, True, 2), (2.0, False, 0)])
def test_each_path_matches_the_in_memory_solve(ray_local, path, fraction, defer, seed):
    steps = random_steps(seed + 10)
    dataset, pos = scattered_dataset(ray_local, steps)
    budget = steps.base_c.sum() + fraction * steps.dc.sum()
    keys = dataset_keys(steps)
    single = solve_budget(steps, budget, seed=seed, defer=defer, query_key=keys)
    result = solve_dataset(dataset, budget, seed=seed, defer=defer,
                           local_limit_bytes=PATHS[path])
    assert result.in_memory == (path == "memory")
    assert result.certificate == single.certificate            # every float bit-identical
    frame = result.arms.to_pandas().sort_values("query_pos")
    np.testing.assert_array_equal(frame["query_pos"].to_numpy(), pos)
    np.testing.assert_array_equal(frame["arm"].to_numpy(), single.arm)
    np.testing.assert_array_equal(frame["filled"].to_numpy(), single.filled)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_blocks_on_other_nodes_are_projected_where_they_are(ray_local, path, monkeypatch):
    """Every other block taken as held by another node: its step columns come from a task, its
    ``then`` runs in a task of its own; the result does not change."""
    from r2ray.solver import distributed
    monkeypatch.setattr(distributed, "_on_this_node",
                        lambda ray, refs, node=None: [i % 2 == 0 for i in range(len(refs))])
    steps = random_steps(4)
    dataset, pos = scattered_dataset(ray_local, steps, n_blocks=5)
    budget = steps.base_c.sum() + 0.3 * steps.dc.sum()
    single = solve_budget(steps, budget, seed=3,
                          query_key=dataset_keys(steps))
    result = solve_dataset(dataset, budget, seed=3, local_limit_bytes=PATHS[path],
                           then=(pa.Table.select, {"columns": ["query_pos", "arm"]}))
    assert result.in_memory == (path == "memory") and result.certificate == single.certificate
    table = pa.concat_tables(ray_local.get(result.arms.to_arrow_refs())).sort_by("query_pos")
    np.testing.assert_array_equal(table.column("query_pos").to_numpy(), pos)
    np.testing.assert_array_equal(table.column("arm").to_numpy(), single.arm)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_then_runs_per_block_with_the_arms_and_each_tenants_price(ray_local, path):
    steps = random_steps(3)
    tenant = np.random.default_rng(3).integers(0, 3, steps.n_queries)
    step_tenant = np.repeat(tenant, steps.steps_per_query)
    budgets = [steps.base_c[tenant == t].sum() + 0.3 * steps.dc[step_tenant == t].sum()
               for t in range(3)]
    keys = dataset_keys(steps)
    single = solve_groups(steps, budgets, group=tenant, seed=1, query_key=keys)
    dataset, pos = scattered_dataset(ray_local, steps, tenant=tenant, n_blocks=4)
    columns = ["query_pos", "payload", "arm", "lambda_star"]
    result = solve_dataset(dataset, budgets, seed=1, local_limit_bytes=PATHS[path],
                           then=(pa.Table.select, {"columns": columns}))
    assert result.in_memory == (path == "memory")
    assert result.certificates == single.certificates
    refs = result.arms.to_arrow_refs()
    assert len(refs) == 4                                       # one output per block
    table = pa.concat_tables(ray_local.get(refs)).sort_by("query_pos")
    assert table.column_names == columns
    np.testing.assert_array_equal(table.column("query_pos").to_numpy(), pos)
    assert table.column("payload").to_pylist() == [f"q{i}" for i in range(steps.n_queries)]
    np.testing.assert_array_equal(table.column("arm").to_numpy(), single.arm)
    lam = np.array([c.lam for c in single.certificates])
    np.testing.assert_array_equal(table.column("lambda_star").to_numpy(), lam[tenant])


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_an_empty_backlog_runs_then_once_on_either_path(ray_local, path):
    import ray.data  # noqa: F401
    from r2ray.solver.hull import empty_steps
    empty = ray_local.data.from_arrow(steps_to_table(empty_steps()))
    result = solve_dataset(empty, 1.0, local_limit_bytes=PATHS[path],
                           then=(pa.Table.select, {"columns": ["arm", "lambda_star"]}))
    assert result.certificate == solve_budget(empty_steps(), 1.0).certificate
    tables = ray_local.get(result.arms.to_arrow_refs())
    assert [t.num_rows for t in tables] == [0] and tables[0].column_names == ["arm", "lambda_star"]


@pytest.mark.slow
def test_the_in_memory_solve_runs_in_its_worker_not_in_the_driver(ray_local, monkeypatch):
    """The driver passes refs and gets the certificate back (so its memory does not grow with
    N): with the solve's passes broken in the driver's process, the solve still runs."""
    from r2ray.solver import distributed

    def not_in_the_driver(*args, **kwargs):
        raise AssertionError("the driver ran the in-memory solve")

    monkeypatch.setattr(distributed, "run_solve", not_in_the_driver)
    monkeypatch.setattr(distributed, "_one_block", not_in_the_driver)
    steps = random_steps(6)
    dataset, pos = scattered_dataset(ray_local, steps, n_blocks=3)
    budget = steps.base_c.sum() + 0.4 * steps.dc.sum()
    keys = dataset_keys(steps)
    single = solve_budget(steps, budget, seed=2, query_key=keys)
    result = solve_dataset(dataset, budget, seed=2, local_limit_bytes=PATHS["memory"],
                           then=(pa.Table.select, {"columns": ["query_pos", "arm"]}))
    assert result.in_memory and result.certificate == single.certificate
    table = pa.concat_tables(ray_local.get(result.arms.to_arrow_refs())).sort_by("query_pos")
    np.testing.assert_array_equal(table.column("arm").to_numpy(), single.arm)


@pytest.mark.slow
def test_an_infeasible_budget_in_the_worker_reaches_the_caller_as_itself(ray_local):
    from r2ray.solver import InfeasibleBudget
    steps = random_steps(7)
    dataset, _ = scattered_dataset(ray_local, steps, n_blocks=2)
    with pytest.raises(InfeasibleBudget, match="below the minimum feasible spend") as raised:
        solve_dataset(dataset, 0.5 * steps.base_c.sum(), local_limit_bytes=PATHS["memory"])
    assert type(raised.value) is InfeasibleBudget     # not Ray's wrapper with its traceback


def test_an_infeasible_budget_leaves_no_unhandled_error_behind(ray_local, monkeypatch):
    """The solve's other returns hold the same error: dropped unread, Ray logged each as an
    "Unhandled error" with the solver's traceback after `r2ray route`'s own message."""
    import gc

    from r2ray.solver import InfeasibleBudget
    unhandled = []
    monkeypatch.setattr("ray._private.worker._unhandled_error_handler", unhandled.append)
    steps = random_steps(7)
    dataset, _ = scattered_dataset(ray_local, steps, n_blocks=2)
    with pytest.raises(InfeasibleBudget) as raised:
        solve_dataset(dataset, 0.5 * steps.base_c.sum(), local_limit_bytes=PATHS["memory"])
    del raised                       # its traceback holds the solve's frames and their refs
    gc.collect()                     # Ray reports an unread error when its ref is freed
    assert unhandled == []


def test_the_limit_defaults_to_a_share_of_free_memory_and_can_be_set(monkeypatch):
    monkeypatch.delenv(LOCAL_SOLVE_ENV, raising=False)
    assert 0 < local_solve_limit() <= 1 << 30
    assert local_solve_limit(8_000) == 1_000 and local_solve_limit(1 << 50) == 1 << 30
    monkeypatch.setenv(LOCAL_SOLVE_ENV, "12345")
    assert local_solve_limit() == 12345 == local_solve_limit(8_000)


@pytest.mark.parametrize("value", ["1GB", "-5", "nan", "1e9", "\u00b2"])
def test_a_bad_limit_is_an_error_naming_the_variable_before_the_run_scores(monkeypatch, value):
    """Not a ValueError traceback at the solve, after every query was scored, nor a negative
    limit that silently sent every solve to the distributed passes."""
    from r2ray.batch.job import check_solve_limit

    monkeypatch.setenv(LOCAL_SOLVE_ENV, value)
    for check in (local_solve_limit, check_solve_limit):
        with pytest.raises(R2RayError, match=f"{LOCAL_SOLVE_ENV}=.*whole number of bytes"):
            check()


@pytest.mark.slow
def test_the_solvers_node_memory_sets_the_limit(ray_local, monkeypatch):
    """The in-memory solve runs in the solver's process, so its node's free memory decides:
    a solver whose node has nothing free sends even a small backlog to the distributed passes,
    and a real one (this machine) takes it in memory."""
    from r2ray.solver.distributed import start_solver

    class NothingFree:   # stands in for a SolveWorker on a node with no memory available
        class placement:
            @staticmethod
            def remote():
                return ray_local.put(("a node", 0))

    monkeypatch.delenv(LOCAL_SOLVE_ENV, raising=False)
    steps = random_steps(8)
    dataset, _ = scattered_dataset(ray_local, steps, n_blocks=2)
    budget = steps.base_c.sum() + 0.3 * steps.dc.sum()
    single = solve_budget(steps, budget, query_key=dataset_keys(steps))
    for solver, in_memory in ((NothingFree(), False), (start_solver(), True)):
        result = solve_dataset(dataset, budget, solver=solver)
        assert result.in_memory is in_memory and result.certificate == single.certificate


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_lost_solver_falls_back_to_the_distributed_passes(ray_local, tmp_path, when):
    """The in-memory solve runs in an actor, whose process or node can be lost (an OOM kill, a
    node going away): the solve then takes the distributed passes, whose tasks Ray retries, and
    gives the same certificate and arms. ``during``: ``then`` kills the actor's process on its
    first call (once: the marker file), as a machine loss would, after the passes ran."""
    import os

    from r2ray.solver.distributed import start_solver

    marker = str(tmp_path / "killed")

    def then_dies_once(table):
        if when == "during":
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return table.select(["query_pos", "arm"])

    steps = random_steps(9)
    dataset, _ = scattered_dataset(ray_local, steps, n_blocks=3)
    budget = steps.base_c.sum() + 0.35 * steps.dc.sum()
    single = solve_budget(steps, budget, query_key=dataset_keys(steps))
    solver = start_solver()
    ray_local.get(solver.node.remote())                       # up and warmed
    if when == "before":
        ray_local.kill(solver)
    result = solve_dataset(dataset, budget, solver=solver, local_limit_bytes=PATHS["memory"],
                           then=(then_dies_once, {}))
    assert not result.in_memory and result.certificate == single.certificate
    table = pa.concat_tables(ray_local.get(result.arms.to_arrow_refs())).sort_by("query_pos")
    np.testing.assert_array_equal(table.column("arm").to_numpy(), single.arm)
    assert os.path.exists(marker) == (when == "during")


@pytest.mark.slow
def test_a_solver_killed_for_memory_falls_back_too(ray_local):
    """Ray's memory monitor kills an actor with ``OutOfMemoryError``, not a ``RayActorError``:
    the likeliest loss of an in-memory solve is caught as well (a stand-in solver here)."""
    class KilledForMemory:
        class placement:
            @staticmethod
            def remote():
                return ray_local.put((ray_local.get_runtime_context().get_node_id(), 1 << 40))

        class solve:
            @staticmethod
            def options(**_):
                return KilledForMemory.solve

            @staticmethod
            def remote(*_):
                raise ray_local.exceptions.OutOfMemoryError("the memory monitor killed it")

    steps = random_steps(10)
    dataset, _ = scattered_dataset(ray_local, steps, n_blocks=2)
    budget = steps.base_c.sum() + 0.25 * steps.dc.sum()
    result = solve_dataset(dataset, budget, solver=KilledForMemory(),
                           local_limit_bytes=PATHS["memory"])
    assert not result.in_memory
    assert result.certificate == solve_budget(steps, budget,
                                              query_key=dataset_keys(steps)).certificate


_SIGNATURES = """
import importlib, json, sys
import numpy as np
from r2ray.solver.distributed import LocalPasses, _one_block, run_solve, warm_up
from r2ray.solver.table import steps_to_table
from tests.compiled_kernels import kernel_signatures
from tests.test_solver_local_path import random_steps

def signatures():
    return kernel_signatures(importlib.import_module(m) for m in (
        "r2ray.solver.passes", "r2ray.solver.select", "r2ray.solver.blocks"))

defer = sys.argv[1] == "defer"
warm_up(defer)
warm = signatures()
for seed, n_tables in ((3, 1), (4, 4)):   # one step table (read in place), several (copied)
    steps = random_steps(seed, n=5000)    # real-sized, tied keys and NaN arms included
    table = steps_to_table(steps, query_key=np.arange(steps.n_queries, dtype=np.uint64))
    cut = np.linspace(0, table.num_rows, n_tables + 1).astype(int)
    block = _one_block([table.slice(a, b - a) for a, b in zip(cut[:-1], cut[1:])], defer, False)
    for share in (0.05, 0.5):
        budget = float(np.nansum(block.steps.base_c) + share * np.nansum(block.steps.dc))
        run_solve(LocalPasses([block]), [budget], seed=0)
print(json.dumps({"warm": sum(map(bool, warm.values())),
                  "new": {k: sorted(v - warm[k]) for k, v in signatures().items() if v - warm[k]}}))
"""


@pytest.mark.parametrize("defer", ["no defer", "defer"])
def test_warm_up_loads_every_kernel_signature_the_in_memory_solve_uses(tmp_path, defer):
    """The batch job warms its SolveWorker while its workers score: after ``warm_up``, the
    in-memory solve of real-sized step tables (one read in place, read-only; several copied into
    one block, writable) needs no kernel signature it did not load, so none is loaded or compiled
    during the timed solve. Checked on a numba cache of its own, filled by a first run (compiling
    from scratch also gives signatures to the kernels a kernel calls; loading from the cache
    does not)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [json.loads(subprocess.run(
        [sys.executable, "-c", _SIGNATURES, defer], capture_output=True, text=True, check=True,
        cwd=root, env=env).stdout) for _ in range(2)]
    assert runs[1]["warm"] >= 4 and runs[1]["new"] == {}
