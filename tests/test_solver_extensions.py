"""Per-tenant budgets and per-model caps, each with its certificate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r2ray.solver import hull_steps, solve_budget
from r2ray.solver.extensions import ModelCap, solve_tenant_budgets, solve_with_model_caps
from solver_highs import chosen, highs_milp


def tenant_instance(seed: int, n: int = 300, k: int = 8, tenants: int = 3):
    rng = np.random.default_rng(seed)
    q, c = rng.random((n, k)), rng.random((n, k))
    tenant = rng.integers(0, tenants, n)
    steps = hull_steps(q, c)
    step_tenant = np.repeat(tenant, steps.steps_per_query)
    budgets = np.array([steps.base_c[tenant == t].sum() + f * steps.dc[step_tenant == t].sum()
                        for t, f in zip(range(tenants), (0.2, 0.5, 1.3))])
    return q, c, steps, tenant, budgets


@pytest.mark.parametrize("seed", [0, 1])
def test_tenants_solved_together_match_separate_solves(seed):
    q, c, steps, tenant, budgets = tenant_instance(seed)
    together = solve_tenant_budgets(steps, tenant, budgets, seed=seed)
    assert len(together.certificates) == 3 and together.certificates[2].lam == 0.0
    for t, budget in enumerate(budgets):
        rows = np.flatnonzero(tenant == t)
        alone = solve_budget(steps.take(rows), budget, seed=seed, query_key=rows)
        mine = together.certificates[t]
        np.testing.assert_array_equal(together.arm[rows], alone.arm)
        assert mine.lam == alone.certificate.lam and mine.n_queries == rows.size
        assert mine.objective == pytest.approx(alone.certificate.objective, rel=1e-12)
        assert chosen(c[rows], together.arm[rows]) <= budget
        assert 0 <= mine.gap <= steps.dq.max() + 1e-9


def test_tenant_ids_are_validated():
    _, _, steps, tenant, budgets = tenant_instance(0, n=20)
    with pytest.raises(ValueError, match=r"tenant ids must lie in \[0, 2\)"):
        solve_tenant_budgets(steps, tenant, budgets[:2])
    with pytest.raises(ValueError, match="integer array"):
        solve_tenant_budgets(steps, tenant.astype(float), budgets)


def test_an_infeasible_tenant_is_named():
    _, _, steps, tenant, budgets = tenant_instance(0, n=40)
    budgets[1] = 0.0
    with pytest.raises(ValueError, match="tenant b: budget 0 USD is below"):
        solve_tenant_budgets(steps, tenant, budgets, names=["a", "b", "c"])


def caps_instance(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    arm_model = np.repeat(np.arange(3), 2)               # 3 models x 2 length budgets
    q, c = rng.random((n, 6)).round(2), rng.random((n, 6)).round(2)
    budget = c.min(axis=1).sum() + 0.6 * (c.max(axis=1).sum() - c.min(axis=1).sum())
    return q, c, arm_model, budget


def cap_rows(c, arm_model, caps):
    rows = []
    for cap in caps:
        unit = c if cap.max_spend_usd is not None else np.ones_like(c)
        rows.append((np.where(arm_model == cap.model, unit, 0.0), cap.limit))
    return rows


@pytest.mark.parametrize("seed, caps", [
    (0, [ModelCap(2, max_queries=2)]),
    (1, [ModelCap(1, max_spend_usd=0.8)]),
    (2, [ModelCap(0, max_queries=1), ModelCap(2, max_spend_usd=1.0)]),
    (3, [ModelCap(1, max_queries=0)]),
])
def test_caps_are_met_and_certified_against_highs(seed, caps):
    q, c, arm_model, budget = caps_instance(seed)
    result = solve_with_model_caps(q, c, arm_model, budget, caps, seed=seed)
    cert = result.certificate
    assert chosen(c, result.arm) <= budget
    for (weights, limit), used in zip(cap_rows(c, arm_model, caps), cert.usage):
        assert chosen(weights, result.arm) <= limit and used <= limit
    best = highs_milp(q, c, budget, cap_rows(c, arm_model, caps))
    assert cert.objective <= best + 1e-9 <= cert.upper_bound + 2e-9
    assert cert.gap == pytest.approx(cert.upper_bound - cert.objective)
    assert cert.objective == pytest.approx(chosen(q, result.arm))


def test_caps_that_do_not_bind_leave_prices_at_zero():
    q, c, arm_model, budget = caps_instance(4)
    plain = solve_budget(hull_steps(q, c), budget)
    result = solve_with_model_caps(q, c, arm_model, budget, [ModelCap(0, max_queries=100)])
    assert result.certificate.prices == (0.0,) and result.certificate.n_solves == 1
    np.testing.assert_array_equal(result.arm, plain.arm)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=0), "exactly one"),
    (dict(model=0, max_queries=1, max_spend_usd=1.0), "exactly one"),
    (dict(model=0, max_queries=-1), ">= 0"),
    (dict(model=0, max_spend_usd=float("nan")), "a number >= 0"),
])
def test_bad_caps_say_how_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCap(**kwargs)


def test_an_infinite_cap_leaves_a_finite_certificate():
    """An unpriced cap adds nothing to the bound: 0 × an infinite cap made it NaN."""
    q, c, arm_model, budget = caps_instance(4)
    plain = solve_budget(hull_steps(q, c), budget).certificate
    cert = solve_with_model_caps(q, c, arm_model, budget,
                                 [ModelCap(0, max_spend_usd=math.inf)]).certificate
    assert cert.upper_bound == plain.upper_bound and cert.gap == pytest.approx(plain.gap)


def test_a_cap_the_budget_cannot_avoid_is_reported():
    q, c = np.array([[0.5, 0.9]]), np.array([[1.0, 2.0]])
    with pytest.raises(ValueError, match="cannot be met"):
        solve_with_model_caps(q, c, np.array([0, 1]), 1.5, [ModelCap(0, max_queries=0)])
    with pytest.raises(ValueError, match="no arm of that model"):
        solve_with_model_caps(q, c, np.array([0, 1]), 1.5, [ModelCap(5, max_queries=0)])
