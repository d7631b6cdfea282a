"""Score methods on one test set: deferral curves, then AUDC / QNC / Peak / cost ratios.

Reference quality: 95% of the best single model's quality on the same test set (``target``).
Normalisation: costs min–max normalised over the curves of a stated, fixed set of methods: the
non-learned reference methods (:func:`reference_methods`: random, the oracles, each single model),
so that a learned method's score does not move with which other learned methods ran beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.catalog import Catalog
from r2ray.evaluation.metrics import (DeferralCurve, audc, cost_at_quality, cost_bounds,
                                      cost_ratio_at_quality, deferral_curve, deferral_points,
                                      lambda_grid, peak, qnc)
from r2ray.evaluation.methods import (RANDOM, SINGLE_PREFIX, MethodScores, non_learned_scores,
                                      random_point, scores_from_predictions)
from r2ray.predictor.base import ArmPredictions, Predictor, default_arm_mask
from r2ray.predictor.data import BenchArrays

REFERENCE_FRACTION = 0.95
"""QNC and the matched-quality cost ratio use this fraction of the best single model's quality."""

DEFAULT_ARM_LEARNED = ("carrot_knn_default", "carrot_linear_default")
"""Learned baselines restricted to default arms (the paper's protocol)."""


@dataclass(frozen=True)
class MethodResult:
    """A method's λ-sweep points (USD per query, quality) and its frontier curve."""

    points_cost_usd: np.ndarray
    points_quality: np.ndarray
    curve: DeferralCurve


def result_from_points(cost_usd: np.ndarray, quality: np.ndarray) -> MethodResult:
    return MethodResult(cost_usd, quality, deferral_curve(cost_usd, quality))


SAMPLED_SHARE = 0.5
"""A bench is *sampled* (its arms dealt per query) when fewer than this share of its queries have
every default arm; it is then scored by replay (:func:`r2ray.evaluation.metrics.deferral_points`)."""


def is_sampled(test: BenchArrays, catalog: Catalog) -> bool:
    """Whether ``test`` was collected with k arms per query (``bench collect --arms K``)."""
    full = test.mask[:, default_arm_mask(catalog)].all(axis=1)
    return test.n_queries > 0 and full.mean() < SAMPLED_SHARE


def scored_by_replay(test: BenchArrays, catalog: Catalog, replay: bool | None) -> bool:
    """``replay`` when the caller decided it on the whole bench (an evaluation's splits must all
    be scored one way), else whether ``test`` itself :func:`is_sampled`."""
    return is_sampled(test, catalog) if replay is None else replay


def evaluable_queries(test: BenchArrays, catalog: Catalog,
                      replay: bool | None = None) -> np.ndarray:
    """Indices of the queries every method can be scored on: those whose bench has every default
    arm, or on a sampled bench (replay) those with any arm. ``replay``: :func:`scored_by_replay`."""
    if scored_by_replay(test, catalog, replay):
        return np.flatnonzero(test.mask.any(axis=1))
    return np.flatnonzero(test.mask[:, default_arm_mask(catalog)].all(axis=1))


def evaluate_scores(scores: MethodScores, test: BenchArrays, lambdas: np.ndarray,
                    replay: bool = False) -> MethodResult:
    return result_from_points(*deferral_points(scores.quality, scores.cost_usd, test.quality,
                                               test.cost_usd, lambdas, replay))


def evaluate_methods(test: BenchArrays, catalog: Catalog,
                     predictions: dict[str, ArmPredictions],
                     lambdas: np.ndarray | None = None,
                     replay: bool | None = None) -> dict[str, MethodResult]:
    """Curves of the given learned predictions plus every non-learned method on ``test``.

    ``test`` must hold only :func:`evaluable_queries` (with the same ``replay``). On a sampled
    bench every method is scored by replay, and the oracles know only the dealt arms.
    """
    lambdas = lambda_grid() if lambdas is None else lambdas
    replay = scored_by_replay(test, catalog, replay)
    scores = {name: scores_from_predictions(p, catalog, test.input_tokens)
              for name, p in predictions.items()}
    scores.update(non_learned_scores(test, catalog))
    points = {name: deferral_points(s.quality, s.cost_usd, test.quality, test.cost_usd, lambdas,
                                    replay) for name, s in scores.items()}
    # replay: a method none of whose picks the sample holds (a model whose default arm was never
    # dealt to these queries) cannot be scored here, and is left out rather than guessed
    results = {name: result_from_points(*p) for name, p in points.items()
               if np.isfinite(p[0]).any()}
    results[RANDOM] = result_from_points(*random_point(test, default_arm_mask(catalog), replay))
    return results


