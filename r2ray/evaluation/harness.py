"""Held-out evaluation: splits, fitting every learned method per split, aggregation over splits.

What the model under test contributes (``r2ray evaluate --model URI``):

1. **Its settings, re-fitted per split** — the main result. The model's predictor class and
   constructor settings (hyper-parameters; the ``seed`` is replaced by the split's seed) are fitted
   from scratch on each split's training part, next to every learned baseline at its default
   settings, and all are scored on the same held-out queries with the non-learned methods.
   Its name in ``metrics.json`` is its registry key (``r2ray`` for the joint network).
2. **Its registered weights, as they are** — a check of the deployed artefact: the fitted
   predictor predicts every evaluable bench query and is scored against the non-learned methods
   (``metrics.json["registered"]``). If the bench was its training data, this is in-sample and
   optimistic; it is skipped when the catalogue differs from the one it was trained with.

Splits: ``random`` — 80/20 per seed (``holdout_indices``), metrics as mean and sample std over
seeds; ``category`` — leave one category out (seed 0), mean and std over held-out categories.
Learned methods carve their early-stopping validation set out of the training part themselves
(never from the test part). Test queries lacking any default arm are dropped (counted).
Replay or full information (:func:`r2ray.evaluation.method_scores.is_sampled`) is decided once on
the whole bench, so every split is scored the same way: decided per split's test part, near the
threshold one split was scored by replay and another by full information, and the means mixed
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from r2ray.catalog import DEFAULT_BUDGET, Catalog
from r2ray.errors import R2RayError
from r2ray.evaluation.adherence import budget_levels
from r2ray.evaluation.calibration import cost_calibration, quality_calibration
from r2ray.evaluation.method_scores import (MethodResult, evaluable_queries, evaluate_methods,
                                            evaluate_scores, is_sampled, reference_methods,
                                            reference_quality, summarise)
from r2ray.evaluation.methods import (ORACLE_ALL, SINGLE_PREFIX, MethodScores, oracle,
                                      scores_from_predictions)
from r2ray.evaluation.metrics import audc
from r2ray.predictor.base import ArmPredictions, Predictor
from r2ray.predictor.data import BenchArrays, holdout_indices
from r2ray.predictor.spend_guarantee import (DEFAULT_GUARANTEE as GUARANTEE, SpendSimulation,
                                             guaranteed_bills, solve_and_bill)

MODEL_EVALUATION = (
    "The model's predictor kind and settings are re-fitted from scratch on each split's training "
    "part (seed = the split's seed), next to every learned baseline at default settings, and all "
    "are scored on the same held-out queries; its registered weights, as they are, are scored "
    "separately under 'registered' on every bench query (in-sample if this bench trained them).")

SPLITS = ("random", "category")
TEST_FRACTION = 0.2

PredictorFactory = Callable[[int], Predictor]
"""seed → a fresh, unfitted predictor."""


def log_line(line: str) -> None:
    """Progress output: printed at once, so long runs show where they are."""
    print(line, flush=True)


@dataclass(frozen=True)
class Split:
    label: str          # "seed 3" or "category math"
    seed: int
    train: np.ndarray   # query indices
    test: np.ndarray


@dataclass(frozen=True)
class SplitOutcome:
    split: Split
    results: dict[str, MethodResult]
    summary: dict                    # scoring.summarise() of this split
    fit_seconds: dict[str, float]
    n_test: int                      # evaluable test queries
    n_dropped: int                   # test queries lacking a default arm
    calibration: dict = field(default_factory=dict)  # learned method → cost_calibration()
    adherence: dict = field(default_factory=dict)    # method → budget_adherence() rows
    quality: dict = field(default_factory=dict)      # learned method → quality_calibration()
                                                     # + audc, audc_uncalibrated


def random_splits(n_queries: int, seeds: list[int]) -> list[Split]:
    return [Split(f"seed {seed}", seed, *holdout_indices(n_queries, TEST_FRACTION, seed))
            for seed in seeds]


def category_splits(categories: np.ndarray) -> list[Split]:
    """One split per category: test on it, train on every other."""
    names = sorted(set(categories.tolist()) - {""})
    if len(names) < 2 or (categories == "").any():
        raise R2RayError(
            "--split category needs every query to have a category and at least two categories "
            f"(found {len(names)}{', some queries without one' if (categories == '').any() else ''})"
            "; use --split random")
    return [Split(f"category {name}", 0, np.flatnonzero(categories != name),
                  np.flatnonzero(categories == name)) for name in names]


def make_splits(arrays: BenchArrays, split: str, seeds: list[int]) -> list[Split]:
    if split == "random":
        return random_splits(arrays.n_queries, seeds)
    if split == "category":
        return category_splits(arrays.category)
    raise R2RayError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def evaluate_split(arrays: BenchArrays, catalog: Catalog, split: Split,
                   factories: dict[str, PredictorFactory], lambdas: np.ndarray | None = None,
                   log: Callable[[str], None] = log_line) -> SplitOutcome:
    """Fit every learned method on the split's training part; score all methods on its test part.

    Replay or full information is decided on the whole bench (:func:`is_sampled`), not on the
    split's test part: near the threshold a test part could fall either side, and the splits'
    means would mix two estimators over different queries."""
    replay = is_sampled(arrays, catalog)
    train = arrays.subset(split.train)
    test = arrays.subset(split.test)
    keep = evaluable_queries(test, catalog, replay)
    test = test.subset(keep)
    if test.n_queries == 0:
        raise R2RayError(f"{split.label}: no test query has every default arm in the bench")
    fitted, seconds = fit_methods(train, catalog, split.seed, factories, split.label, log)
    predictions = {name: p.predict(test.embedding) for name, p in fitted.items()}
    simulations = {name: getattr(p, "spend_simulation_", None) for name, p in fitted.items()}
    results = evaluate_methods(test, catalog, predictions, lambdas, replay)
    arm_names = [f"{a.model}@{a.budget_tokens or 'default'}" for a in catalog.arms]
    calibration = {name: cost_calibration(p.cost_usd(catalog, test.input_tokens), test.cost_usd,
                                          arm_names) for name, p in predictions.items()}
    summary = summarise(results, normalise_over=reference_methods(results, predictions))
    return SplitOutcome(split, results, summary, seconds, test.n_queries,
                        len(split.test) - len(keep), calibration,
                        method_adherence(test, catalog, predictions, results, replay,
                                         simulations),
                        quality_outcomes(fitted, predictions, results, summary, test, catalog,
                                         lambdas, replay))


def fit_methods(train: BenchArrays, catalog: Catalog, seed: int,
                factories: dict[str, PredictorFactory], label: str,
                log: Callable[[str], None] = log_line) -> tuple[dict[str, Predictor],
                                                                dict[str, float]]:
    """Every learned method fitted on ``train``: (fitted predictors, fit seconds)."""
    fitted, seconds = {}, {}
    for name, factory in factories.items():
        start = time.perf_counter()
        fitted[name] = factory(seed).fit(train, catalog)
        seconds[name] = time.perf_counter() - start
        log(f"  {label}: {name} fitted in {seconds[name]:.1f} s")
    return fitted, seconds


def quality_outcomes(fitted: dict[str, Predictor], predictions: dict[str, ArmPredictions],
                     results: dict[str, MethodResult], summary: dict, test: BenchArrays,
                     catalog: Catalog, lambdas: np.ndarray | None,
                     replay: bool) -> dict[str, dict]:
    """Per learned method: ECE and reliability bins of q̂ with and without the predictor's own
    quality calibration, and AUDC both ways (on this split's cost normalisation; ``replay`` as the
    split was scored). A method replay scored none of the picks of (:func:`evaluate_methods` left
    it out) has none here either."""
    from r2ray.evaluation.metrics import lambda_grid

    bounds = (summary["normalisation"]["cost_min_usd"], summary["normalisation"]["cost_max_usd"])
    out = {}
    for name, predictor in fitted.items():
        if name not in results:
            continue
        if (getattr(predictor, "quality_calibration_", None) is not None
                or not getattr(predictor, "calibrates_quality", True)):   # averaged: members'
            raw = predictor.predict(test.embedding, raw_quality=True).quality
        else:
            raw = predictions[name].quality
        scores = MethodScores(raw.astype(np.float64),
                              predictions[name].cost_usd(catalog, test.input_tokens))
        curve = evaluate_scores(scores, test, lambda_grid() if lambdas is None else lambdas,
                                replay).curve
        out[name] = quality_calibration(predictions[name].quality, raw, test.quality) | {
            "audc": audc(results[name].curve, *bounds), "audc_uncalibrated": audc(curve, *bounds)}
    return out


def method_adherence(test: BenchArrays, catalog: Catalog, predictions: dict[str, ArmPredictions],
                     results: dict[str, MethodResult], replay: bool,
                     simulations: dict[str, SpendSimulation | None] | None = None
                     ) -> dict[str, list[dict]]:
    """Budget adherence of every learned method and ``oracle_all`` (realised = predicted) at
    :func:`budget_levels` of this split, topped by the best single model's spend. A method with a
    spend simulation is also solved under its spend guarantee at ``GUARANTEE`` (the batch job's
    default): ``guaranteed_*`` keys, realised spend and quality of that plan. A sampled bench
    (``replay``) has no adherence: a plan's arms mostly have no realised outcome there."""
    if replay:
        return {}
    best = reference_quality(results)[0].removeprefix(SINGLE_PREFIX)
    budgets = budget_levels(test.cost_usd, catalog.arm_of(best, DEFAULT_BUDGET)) * test.n_queries
    scores = {name: scores_from_predictions(p, catalog, test.input_tokens)
              for name, p in predictions.items()}
    scores[ORACLE_ALL] = oracle(test, np.ones(catalog.n_arms, dtype=bool))
    rows = {name: solve_and_bill(s.quality, s.cost_usd, test.quality, test.cost_usd, budgets)
            for name, s in scores.items()}
    for name, simulation in (simulations or {}).items():
        if simulation is None:
            continue
        bills = guaranteed_bills(scores[name].quality, scores[name].cost_usd, test.quality,
                                 test.cost_usd, budgets, GUARANTEE, simulation)
        for row, budget, (_, bill) in zip(rows[name], budgets, bills):
            row["guaranteed_realised_spend_ratio"] = bill["realised_usd"] / budget
            row["guaranteed_realised_quality"] = bill["realised_quality"]
    return rows


