"""The solve over Ray Data blocks is bit-identical to the in-memory solve; the table layout."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r2ray.solver import hull_steps, solve_budget, solve_groups
from r2ray.solver.hull import empty_steps
from r2ray.solver.distributed import solve_dataset, steps_dataset
from r2ray.solver.table import steps_to_table, table_to_steps
from solver_highs import budget_between, instances

DISTRIBUTED = 0   # local_limit_bytes: these cases are small enough for the in-memory path
                  # (tests/test_solver_local_path.py); here the distributed passes are under test
FIELDS = ("base_arm", "base_q", "base_c", "offsets", "step_arm", "dq", "dc", "key",
          "invalid_arms")


def assert_same_steps(a, b):
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def random_steps(seed: int, n: int = 400, k: int = 10):
    rng = np.random.default_rng(seed)
    q, c = rng.random((n, k)).round(1), rng.random((n, k)).round(2)
    q[rng.random(q.shape) < 0.05] = np.nan
    return hull_steps(q, c)


def test_table_round_trip_keeps_slices_and_keys():
    steps = random_steps(0, n=50)
    keys = np.arange(50, dtype=np.uint64) * 7
    table = steps_to_table(steps, query_key=keys, tenant=np.arange(50) % 3, start=100)
    back, pos, back_keys, tenant = table_to_steps(table)
    assert_same_steps(back, steps)
    assert pos.tolist() == list(range(100, 150)) and (back_keys == keys).all()
    assert tenant.tolist() == (np.arange(50) % 3).tolist()
    part, pos, _, _ = table_to_steps(table.slice(10, 15))
    assert_same_steps(part, steps.slice(10, 25))
    assert pos[0] == 110


def test_tables_with_32_bit_list_offsets_are_read_too():
    steps = random_steps(1, n=20)
    table = steps_to_table(steps)
    narrow = pa.table({name: (pa.array(table.column(name).to_pylist(),
                                       pa.list_(table.schema.field(name).type.value_type))
                              if pa.types.is_large_list(table.schema.field(name).type)
                              else table.column(name)) for name in table.column_names})
    assert_same_steps(table_to_steps(narrow)[0], steps)
    # the in-memory solve copies the gathered blocks into one, whatever their offsets' width
    from r2ray.solver.distributed import _one_block
    block = _one_block([table.slice(0, 7), narrow.slice(7)], defer=False, grouped=False)
    assert_same_steps(block.steps, steps)
    assert block.query_pos.tolist() == table.column("query_pos").to_pylist()


def arms_of(result) -> tuple[np.ndarray, np.ndarray]:
    frame = result.arms.to_pandas().sort_values("query_pos")
    return frame["arm"].to_numpy(), frame["filled"].to_numpy()


@pytest.mark.slow
@pytest.mark.parametrize("n_blocks, defer", [(1, False), (5, False), (3, True)])
def test_blocks_give_the_same_solve_as_one_node(ray_local, n_blocks, defer):
    steps = random_steps(2)
    fraction = 0.4 if not defer else -0.2
    budget = steps.base_c.sum() + fraction * steps.dc.sum()
    single = solve_budget(steps, budget, seed=5, defer=defer)
    result = solve_dataset(steps_dataset(steps, n_blocks=n_blocks), budget, seed=5, defer=defer,
                           local_limit_bytes=DISTRIBUTED)
    assert not result.in_memory and result.certificate == single.certificate   # bit-identical
    arm, filled = arms_of(result)
    np.testing.assert_array_equal(arm, single.arm)
    np.testing.assert_array_equal(filled, single.filled)


@pytest.mark.slow
def test_tenants_over_blocks_match_one_node(ray_local):
    steps = random_steps(3)
    tenant = np.random.default_rng(3).integers(0, 3, steps.n_queries)
    step_tenant = np.repeat(tenant, steps.steps_per_query)
    budgets = [steps.base_c[tenant == t].sum() + 0.3 * steps.dc[step_tenant == t].sum()
               for t in range(3)]
    single = solve_groups(steps, budgets, group=tenant, seed=1)
    result = solve_dataset(steps_dataset(steps, tenant=tenant, n_blocks=4), budgets, seed=1,
                           local_limit_bytes=DISTRIBUTED)
    assert result.certificates == single.certificates
    np.testing.assert_array_equal(arms_of(result)[0], single.arm)
    with pytest.raises(ValueError, match="tenant"):
        solve_dataset(steps_dataset(steps, n_blocks=2), budgets, local_limit_bytes=DISTRIBUTED)
    # `then` runs on each block with its arms and its tenant's λ*, in the assigning task (a
    # package function: Ray workers cannot import test modules)
    kept = solve_dataset(steps_dataset(steps, tenant=tenant, n_blocks=4), budgets, seed=1,
                         then=(pa.Table.select, {"columns": ["query_pos", "arm", "lambda_star"]}),
                         local_limit_bytes=DISTRIBUTED)
    table = pa.concat_tables(ray_local.get(kept.arms.to_arrow_refs())).sort_by("query_pos")
    np.testing.assert_array_equal(table.column("arm").to_numpy(), single.arm)
    lam = np.array([c.lam for c in single.certificates])
    np.testing.assert_array_equal(table.column("lambda_star").to_numpy(), lam[tenant])
    assert table.column_names == ["query_pos", "arm", "lambda_star"]


@pytest.mark.slow
def test_an_empty_backlog_solves_to_nothing(ray_local):
    empty = steps_to_table(empty_steps())
    single = solve_budget(empty_steps(), 10.0)
    import ray.data

    result = solve_dataset(ray.data.from_arrow(empty), 10.0, local_limit_bytes=DISTRIBUTED)
    assert result.certificate == single.certificate and result.certificate.n_queries == 0
    assert result.arms.count() == 0 and single.arm.size == 0


@pytest.mark.slow
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instances(max_queries=8), st.floats(0, 1.2), st.integers(1, 4))
def test_random_instances_over_blocks_match_one_node(ray_local, instance, fraction, n_blocks):
    q, c = instance
    steps = hull_steps(q, c)
    budget = budget_between(q, c, steps, fraction)
    single = solve_budget(steps, budget)
    result = solve_dataset(steps_dataset(steps, n_blocks=n_blocks), budget,
                           local_limit_bytes=DISTRIBUTED)
    assert result.certificate == single.certificate
    np.testing.assert_array_equal(arms_of(result)[0], single.arm)


def test_blocks_held_inline_by_their_owner_are_read_in_place(monkeypatch):
    """A task's small return (under Ray's 100 KB inline limit: the batch job's 64-row blocks) is
    in no object store: its location names no node. It is read where asked for, not given a
    projecting task each (60 such blocks: a 3 s first solve instead of 0.1 s)."""
    import ray.experimental

    from r2ray.solver.distributed import _on_this_node

    where = {"plasma-here": {"node_ids": ["n1"], "object_size": 9e5, "did_spill": False},
             "plasma-there": {"node_ids": ["n2"], "object_size": 9e5, "did_spill": False},
             "inline": {"node_ids": [], "object_size": 7762, "did_spill": False},
             "spilled": {"node_ids": [], "object_size": 9e5, "did_spill": True}}
    monkeypatch.setattr(ray.experimental, "get_object_locations", lambda refs: where)

    class Context:
        def get_node_id(self):
            return "n1"

    class FakeRay:
        def get_runtime_context(self):
            return Context()

    refs = list(where)
    assert _on_this_node(FakeRay(), refs) == [True, False, True, False]
    assert _on_this_node(FakeRay(), refs, "n2") == [False, True, True, False]