def reference_quality(results: dict[str, MethodResult]) -> tuple[str, float]:
    """(name, quality) of the best single model."""
    singles = {n: peak(r.curve) for n, r in results.items() if n.startswith(SINGLE_PREFIX)}
    if not singles:
        raise ValueError("no single:<model> method to take the reference quality from")
    best = max(singles, key=singles.get)
    return best, singles[best]


def is_default_arm_baseline(name: str) -> bool:
    return name.startswith(SINGLE_PREFIX) or name in (RANDOM, *DEFAULT_ARM_LEARNED)


def summarise(results: dict[str, MethodResult],
              normalise_over: list[str] | None = None) -> dict:
    """Metrics of every method, plus the normalisation and reference they were computed with."""
    over = sorted(results if normalise_over is None else normalise_over)
    bounds = cost_bounds([results[n].curve for n in over])
    best_single, best_quality = reference_quality(results)
    target = REFERENCE_FRACTION * best_quality
    curves = {n: r.curve for n, r in results.items()}
    return {
        "methods": {n: method_metrics(n, curves, target, bounds) for n in results},
        "normalisation": {"cost_min_usd": bounds[0], "cost_max_usd": bounds[1], "over": over},
        "reference": {"best_single": best_single, "best_single_quality": best_quality,
                      "fraction": REFERENCE_FRACTION, "target_quality": target},
    }


def method_metrics(name: str, curves: dict[str, DeferralCurve], target: float,
                   bounds: tuple[float, float]) -> dict:
    """AUDC, QNC, Peak, cost at the target, and cost ratios against every other method."""
    curve = curves[name]
    others = {b: c for b, c in curves.items() if b != name}
    return {
        "audc": audc(curve, *bounds),
        "audc_log_cost": audc(curve, *bounds, log_cost=True),
        "qnc": qnc(curve, target, *bounds),
        "peak": peak(curve),
        "min_cost_usd": float(curve.cost_usd[0]),
        "max_cost_usd": float(curve.cost_usd[-1]),
        "cost_usd_at_95": cost_at_quality(curve, target),
        "cost_ratio_at_95": {b: cost_ratio_at_quality(curve, c, target) for b, c in others.items()},
        "cost_ratio_at_95_vs_best_default": ratio_vs_cheapest(
            curve, [c for b, c in others.items() if is_default_arm_baseline(b)], target),
        "cost_ratio_at_peak": {b: cost_ratio_at_quality(curve, c, peak(c))
                               for b, c in others.items()},
    }


def ratio_vs_cheapest(curve: DeferralCurve, baselines: list[DeferralCurve],
                      quality: float) -> float | None:
    """Cost ratio against whichever baseline reaches ``quality`` most cheaply."""
    if not baselines or cost_at_quality(curve, quality) is None:
        return None
    return min(cost_ratio_at_quality(curve, b, quality) for b in baselines)


def score_predictor(predictor: Predictor, test: BenchArrays, catalog: Catalog,
                    lambdas: np.ndarray | None = None) -> dict:
    """AUDC, QNC, Peak (and cost at 95%) of one fitted predictor on ``test`` (embeddings set).

    Costs are normalised over the non-learned methods only (single models, random, oracles),
    so scores of two predictors on the same test set share one scale and can be compared.
    """
    if test.embedding is None:
        raise ValueError("score_predictor needs test.embedding; build the test set with embeddings")
    test = test.subset(evaluable_queries(test, catalog))
    if test.n_queries == 0:
        raise ValueError("no test query has every default arm in the bench")
    return score_predictions({"predictor": predictor.predict(test.embedding)}, test, catalog,
                             lambdas)["predictor"]


def reference_methods(results: dict[str, MethodResult],
                      predictions: dict[str, ArmPredictions]) -> list[str]:
    """The methods costs are normalised over: those scored in ``results`` that are not among the
    learned ``predictions`` (random, the oracles, the single models)."""
    return [name for name in results if name not in predictions]


def score_predictions(predictions: dict[str, ArmPredictions], test: BenchArrays, catalog: Catalog,
                      lambdas: np.ndarray | None = None) -> dict[str, dict]:
    """Per named prediction [N, K] on ``test`` (evaluable queries only): AUDC, QNC, Peak, cost
    at 95%, with costs normalised over the non-learned methods only (one scale for all)."""
    results = evaluate_methods(test, catalog, predictions, lambdas)
    summary = summarise(results, normalise_over=reference_methods(results, predictions))
    return {name: {key: summary["methods"][name][key] for key in (
        "audc", "qnc", "peak", "cost_usd_at_95", "cost_ratio_at_95_vs_best_default")} | {
        "n_queries": test.n_queries,
        "normalisation": summary["normalisation"],
        "reference": summary["reference"],
    } for name in predictions}