def evaluate_fitted(predictor: Predictor, arrays: BenchArrays, catalog: Catalog,
                    name: str = "registered", lambdas: np.ndarray | None = None) -> dict:
    """Score an already fitted predictor on every evaluable query (no re-fit), with the baselines."""
    test = arrays.subset(evaluable_queries(arrays, catalog))
    predictions = {name: predictor.predict(test.embedding)}
    results = evaluate_methods(test, catalog, predictions, lambdas)
    summary = summarise(results, normalise_over=reference_methods(results, predictions))
    return {"n_queries": test.n_queries, **summary}


def aggregate_methods(outcomes: list[SplitOutcome]) -> dict[str, dict]:
    """Per method: every metric as the mean over splits plus ``<metric>_std``, and ``n_splits``,
    the splits it was scored in (replay skips a method none of whose picks a split's sample holds)."""
    names = list(dict.fromkeys(n for o in outcomes for n in o.summary["methods"]))
    out = {}
    for name in names:
        per_split = [o.summary["methods"][name] for o in outcomes if name in o.summary["methods"]]
        out[name] = aggregate_metrics(per_split) | {"n_splits": len(per_split)}
    return out


def aggregate_metrics(per_split: list[dict]) -> dict:
    """Mean and sample std per key; nested dicts (cost ratios per baseline) per inner key.

    A value missing (None: quality never reached) in any split makes the mean None; an ``inf``
    makes it ``inf``; the std is None unless every value is finite and there are 2+ splits.
    A baseline absent from a split's nested dict (replay skipped it there) is averaged over the
    splits that scored it.
    """
    out: dict = {}
    for key, first in per_split[0].items():
        if isinstance(first, dict):
            baselines = dict.fromkeys(b for m in per_split for b in m[key])
            inner = {b: _mean_std([m[key][b] for m in per_split if b in m[key]])
                     for b in baselines}
            out[key] = {b: v[0] for b, v in inner.items()}
            out[f"{key}_std"] = {b: v[1] for b, v in inner.items()}
        else:
            out[key], out[f"{key}_std"] = _mean_std([m[key] for m in per_split])
    return out


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    array = np.asarray(values, dtype=float)
    if not np.isfinite(array).all():
        return float(array.mean()), None
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return float(array.mean()), std
