"""Deferral-curve metrics against curves computed by hand."""

import numpy as np
import pytest

from r2ray.evaluation.metrics import (DeferralCurve, audc, choose_arms, cost_at_quality,
                                      cost_bounds, cost_ratio_at_quality, deferral_curve,
                                      deferral_points, lambda_grid, peak, qnc)

NAN = np.nan


def curve(*points):
    cost, quality = zip(*points)
    return DeferralCurve(np.array(cost, float), np.array(quality, float))


def test_frontier_keeps_only_points_nobody_beats():
    got = deferral_curve([1, 2, 3, 3, 0.5], [0.5, 0.4, 0.7, 0.8, 0.5])
    # (1, .5) costs more than (.5, .5) for the same quality; (2, .4) and (3, .7) are beaten too.
    assert got.cost_usd.tolist() == [0.5, 3]
    assert got.quality.tolist() == [0.5, 0.8]


def test_audc_of_a_linear_curve_is_a_trapezoid():
    assert audc(curve((0, 0.2), (10, 0.6)), 0, 10) == pytest.approx((0.2 + 0.6) / 2)


def test_audc_of_one_point_is_a_step():
    # 0 left of x = 0.5, 0.6 from there to 1.
    assert audc(curve((5, 0.6)), 0, 10) == pytest.approx(0.5 * 0.6)


def test_audc_extends_flat_to_the_right_and_is_zero_to_the_left():
    # [0, .2]: 0; [.2, .6]: trapezoid .4 × (.4 + .8)/2 = .24; [.6, 1]: .4 × .8 = .32
    assert audc(curve((2, 0.4), (6, 0.8)), 0, 10) == pytest.approx(0.56)
    # [0, .5]: .5 × (.2 + .6)/2 = .2; [.5, 1]: .5 × .6 = .3
    assert audc(curve((0, 0.2), (5, 0.6)), 0, 10) == pytest.approx(0.5)


def test_audc_clips_a_curve_outside_the_bounds():
    # normalised x runs -.5 .. 1.5 on the line q = .3 + .2 (x + .5): Q(0) = .4, Q(1) = .6
    got = audc(curve((-5, 0.3), (15, 0.7)), 0, 10)
    assert got == pytest.approx((0.4 + 0.6) / 2)
    assert audc(curve((12, 0.9)), 0, 10) == 0.0


def test_qnc_reached_at_first_point_interpolated_and_never():
    c = curve((2, 0.4), (6, 0.8))
    assert qnc(c, 0.3, 0, 10) == pytest.approx(0.2)   # the cheapest point already does it
    assert qnc(c, 0.6, 0, 10) == pytest.approx(0.4)   # halfway from cost 2 to 6
    assert qnc(c, 0.9, 0, 10) == 1.0                  # never reached
    assert cost_at_quality(c, 0.9) is None


def test_peak_is_the_best_quality_on_the_curve():
    assert peak(deferral_curve([1, 2, 3], [0.3, 0.9, 0.6])) == 0.9


def test_cost_ratio_at_matched_quality():
    mine = curve((2, 0.4), (6, 0.8))
    baseline = curve((4, 0.4), (12, 0.8))
    assert cost_ratio_at_quality(mine, baseline, 0.6) == pytest.approx(8 / 4)
    assert cost_ratio_at_quality(baseline, mine, 0.6) == pytest.approx(0.5)
    assert cost_ratio_at_quality(mine, curve((10, 0.5)), 0.6) == float("inf")  # baseline never
    assert cost_ratio_at_quality(mine, baseline, 0.85) is None                 # mine never


def test_cost_bounds_span_every_curve():
    assert cost_bounds([curve((2, 0.4), (6, 0.8)), curve((1, 0.1)), curve((3, 0.5), (9, 0.6))]) \
        == (1.0, 9.0)


def test_lambda_sweep_choices_by_hand():
    quality = np.array([[0.9, 0.6, 0.1], [0.5, 0.5, NAN]])
    cost = np.array([[1e-3, 1e-4, 1e-6], [1e-3, 1e-5, 1e-6]])
    # λ = 0: the best arm; query 1 ties arms 0 and 1 and takes the cheaper (arm 2 is unusable)
    assert choose_arms(quality, cost, 0.0).tolist() == [0, 1]
    # λ = 1e3: query 0 scores -0.1, 0.5, 0.099
    assert choose_arms(quality, cost, 1e3).tolist() == [1, 1]
    # λ = 1e5: query 0 scores -99.1, -9.4, 0.0
    assert choose_arms(quality, cost, 1e5).tolist() == [2, 1]
    assert choose_arms(np.full((1, 2), NAN), np.ones((1, 2)), 0.0).tolist() == [-1]


