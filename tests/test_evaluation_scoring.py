"""Non-learned methods and per-test-set scoring on a four-query bench worked out by hand.

Catalogue: models A (cheap) and B (dear), budgets 10 and default, so arms are
A/10, A/default, B/10, B/default. Prices are 1 USD per million output tokens and nothing for
input, so an arm's cost is its output tokens × 1e-6 USD: 1, 2, 10, 20 (× 1e-6) for every query.
"""

import numpy as np
import pytest

from r2ray.catalog import catalog_from_dict
from r2ray.evaluation.methods import non_learned_scores, random_point, single_model_names
from r2ray.evaluation.metrics import peak
from r2ray.evaluation.method_scores import (evaluable_queries, evaluate_methods, score_predictor,
                                      summarise)
from r2ray.predictor.base import ArmPredictions
from r2ray.predictor.data import BenchArrays

U = 1e-6  # USD per output token here
CATALOG = catalog_from_dict({"budgets": [10, "default"], "models": [
    {"name": "A", "input_per_m": 0.0, "output_per_m": 1.0, "context": 1000},
    {"name": "B", "input_per_m": 0.0, "output_per_m": 1.0, "context": 1000}]})
TOKENS = np.array([1.0, 2.0, 10.0, 20.0])
QUALITY = np.array([  # A/10, A/def, B/10, B/def
    [0, 1, 1, 1],
    [0, 0, 0, 1],
    [1, 1, 1, 1],
    [0, 0, 1, 0],
], dtype=np.float32)


def bench(quality=QUALITY, embedding=None) -> BenchArrays:
    n = len(quality)
    tokens = np.tile(TOKENS, (n, 1)).astype(np.float32)
    tokens[np.isnan(quality)] = np.nan
    return BenchArrays(
        query_id=np.array([f"q{i}" for i in range(n)]), query=np.array(["?"] * n),
        category=np.array([""] * n), input_tokens=np.full(n, 100.0), quality=quality,
        output_tokens=tokens, cost_usd=tokens.astype(np.float64) * U, embedding=embedding)


def test_single_models_random_and_oracles_by_hand():
    results = evaluate_methods(bench(), CATALOG, {})
    assert sorted(results) == ["oracle_all", "oracle_default", "random", "single:A", "single:B"]
    a, b = results["single:A"].curve, results["single:B"].curve
    assert (a.cost_usd.tolist(), a.quality.tolist()) == ([2 * U], [0.5])
    assert (b.cost_usd.tolist(), b.quality.tolist()) == ([20 * U], [0.75])
    # random over the two default arms: per query quality 1, .5, 1, 0 and cost 11e-6
    rnd = results["random"].curve
    assert rnd.cost_usd == pytest.approx([11 * U]) and rnd.quality == pytest.approx([0.625])
    # oracle on default arms: all A/default (.5 at 2e-6), or B/default for query 1 only
    od = results["oracle_default"].curve
    assert od.cost_usd == pytest.approx([2 * U, 6.5 * U]) and od.quality == pytest.approx([.5, .75])
    # oracle on all arms at λ = 0: A/def, B/def, A/10, B/10 (cheapest arm of quality 1 per query)
    oa = results["oracle_all"].curve
    assert oa.cost_usd[-1] == pytest.approx((2 + 20 + 1 + 10) / 4 * U) and peak(oa) == 1.0
    assert oa.cost_usd[0] == pytest.approx(1 * U) and oa.quality[0] == pytest.approx(0.25)


