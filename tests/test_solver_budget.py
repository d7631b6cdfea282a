"""solve_budget against scipy's HiGHS, the certificate, the tie rule and the edge cases."""
from __future__ import annotations

import math
from fractions import Fraction
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from r2ray.solver import (
    DEFER_ARM, NO_ARM, InfeasibleBudget, choose_arm, choose_arms, hull_steps, solve_budget,
    tie_hash)
from solver_highs import (
    budget_between, chosen, cheapest_total, dual_value, highs_lp, highs_milp, instances)

fractions = st.sampled_from([0.0, 0.5, 1.0, 1.5]) | st.floats(0, 1.2)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a), abs(b))


@settings(max_examples=250, deadline=None)
@given(instances(), fractions, st.integers(0, 3))
def test_lp_value_and_price_match_highs(instance, fraction, seed):
    q, c = instance
    assume((np.isfinite(q) & np.isfinite(c)).any())
    steps = hull_steps(q, c)
    budget = budget_between(q, c, steps, fraction)
    cert = solve_budget(steps, budget, seed=seed).certificate
    lp_value, highs_lam = highs_lp(q, c, budget)
    assert rel(cert.lp_value, lp_value) <= 1e-9
    assert rel(dual_value(q, c, budget, cert.lam), lp_value) <= 1e-9     # λ* is an optimal dual
    if cert.lam > 0 and 1e-9 < cert.lp_fraction < 1 - 1e-9:             # the dual is unique
        assert rel(cert.lam, highs_lam) <= 1e-9
    else:                                                               # a range of optimal duals
        assert rel(dual_value(q, c, budget, highs_lam), lp_value) <= 1e-9


@settings(max_examples=250, deadline=None)
@given(instances(), fractions, st.integers(0, 3))
def test_assignment_is_feasible_and_certified(instance, fraction, seed):
    q, c = instance
    steps = hull_steps(q, c)
    budget = budget_between(q, c, steps, fraction)
    result = solve_budget(steps, budget, seed=seed)
    cert = result.certificate
    spend, objective = chosen(c, result.arm), chosen(q, result.arm)
    assert spend <= budget and cert.spend_usd <= budget
    assert rel(cert.spend_usd, spend) <= 1e-9 and rel(cert.objective, objective) <= 1e-9
    largest_jump = float(steps.dq.max(initial=0.0))
    assert -1e-9 <= cert.gap <= largest_jump + 1e-9
    assert cert.upper_bound >= cert.lp_value - 1e-9 * max(1.0, abs(cert.lp_value))
    valid = np.isfinite(q) & np.isfinite(c)
    assert cert.n_invalid_arms == int((~valid).sum())
    assert cert.n_unroutable == int((~valid.any(axis=1)).sum())
    assert ((result.arm == NO_ARM) == ~valid.any(axis=1)).all()
    rows = np.flatnonzero(result.arm >= 0)
    assert valid[rows, result.arm[rows]].all()


@settings(max_examples=60, deadline=None)
@given(instances(max_queries=5, max_arms=4), fractions)
def test_objective_sits_between_integer_optimum_and_its_bound(instance, fraction):
    q, c = instance
    assume((np.isfinite(q) & np.isfinite(c)).any())
    steps = hull_steps(q, c)
    budget = budget_between(q, c, steps, fraction)
    cert = solve_budget(steps, budget).certificate
    best = highs_milp(q, c, budget)
    assert cert.objective <= best + 1e-9 and best <= cert.upper_bound + 1e-9


@settings(max_examples=150, deadline=None)
@given(instances(), fractions, st.integers(0, 5))
def test_online_choice_agrees_with_the_batch(instance, fraction, seed):
    q, c = instance
    steps = hull_steps(q, c)
    result = solve_budget(steps, budget_between(q, c, steps, fraction), seed=seed)
    cert = result.certificate
    online = choose_arms(q, c, cert.lam, tie_cut=cert.tie_cut, seed=seed)
    assert ((online == result.arm) | result.filled).all()
    assert result.filled.sum() == cert.n_filled
    for i in np.flatnonzero(~result.filled)[:3]:
        assert choose_arm(q[i], c[i], cert.lam, tie_cut=cert.tie_cut, seed=seed,
                          query_key=i) == result.arm[i]