def test_deferral_points_use_true_outcomes_and_skip_arms_the_bench_lacks():
    quality = np.array([[0.9, 0.6, 0.1], [0.5, 0.4, 0.9]])
    cost = np.array([[1e-3, 1e-4, 1e-6], [1e-3, 1e-5, 1e-6]])
    true_quality = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, NAN]])
    true_cost = np.array([[2e-3, 2e-4, 2e-6], [3e-3, 3e-5, 3e-6]])
    costs, qualities = deferral_points(quality, cost, true_quality, true_cost, np.array([0.0, 1e5]))
    # λ = 0: query 0 takes arm 0 (true 1.0, 2e-3); query 1 cannot take arm 2, takes arm 0 (0.0, 3e-3)
    assert costs[0] == pytest.approx((2e-3 + 3e-3) / 2) and qualities[0] == pytest.approx(0.5)
    # λ = 1e5: query 0 arm 2 (1.0, 2e-6); query 1: -99.5 vs -0.6 → arm 1 (1.0, 3e-5)
    assert costs[1] == pytest.approx((2e-6 + 3e-5) / 2) and qualities[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="query 0 has no arm"):
        deferral_points(np.array([[NAN, 1.0]]), np.ones((1, 2)), np.array([[1.0, NAN]]),
                        np.ones((1, 2)), np.array([0.0]))


def test_lambda_grid_reaches_both_ends_of_usd_costs():
    grid = lambda_grid()
    assert grid[0] == 0.0 and grid[1] == pytest.approx(1e-2) and grid[-1] == pytest.approx(1e9)
    assert np.all(np.diff(grid) > 0)
    # the dearest λ makes a 1e-7 USD saving outweigh the whole quality range
    assert grid[-1] * 1e-7 > 1.0


def test_audc_on_log_cost():
    # bounds 1e-6..1e-2 span four decades; points at 1e-5 (x = .25) and 1e-4 (x = .5)
    c = curve((1e-5, 0.4), (1e-4, 0.8))
    # [.25, .5]: .25 × (.4 + .8)/2 = .15; [.5, 1]: .5 × .8 = .4
    assert audc(c, 1e-6, 1e-2, log_cost=True) == pytest.approx(0.55)
    assert np.isnan(audc(curve((0.0, 0.5)), 0.0, 1e-2, log_cost=True))


def test_cost_calibration_by_hand():
    from r2ray.evaluation.calibration import cost_calibration

    predicted = np.array([[1.0, 4.0], [3.0, NAN], [2.0, 8.0]])
    realised = np.array([[2.0, 4.0], [2.0, 5.0], [NAN, 12.0]])
    got = cost_calibration(predicted, realised, ["a", "b"])
    # cells with both: a (1, 2), (3, 2); b (4, 4), (8, 12)
    assert got["overall"] == {"n": 4, "predicted_usd": 4.0, "realised_usd": 5.0, "ratio": 0.8}
    assert got["per_arm"]["a"] == {"n": 2, "predicted_usd": 2.0, "realised_usd": 2.0, "ratio": 1.0}
    assert got["per_arm"]["b"] == {"n": 2, "predicted_usd": 6.0, "realised_usd": 8.0, "ratio": 0.75}
    # four cells, ten deciles asked: one cell a decile, in order of predicted cost
    assert [d["predicted_usd"] for d in got["per_decile"]] == [1.0, 3.0, 4.0, 8.0]
    assert [d["ratio"] for d in got["per_decile"]] == [0.5, 1.5, 1.0, 8.0 / 12.0]
    empty = cost_calibration(np.full((2, 1), NAN), np.ones((2, 1)), ["a"])
    assert empty["per_arm"] == {} and empty["per_decile"] == [] and empty["overall"]["n"] == 0


