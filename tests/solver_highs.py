"""Reference formulations of the budget problem for scipy's HiGHS, and small test instances."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, linprog, milp


# HiGHS's default feasibility tolerances (1e-7) leave its optimum ~1e-9 off; tighten them
HIGHS_TIGHT = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


def arm_matrix(q: np.ndarray, c: np.ndarray):
    """Variables = valid arms; equality rows = queries with at least one valid arm."""
    valid = np.isfinite(q) & np.isfinite(c)
    rows, cols = np.nonzero(valid)
    routable = np.flatnonzero(valid.any(axis=1))
    one_arm = np.zeros((routable.size, rows.size))
    one_arm[np.searchsorted(routable, rows), np.arange(rows.size)] = 1.0
    return valid, rows, cols, one_arm


def highs_lp(q, c, budget_usd: float) -> tuple[float, float]:
    """(LP optimum, dual price of the budget row λ >= 0) of the relaxed problem."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    valid, rows, cols, one_arm = arm_matrix(q, c)
    res = linprog(-q[valid], A_ub=c[valid][None, :], b_ub=[budget_usd], A_eq=one_arm,
                  b_eq=np.ones(one_arm.shape[0]), bounds=(0, None), method="highs",
                  options=HIGHS_TIGHT)
    assert res.status == 0, res.message
    return -res.fun, -res.ineqlin.marginals[0]


def highs_milp(q, c, budget_usd: float, extra_rows=()) -> float | None:
    """Integer optimum (None if infeasible); extra_rows: (weights [N, K], limit) constraints."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    valid, rows, cols, one_arm = arm_matrix(q, c)
    constraints = [LinearConstraint(c[valid][None, :], -np.inf, budget_usd),
                   LinearConstraint(one_arm, 1, 1)]
    constraints += [LinearConstraint(w[valid][None, :], -np.inf, limit) for w, limit in extra_rows]
    res = milp(-q[valid], constraints=constraints, integrality=np.ones(rows.size),
               bounds=Bounds(0, 1))
    return -res.fun if res.success else None


def dual_value(q, c, budget_usd: float, lam: float) -> float:
    """g(λ) = λB + Σ_i max_j (q_ij - λ c_ij) over valid arms, from the raw arrays."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    with np.errstate(invalid="ignore"):
        values = np.where(np.isfinite(q) & np.isfinite(c), q - lam * c, -np.inf)
    best = values.max(axis=1)
    return lam * budget_usd + math.fsum(best[np.isfinite(best)])


def chosen(values: np.ndarray, arm: np.ndarray) -> float:
    """Exact (fsum) total of values[i, arm[i]] over queries with a real arm."""
    rows = np.flatnonzero(arm >= 0)
    return math.fsum(np.asarray(values, np.float64)[rows, arm[rows]])


def cheapest_total(q, c) -> float:
    """The least float >= the exact total of every query's cheapest valid arm (USD)."""
    valid = np.isfinite(q) & np.isfinite(c)
    costs = np.where(valid, np.asarray(c, np.float64), np.inf).min(axis=1)
    exact = sum((Fraction(x) for x in costs[np.isfinite(costs)].tolist()), Fraction(0))
    total = float(exact)
    return total if Fraction(total) >= exact else math.nextafter(total, math.inf)


@st.composite
def instances(draw, max_queries: int = 6, max_arms: int = 5):
    """(q, c) with ties, qualities quantised to 0.1, duplicated queries, NaN and inf arms."""
    n = draw(st.integers(1, max_queries))
    k = draw(st.integers(1, max_arms))
    quantised = draw(st.booleans())
    quality = (st.integers(0, 10).map(lambda x: x / 10) if quantised
               else st.floats(0, 1, allow_nan=False))
    cost = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]) | st.floats(1e-4, 10)
    q = np.array(draw(st.lists(quality, min_size=n * k, max_size=n * k))).reshape(n, k)
    c = np.array(draw(st.lists(cost, min_size=n * k, max_size=n * k))).reshape(n, k)
    holes = np.array(draw(st.lists(st.sampled_from(["ok"] * 6 + ["nan_q", "nan_c", "inf_c"]),
                                   min_size=n * k, max_size=n * k))).reshape(n, k)
    q[holes == "nan_q"], c[holes == "nan_c"], c[holes == "inf_c"] = np.nan, np.nan, np.inf
    copies = draw(st.integers(0, n))                  # duplicated queries
    q, c = np.vstack([q, q[:copies]]), np.vstack([c, c[:copies]])
    if draw(st.booleans()):
        q, c = q.astype(np.float32), c.astype(np.float32)
    return q, c


def budget_between(q, c, steps, fraction: float) -> float:
    """A budget ``fraction`` of the way from the cheapest to the best-arm total."""
    low = cheapest_total(q, c)
    return low + fraction * math.fsum(steps.dc)