def test_summary_numbers_by_hand():
    summary = summarise(evaluate_methods(bench(), CATALOG, {}))
    assert summary["normalisation"]["cost_min_usd"] == pytest.approx(1 * U)   # oracle_all, cheapest
    assert summary["normalisation"]["cost_max_usd"] == pytest.approx(20 * U)  # single:B
    reference = summary["reference"]
    assert reference["best_single"] == "single:B"
    assert reference["target_quality"] == pytest.approx(0.95 * 0.75)
    m = summary["methods"]
    assert m["single:A"]["audc"] == pytest.approx(0.5 * 18 / 19)
    assert m["single:B"]["audc"] == 0.0  # a single point at the dearest cost has no area
    assert m["random"]["audc"] == pytest.approx(0.625 * 9 / 19)
    assert m["single:A"]["qnc"] == 1.0 and m["random"]["qnc"] == 1.0
    # oracle_default reaches .7125 between (2, .5) and (6.5, .75): at 2 + .85 × 4.5 = 5.825 (× 1e-6)
    assert m["oracle_default"]["cost_usd_at_95"] == pytest.approx(5.825 * U)
    assert m["oracle_default"]["qnc"] == pytest.approx(4.825 / 19)
    assert m["oracle_default"]["cost_ratio_at_95"]["single:B"] == pytest.approx(20 / 5.825)
    assert m["oracle_default"]["cost_ratio_at_95"]["single:A"] == float("inf")
    # best default-arm baseline at .7125: only single:B gets there
    assert m["oracle_default"]["cost_ratio_at_95_vs_best_default"] == pytest.approx(20 / 5.825)
    assert m["single:A"]["cost_ratio_at_95_vs_best_default"] is None
    # at single:A's peak (.5) oracle_default pays 2e-6 like single:A itself
    assert m["oracle_default"]["cost_ratio_at_peak"]["single:A"] == pytest.approx(1.0)


def test_learned_predictions_are_steered_by_their_own_costs():
    truth = ArmPredictions(QUALITY.copy(), np.tile(TOKENS, (4, 1)).astype(np.float32))
    blind = ArmPredictions(np.full((4, 4), 0.5, np.float32), np.full((4, 4), 5.0, np.float32))
    results = evaluate_methods(bench(), CATALOG, {"truth": truth, "blind": blind})
    # perfect predictions trace the all-arm oracle
    assert results["truth"].curve.quality == pytest.approx(results["oracle_all"].curve.quality)
    assert results["truth"].curve.cost_usd == pytest.approx(results["oracle_all"].curve.cost_usd)
    # equal beliefs everywhere: ties go to the cheapest predicted cost, then the first arm (A/10)
    assert results["blind"].curve.quality.tolist() == [0.25]


def test_oracle_is_at_least_every_methods_peak():
    rng = np.random.default_rng(0)
    quality = (rng.random((60, 4)) < [0.2, 0.4, 0.5, 0.7]).astype(np.float32)
    predictions = {f"m{i}": ArmPredictions(rng.random((60, 4)).astype(np.float32),
                                           rng.uniform(1, 30, (60, 4)).astype(np.float32))
                   for i in range(5)}
    results = evaluate_methods(bench(quality), CATALOG, predictions)
    oracle_peak = peak(results["oracle_all"].curve)
    assert all(peak(r.curve) <= oracle_peak + 1e-12 for r in results.values())
    default_only = ["oracle_default", "random", "single:A", "single:B"]
    assert all(peak(results[n].curve) <= peak(results["oracle_default"].curve) + 1e-12
               for n in default_only)


def test_queries_missing_a_default_arm_are_not_evaluable():
    quality = QUALITY.copy()
    quality[1, 3] = np.nan  # B/default missing
    quality[2, 0] = np.nan  # a budgeted arm missing is fine
    assert evaluable_queries(bench(quality), CATALOG).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="query 'q0' has none of the arms"):
        random_point(bench(np.full((1, 4), np.nan, np.float32)), np.ones(4, bool))