def test_budget_adherence_by_hand():
    from r2ray.evaluation.adherence import budget_adherence

    # arm 2 looks best and cheapest but the bench lacks it (query 0) / the method cannot use it
    # (query 1): never chosen. Query 0's arm 1 is predicted at $3 and bills $5.
    q_hat = np.array([[0.5, 0.9, 1.0], [0.4, 0.5, NAN]])
    c_hat = np.array([[1.0, 3.0, 0.5], [1.0, 2.0, NAN]])
    quality = np.array([[0.0, 1.0, NAN], [1.0, 1.0, 1.0]])
    cost = np.array([[1.0, 5.0, NAN], [1.0, 2.0, 0.1]])
    # hull steps: query 0 +.4 for $2 (.2/USD), query 1 +.1 for $1 (.1/USD); both arms-0 cost $2
    rows = budget_adherence(q_hat, c_hat, quality, cost, [1.5, 3.0, 4.0, 5.0])
    by_budget = {r["budget_usd"]: r for r in rows}
    # $1.5 < $2 on the cheapest arms: infeasible, both queries on arm 0
    assert by_budget[1.5]["feasible"] is False
    assert by_budget[1.5]["realised_spend_ratio"] == pytest.approx(2 / 1.5)
    # $3: query 0's step does not fit, query 1's does: arms (0, 1), bill 1 + 2 = 3
    assert by_budget[3.0] == {
        "budget_usd": 3.0, "budget_usd_per_query": 1.5, "predicted_spend_ratio": 1.0,
        "realised_spend_ratio": 1.0, "planned_usd": 3.0, "realised_usd": 3.0, "cv": 0.0,
        "predicted_quality": pytest.approx(0.5),
        "realised_quality": 0.5, "feasible": True}
    # $4: arms (1, 0), planned 3 + 1 = 4, billed 5 + 1 = 6; $5: arms (1, 1), billed 5 + 2 = 7
    assert by_budget[4.0]["predicted_spend_ratio"] == 1.0
    assert by_budget[4.0]["realised_spend_ratio"] == 1.5
    assert by_budget[4.0]["predicted_quality"] == pytest.approx(0.65)
    assert by_budget[4.0]["realised_quality"] == 1.0
    assert by_budget[5.0]["predicted_spend_ratio"] == 1.0
    assert by_budget[5.0]["realised_spend_ratio"] == 1.4


def test_budget_adherence_of_the_truth_never_overspends():
    from r2ray.evaluation.adherence import budget_adherence, budget_levels

    rng = np.random.default_rng(0)
    quality = rng.random((200, 4))
    cost = rng.lognormal(-9, 1.5, (200, 4))
    quality[rng.random((200, 4)) < 0.2] = NAN
    quality[:, 0] = rng.random(200)                      # every query has arm 0
    cost[np.isnan(quality)] = NAN
    levels = budget_levels(cost, best_arm=0) * 200
    assert levels[0] > np.nanmin(cost, axis=1).sum()
    assert levels[-1] == pytest.approx(cost[:, 0].sum())
    rows = budget_adherence(quality, cost, quality, cost, levels)
    for row in rows:
        assert row["feasible"]
        assert row["realised_spend_ratio"] == row["predicted_spend_ratio"] <= 1.0
    assert rows[0]["realised_spend_ratio"] > 0.999   # the tightest budget is spent to the cent


def test_budget_levels_when_every_query_has_a_free_arm():
    """A catalogue may price a model at 0 USD (a local one): the cheapest-arm spend is then 0,
    where no geometric scale starts (this raised ZeroDivisionError, ending ``r2ray evaluate``
    after every fit). The levels run linearly from 0 up to the best single model's spend."""
    from r2ray.evaluation.adherence import LEVEL_FRACTIONS, budget_adherence, budget_levels

    rng = np.random.default_rng(0)
    quality = rng.random((100, 3))
    cost = np.column_stack([np.zeros(100), rng.lognormal(-9, 1.5, (100, 2))])   # arm 0 is free
    levels = budget_levels(cost, best_arm=2)
    np.testing.assert_allclose(levels, np.asarray(LEVEL_FRACTIONS) * cost[:, 2].mean())
    for row in budget_adherence(quality, cost, quality, cost, levels * 100):
        assert row["feasible"] and row["realised_spend_ratio"] <= 1.0 + 1e-12
