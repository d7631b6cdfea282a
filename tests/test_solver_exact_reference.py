"""solve_budget against exact enumeration on small adversarial instances.

HiGHS's feasibility tolerances are absolute (1e-7), so at costs of 1e-9 USD its budget row
barely binds and its "optimum" overspends; enumerating every assignment in Fractions is exact
at any price scale. Seeded and bounded: a few hundred instances.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

from r2ray.solver import (
    DEFER_ARM, InfeasibleBudget, hull_steps, solve_budget, solve_tenant_budgets)
from r2ray.solver.blocks import blocks_of
from r2ray.solver.budget import LocalPasses, certificates
from r2ray.solver.search import run_solve
from solver_highs import cheapest_total


def adversarial_instance(rng):
    """(q, c): ties in q̂ and ĉ, equal-cost arms, duplicated rows, prices from 1e-12 to 1e3 USD
    (one scale, or all of them in one row), negative q̂, NaN arms and all-NaN rows."""
    n, k = int(rng.choice([1, 1, 2, 3, 4])), int(rng.choice([1, 2, 3, 4]))
    scale = 10.0 ** rng.integers(-12, 4)
    kind = rng.integers(0, 5)
    if kind == 0:                                   # ties in q̂ and ĉ
        q, c = rng.integers(0, 4, (n, k)) / 4, rng.integers(0, 4, (n, k)) * scale
    elif kind == 1:                                 # every arm of a row costs the same
        q, c = rng.random((n, k)), np.repeat(rng.random((n, 1)), k, axis=1) * scale
    elif kind == 2:                                 # identical rows: ties at λ*
        q, c = np.repeat(rng.random((1, k)), n, 0), np.repeat(rng.random((1, k)) * scale, n, 0)
    elif kind == 3:                                 # 1e-12 .. 1e3 USD side by side
        q, c = rng.normal(0, 1, (n, k)), 10.0 ** rng.uniform(-12, 3, (n, k))
    else:
        q, c = rng.random((n, k)), rng.random((n, k)) * scale
    q[rng.random((n, k)) < 0.15] = np.nan
    if rng.random() < 0.1:
        q[rng.integers(n)] = np.nan
    return q, c


def budgets(rng, q, c) -> list[float]:
    """0, just below and at Σ cheapest, between, at and above Σ dearest, and infinite (USD)."""
    low = cheapest_total(q, c)
    usable = np.isfinite(q) & np.isfinite(c)
    high = math.fsum(np.where(usable, c, -np.inf).max(axis=1)[usable.any(axis=1)])
    return [0.0, math.nextafter(low, 0.0), low, low + rng.random() * max(high - low, 0.0),
            high, 2 * high + 1, math.inf]


def exact_total(values, arm) -> Fraction:
    rows = np.flatnonzero(arm >= 0)
    return sum((Fraction(float(v)) for v in values[rows, arm[rows]]), Fraction(0))


def enumerated_optimum(q, c, budget_usd: float) -> Fraction | None:
    """max Σ q̂ over every assignment with Σ ĉ <= budget (exact); None if none fits."""
    usable = np.isfinite(q) & np.isfinite(c)
    rows = [[(Fraction(float(q[i, j])), Fraction(float(c[i, j])))
             for j in np.flatnonzero(usable[i])] for i in range(q.shape[0]) if usable[i].any()]
    fits = [sum(a[0] for a in pick) for pick in itertools.product(*rows)
            if sum(a[1] for a in pick) <= Fraction(budget_usd)]
    return max(fits, default=None)


def with_defer_column(q, c):
    """The defer arm as an explicit (q̂ 0, ĉ 0) column, for the enumeration."""
    zero = np.zeros((q.shape[0], 1))
    return np.hstack([q, zero]), np.hstack([c, zero])


def check_against_enumeration(q, c, budget_usd, seed, defer):
    steps = hull_steps(q, c)
    try:
        result = solve_budget(steps, budget_usd, seed=seed, defer=defer)
    except InfeasibleBudget:
        assert not defer and Fraction(budget_usd) < Fraction(cheapest_total(q, c))
        return
    cert = result.certificate
    if defer:
        q, c = with_defer_column(q, c)
    arm = np.where(result.arm == DEFER_ARM, q.shape[1] - 1, result.arm)
    objective = exact_total(q, arm)
    assert math.isinf(budget_usd) or exact_total(c, arm) <= Fraction(budget_usd)
    assert Fraction(cert.spend_usd) >= exact_total(c, arm) and cert.gap >= 0
    assert math.isclose(cert.objective, objective, rel_tol=1e-12, abs_tol=1e-12)
    best = enumerated_optimum(q, c, budget_usd) if math.isfinite(budget_usd) else None
    if best is not None:
        assert objective <= best and Fraction(cert.upper_bound) >= best


def check_block_split_and_tenants(q, c, budget_usd, seed):
    """One query per block gives the same plan and certificate; a tenant split solves like
    separate solves of its tenants."""
    steps = hull_steps(q, c)
    try:
        whole = solve_budget(steps, budget_usd, seed=seed)
    except InfeasibleBudget:
        return
    outcome, (arm, _) = run_solve(LocalPasses(blocks_of(steps, block_queries=1)), [budget_usd],
                                  seed=seed)
    np.testing.assert_array_equal(arm, whole.arm)
    assert certificates(outcome) == whole.certificates
    tenant = np.arange(q.shape[0], dtype=np.int32) % 2
    if q.shape[0] < 2 or not math.isfinite(budget_usd):
        return
    try:
        split = solve_tenant_budgets(steps, tenant, [budget_usd, budget_usd], seed=seed)
    except InfeasibleBudget:
        return
    for t in (0, 1):
        rows = np.flatnonzero(tenant == t)
        alone = solve_budget(steps.take(rows), budget_usd, seed=seed,
                             query_key=rows.astype(np.uint64))
        np.testing.assert_array_equal(alone.arm, split.arm[rows])


def test_plans_are_feasible_and_within_their_bound_of_the_enumerated_optimum():
    rng = np.random.default_rng(2027)
    for _ in range(120):
        q, c = adversarial_instance(rng)
        for budget in budgets(rng, q, c):
            seed = int(rng.integers(0, 4))
            check_against_enumeration(q, c, budget, seed, defer=False)
            check_against_enumeration(q, c, budget, seed, defer=True)
            check_block_split_and_tenants(q, c, budget, seed)