def test_single_models_need_a_default_arm():
    catalog = catalog_from_dict({"budgets": [10, "default"], "models": [
        {"name": "A", "input_per_m": 0, "output_per_m": 1, "context": 100},
        {"name": "C", "input_per_m": 0, "output_per_m": 1, "context": 60, "budgets": [10]}]})
    assert single_model_names(catalog) == ["single:A"]
    ones = np.ones((2, 3), np.float32)  # arms A/10, A/default, C/10
    test = BenchArrays(np.array(["a", "b"]), np.array(["?", "?"]), np.array(["", ""]),
                       np.ones(2), ones, ones, ones.astype(float) * U)
    assert sorted(non_learned_scores(test, catalog)) == ["oracle_all", "oracle_default", "single:A"]


class FixedPredictor:
    """Predicts the same thing for every query: fixed per-arm quality and tokens."""

    def __init__(self, quality, tokens):
        self.quality, self.tokens = np.asarray(quality, np.float32), np.asarray(tokens, np.float32)

    def predict(self, embedding):
        n = len(embedding)
        return ArmPredictions(np.tile(self.quality, (n, 1)), np.tile(self.tokens, (n, 1)))


def test_score_predictor_uses_the_non_learned_scale():
    test = bench(embedding=np.zeros((4, 3), np.float32))
    always_b = score_predictor(FixedPredictor([np.nan, np.nan, np.nan, 1], TOKENS), test, CATALOG)
    assert always_b["peak"] == pytest.approx(0.75) and always_b["audc"] == 0.0
    # believing B/default is the only good arm, yet able to fall back to the cheapest (A/10) when
    # λ is high: the line from (1e-6, .25) to (20e-6, .75) spans the whole normalised range
    b_or_cheapest = score_predictor(FixedPredictor([0, 0, 0, 1], TOKENS), test, CATALOG)
    assert b_or_cheapest["audc"] == pytest.approx((0.25 + 0.75) / 2)
    always_a = score_predictor(FixedPredictor([np.nan, 1, np.nan, np.nan], TOKENS), test, CATALOG)
    assert always_a["audc"] == pytest.approx(0.5 * 18 / 19)
    assert always_a["qnc"] == 1.0
    assert always_a["normalisation"]["over"] == [
        "oracle_all", "oracle_default", "random", "single:A", "single:B"]
    with pytest.raises(ValueError, match="needs test.embedding"):
        score_predictor(FixedPredictor([0, 1, 0, 0], TOKENS), bench(), CATALOG)


class _Beliefs:
    """A fitted predictor stand-in whose beliefs are fixed [N, K] arrays (rows = queries)."""

    def __init__(self, quality: np.ndarray):
        self.quality = quality

    def predict(self, embedding: np.ndarray) -> ArmPredictions:
        rows = embedding[:, 0].astype(int)   # each query's embedding carries its row index
        return ArmPredictions(self.quality[rows], np.tile(TOKENS, (len(rows), 1)).astype(np.float32))


def test_a_learned_method_is_scored_on_the_non_learned_methods_scale_only():
    """Costs are normalised over a fixed set (the non-learned methods), so a learned router's AUDC
    does not move with which learned methods were scored beside it (before: `r2ray evaluate` and
    its learning curves normalised over every method scored, learned ones included)."""
    from r2ray.evaluation.harness import evaluate_fitted

    tokens = np.array([[1.0, 30.0, 10.0, 20.0], [1.0, 2.0, 10.0, 40.0]])  # per query, per arm
    test = bench(QUALITY[:2], embedding=np.arange(2, dtype=np.float32)[:, None])
    test = BenchArrays(**{**test.__dict__, "output_tokens": tokens.astype(np.float32),
                          "cost_usd": tokens * U})
    dearest = _Beliefs(tokens.astype(np.float32) / 100)   # believes the dearest arm is best
    scored = evaluate_fitted(dearest, test, CATALOG, name="dearest")
    # its curve reaches (30 + 40) / 2 = 35e-6, past single:B's 30e-6: the scale must not follow it
    assert scored["methods"]["dearest"]["max_cost_usd"] == pytest.approx(35 * U)
    assert "dearest" not in scored["normalisation"]["over"]
    assert scored["normalisation"]["cost_max_usd"] == pytest.approx(30 * U)   # single:B