@settings(max_examples=300, deadline=None)
@given(instances(max_queries=8, max_arms=8), st.integers(0, 7), st.integers(0, 2**64 - 1),
       st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0, 1), st.data())
def test_one_row_choice_is_the_rows_choice(instance, seed, key0, tie_cut, data):
    """``choose_arm`` (the one-row path Serve calls) is ``choose_arms``'s row, bit for bit: at
    prices that tie a step exactly (the hash decides), between and around them, 0, -0.0, inf
    and NaN; rows with NaN/inf arms or no valid arm at all; any tie cut, seed and key."""
    q, c = instance
    keys = (np.arange(q.shape[0], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(key0))                             # wraps: keys across the uint64 range
    steps = hull_steps(q, c)
    tied = (steps.dq / steps.dc).tolist()
    lam = data.draw(st.sampled_from(tied + [0.0, -0.0, math.inf, math.nan]) if tied
                    else st.sampled_from([0.0, -0.0, math.inf, math.nan]))
    lam = data.draw(st.sampled_from([lam, np.nextafter(lam, 0), np.nextafter(lam, np.inf),
                                     lam * 0.5]))
    rows = choose_arms(q, c, lam, tie_cut=tie_cut, seed=seed, query_key=keys)
    one = [choose_arm(q[i], c[i], lam, tie_cut=tie_cut, seed=seed, query_key=int(keys[i]))
           for i in range(q.shape[0])]
    assert one == rows.tolist()


def test_one_row_choice_splits_ties_like_the_rows():
    q, c = identical_queries(64)
    keys = np.arange(64, dtype=np.uint64) * np.uint64(7919)
    steps = hull_steps(q, c)
    lam = float(steps.dq[0] / steps.dc[0])                 # every copy's one step ties
    on_the_cut = int(tie_hash(3, keys[:1])[0]) / 2**32     # copy 0's hash is the cut: not taken
    for seed, cut in ((0, 0.5), (3, 0.2), (5, 0.0), (5, 1.0), (3, on_the_cut)):
        rows = choose_arms(q, c, lam, tie_cut=cut, seed=seed, query_key=keys)
        assert [choose_arm(q[i], c[i], lam, tie_cut=cut, seed=seed, query_key=int(keys[i]))
                for i in range(64)] == rows.tolist()
        if 0 < cut < 1:
            assert 0 < (rows == 1).sum() < 64              # the hash splits the tied copies


def identical_queries(n: int):
    """n copies of a two-arm query: 0.2 quality for 1 USD, or 0.6 for 2 USD."""
    return np.tile([[0.2, 0.6]], (n, 1)), np.tile([[1.0, 2.0]], (n, 1))


def test_ties_are_split_by_the_seeded_hash():
    q, c = identical_queries(10)
    steps = hull_steps(q, c)
    results = [solve_budget(steps, 14.0, seed=seed) for seed in range(4)]
    for result in results:
        cert = result.certificate
        assert (result.arm == 1).sum() == 4 and cert.spend_usd == 14.0
        assert cert.lam == pytest.approx(0.4) and cert.theta == pytest.approx(0.4)
        assert cert.lp_fraction == pytest.approx(0.4) and cert.gap == pytest.approx(0.0, abs=1e-12)
    picks = {tuple(np.flatnonzero(r.arm == 1)) for r in results}
    assert len(picks) > 1                                   # the seed changes who gets the step
    again = solve_budget(steps, 14.0, seed=2)
    np.testing.assert_array_equal(again.arm, results[2].arm)


def test_query_keys_drive_the_tie_order():
    q, c = identical_queries(6)
    steps = hull_steps(q, c)
    keys = np.array([11, 5, 9, 2, 7, 3], np.uint64)
    result = solve_budget(steps, 8.0, query_key=keys)
    cert = result.certificate
    assert (result.arm == 1).sum() == 2
    for i in range(6):
        assert choose_arm(q[i], c[i], cert.lam, tie_cut=cert.tie_cut,
                          query_key=int(keys[i])) == result.arm[i]


def test_rounding_down_then_greedy_fill():
    # the marginal step (0.5 for 2 USD) does not fit; a small, less efficient one does
    q = np.array([[0.0, 0.5], [0.0, 0.05]])
    c = np.array([[0.0, 2.0], [0.0, 0.5]])
    result = solve_budget(hull_steps(q, c), 1.0)
    cert = result.certificate
    assert cert.lam == pytest.approx(0.25) and cert.lp_value == pytest.approx(0.25)
    assert result.arm.tolist() == [0, 1] and result.filled.tolist() == [False, True]
    assert cert.objective == pytest.approx(0.05) and cert.gap == pytest.approx(0.2)


def test_lambda_is_zero_when_every_best_arm_fits():
    q, c = np.array([[0.1, 0.9, 0.5]]), np.array([[1.0, 2.0, 3.0]])
    result = solve_budget(hull_steps(q, c), 100.0)
    cert = result.certificate
    assert result.arm.tolist() == [1] and cert.lam == 0.0 and cert.theta == 1.0
    assert cert.lp_value == pytest.approx(0.9) and cert.gap == pytest.approx(0.0, abs=1e-12)
    assert choose_arm(q[0], c[0], 0.0) == 1


def test_infeasible_budget_states_the_minimum_spend():
    q, c = np.array([[0.5, 0.9], [0.3, 0.4]]), np.array([[1.5, 3.0], [2.25, 5.0]])
    with pytest.raises(InfeasibleBudget, match="minimum feasible spend") as err:
        solve_budget(hull_steps(q, c), 3.0)
    stated = float(re.search(r"spend ([0-9.e+-]+) USD", str(err.value)).group(1))
    assert stated == pytest.approx(3.75) and err.value.min_spend_usd == pytest.approx(3.75)
    assert isinstance(err.value, ValueError) and "defer=True" in str(err.value)


def test_defer_arm_absorbs_an_infeasible_budget():
    q, c = np.array([[0.5, 0.9], [0.3, 0.4]]), np.array([[1.5, 3.0], [2.25, 5.0]])
    result = solve_budget(hull_steps(q, c), 2.0, defer=True)
    cert = result.certificate
    assert result.arm.tolist() == [0, DEFER_ARM] and cert.n_deferred == 1
    assert cert.spend_usd == 1.5 and cert.objective == pytest.approx(0.5)
    online = choose_arms(q, c, cert.lam, tie_cut=cert.tie_cut, defer=True)
    assert ((online == result.arm) | result.filled).all()


@settings(max_examples=100, deadline=None)
@given(instances(), st.floats(0, 1.2))
def test_defer_matches_highs_with_a_free_zero_arm(instance, fraction):
    q, c = instance
    steps = hull_steps(q, c)
    budget = fraction * (cheapest_total(q, c) + math.fsum(steps.dc))
    result = solve_budget(steps, budget, defer=True)
    padded_q = np.hstack([np.asarray(q, np.float64), np.zeros((q.shape[0], 1))])
    padded_c = np.hstack([np.asarray(c, np.float64), np.zeros((q.shape[0], 1))])
    lp_value, _ = highs_lp(padded_q, padded_c, budget)
    assert rel(result.certificate.lp_value, lp_value) <= 1e-9
    arm = np.where(result.arm == DEFER_ARM, q.shape[1], result.arm)
    assert chosen(padded_c, arm) <= budget


def test_steps_sharing_a_float32_key_are_ordered_by_exact_efficiency():
    # two steps whose efficiencies differ below float32 resolution; only one fits
    q = np.array([[0.0, 1.0], [0.0, 1.0 + 1e-12]])
    c = np.array([[0.0, 1.0], [0.0, 1.0]])
    steps = hull_steps(q, c)
    assert steps.key[0] == steps.key[1]
    result = solve_budget(steps, 1.5)
    assert result.arm.tolist() == [0, 1]              # the more efficient step is taken
    assert result.certificate.lam == 1.0 and result.certificate.lp_fraction == 0.5


def test_duplicated_queries_are_split_consistently():
    rng = np.random.default_rng(3)
    q, c = rng.random((1, 6)).round(1), rng.random((1, 6)).round(2)
    q, c = np.repeat(q, 50, axis=0), np.repeat(c, 50, axis=0)
    steps = hull_steps(q, c)
    result = solve_budget(steps, budget_between(q, c, steps, 0.37))
    assert len(set(result.arm.tolist())) <= 3   # the tie splits them across at most 2 arms (+fill)
    assert chosen(c, result.arm) <= budget_between(q, c, steps, 0.37)


@pytest.mark.parametrize("budget", [-1.0, float("nan")])
def test_bad_budgets_are_rejected(budget):
    q, c = identical_queries(2)
    with pytest.raises(ValueError, match="budget"):
        solve_budget(hull_steps(q, c), budget)


def test_infinite_budget_takes_every_best_arm():
    q, c = identical_queries(3)
    result = solve_budget(hull_steps(q, c), float("inf"))
    assert result.arm.tolist() == [1, 1, 1] and result.certificate.lam == 0.0


def test_spend_stays_within_the_budget_when_a_cost_difference_rounds_down():
    # fl(1000 - 1.653...) is below the exact difference: summed as base + step, the dearer
    # arm looked 1e-14 USD cheaper than it is and was bought with a budget it passes
    q = np.array([[0.0, 0.0], [0.0, -1.0]])
    c = np.array([[1.0000000000000001e-09, 1e-9], [1e3, 1.6530491868332717]])
    budget = 1000.000000001
    for defer in (False, True):
        result = solve_budget(hull_steps(q, c), budget, defer=defer)
        rows = np.flatnonzero(result.arm >= 0)
        spend = sum((Fraction(float(c[i, result.arm[i]])) for i in rows), Fraction(0))
        assert spend <= Fraction(budget)


def test_infinite_budget_gives_a_finite_certificate():
    q, c = identical_queries(3)
    for defer in (False, True):
        cert = solve_budget(hull_steps(q, c), float("inf"), defer=defer).certificate
        assert math.isfinite(cert.upper_bound) and cert.gap == pytest.approx(0.0, abs=1e-12)
        assert cert.upper_bound == pytest.approx(cert.objective)


def test_the_stated_minimum_spend_is_a_budget_that_solves():
    # cheapest arms 0.1 + 0.4 USD: their exact sum is 2.8e-17 above the float 0.5, so a budget
    # of 0.5 is short; the error stated 0.5 (rounded to nearest) as the minimum to raise it to
    q, c = np.array([[0.5, 0.9], [0.3, 0.4]]), np.array([[0.1, 3.0], [0.4, 5.0]])
    steps = hull_steps(q, c)
    with pytest.raises(InfeasibleBudget) as err:
        solve_budget(steps, 0.5)
    minimum = err.value.min_spend_usd
    assert Fraction(minimum) >= Fraction(0.1) + Fraction(0.4) > Fraction(0.5)
    assert f"minimum feasible spend {minimum!r} USD" in str(err.value)
    assert solve_budget(steps, minimum).arm.tolist() == [0, 0]


def test_the_upper_bound_holds_when_under_half_an_ulp_of_the_budget_is_left():
    # after a 100,000 USD query and a step of 5e-7 USD, 3.8e-12 USD of the budget is left:
    # under half an ulp of 100,000, so B - spend in floats was 0, and λ* (1e9 quality per USD)
    # times that sliver put the bound below the objective the greedy fill reached
    big, d1, budget = 100000.0, 5e-7, 100000.0000005
    left = Fraction(budget) - Fraction(big) - Fraction(d1)
    assert 0 < left < Fraction(math.ulp(budget)) / 2
    d_fill = float(left) * 0.8                 # a step of efficiency 0.9e9 that fits the sliver
    q = np.array([[0.0, np.nan], [0.0, 1e4], [0.0, 1.0], [0.0, 0.9e9 * d_fill]])
    c = np.array([[big, np.nan], [0.0, d1], [0.0, 1e-9], [0.0, d_fill]])
    result = solve_budget(hull_steps(q, c), budget)
    cert = result.certificate
    assert result.arm.tolist() == [0, 1, 0, 1] and cert.lam == pytest.approx(1e9)
    assert chosen(c, result.arm) <= budget and cert.gap >= 0
    assert cert.upper_bound >= cert.objective
    assert Fraction(cert.upper_bound) >= exact_dual(q, c, budget, cert.lam)


def exact_dual(q, c, budget: float, lam: float) -> Fraction:
    """g(λ) = λB + Σ_i max_j (q_ij - λ c_ij) over the valid arms, in exact fractions."""
    return Fraction(lam) * Fraction(budget) + sum(
        max(Fraction(float(qj)) - Fraction(lam) * Fraction(float(cj))
            for qj, cj in zip(qi, ci) if math.isfinite(qj)) for qi, ci in zip(q, c))


def test_the_upper_bound_covers_the_float_rounding_of_the_chains():
    # dq = 0.78 - 0.07 and 0.38 - 0.03 are rounded differences and λ* a rounded dq / dc: the
    # bound summed from them fell 1.5e-16 below g(λ*), below the optimum (both best arms fit)
    q = np.array([[0.78, 0.07], [0.03, 0.38]])
    c = np.array([[0.00087, 0.00013], [1e-05, 0.00048]])
    budget = 0.00135
    cert = solve_budget(hull_steps(q, c), budget).certificate
    optimum = Fraction(0.78) + Fraction(0.38)
    assert Fraction(0.00087) + Fraction(0.00048) <= Fraction(budget)
    assert Fraction(cert.upper_bound) >= exact_dual(q, c, budget, cert.lam) >= optimum
    assert Fraction(cert.gap) >= optimum - Fraction(cert.objective)
    assert cert.gap == pytest.approx(cert.upper_bound - cert.objective)


def test_a_cost_that_underflows_its_quantum_still_costs_one():
    # beside 1e300 USD costs a quantum is ~2**936 USD and 1e-310 / 2**936 underflows to 0:
    # rounded up it was 0 quanta, so the 1e-310 USD step looked free and passed the budget
    q = np.array([[1e-320, 1e-300], [5e-324, 1e300]])
    c = np.array([[0.0, 1e-310], [5e-324, 1e300]])
    for budget in (5e-324, 1e300):
        result = solve_budget(hull_steps(q, c), budget)
        spend = sum(Fraction(float(c[i, a])) for i, a in enumerate(result.arm))
        assert spend <= Fraction(budget)
        assert Fraction(result.certificate.spend_usd) >= spend


def test_no_money_left_at_an_infinite_price_leaves_the_lp_value_finite():
    # a 5e-324 USD step's efficiency overflows to λ* = inf; with nothing left to spend the
    # LP value was inf × 0 = NaN
    q, c = np.array([[0.0, 1.0], [0.5, 1.0]]), np.array([[0.0, 5e-324], [1.0, 2.0]])
    cert = solve_budget(hull_steps(q, c), 1.0).certificate
    assert math.isinf(cert.lam) and cert.lp_value == 0.5 == cert.objective


def test_the_stated_spend_bounds_the_chosen_arms_exact_spend():
    # 3 × 813.2702392002724 USD is 2439.810717600817 USD and a quarter ulp: the spend's quanta
    # rounded to the nearest float stated an ulp less than the chosen arms cost
    c = np.full((3, 1), 813.2702392002724)
    cert = solve_budget(hull_steps(np.zeros((3, 1)), c), math.inf).certificate
    assert Fraction(cert.spend_usd) >= 3 * Fraction(813.2702392002724)
