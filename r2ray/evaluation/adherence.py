"""Budget adherence: route the test split under one global budget, then read the bill. Pure.

The λ sweep shows what a method could buy; it never holds a budget. Here each budget is solved
exactly on the method's predictions and the chosen arms are priced with the bench's realised
costs (``budget_adherence``, which is the spend guarantee's own
:func:`r2ray.predictor.spend_guarantee.solve_and_bill`): ``realised_spend / budget`` above 1 is an
overspend the solver could not see. Arms the bench has no outcome for are never chosen.

Levels (:func:`budget_levels`): per-query budgets spaced geometrically from the cheapest-arm
spend (every query on its cheapest realised arm) to the best single model's spend, at
``LEVEL_FRACTIONS`` of that span in log10 USD (linearly from 0 USD when the cheapest arms are
free); the same for every method on a split.
"""

from __future__ import annotations

import numpy as np

from r2ray.predictor.spend_guarantee import solve_and_bill as budget_adherence

__all__ = ["LEVEL_FRACTIONS", "budget_adherence", "budget_levels", "guarantee_on_splits",
           "guarantee_sweep"]

LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""Level positions in log USD: 0 = the cheapest-arm spend, 1 = the best single model's."""


def budget_levels(realised_cost: np.ndarray, best_arm: int,
                  fractions: tuple[float, ...] = LEVEL_FRACTIONS) -> np.ndarray:
    """Per-query budgets (USD) [L]: mean cheapest realised arm × (best model's mean ÷ it)^f.

    ``realised_cost`` [N, K] USD (NaN: no outcome); ``best_arm`` is the best single model's
    default arm, whose cost every query has. A catalogue may price a model at 0 (a local one):
    when every query's cheapest arm is free, no geometric scale starts at 0 USD, and the levels
    are ``f`` × the best model's mean instead (linear from 0).
    """
    low = float(np.nanmin(realised_cost, axis=1).mean())
    high = max(float(realised_cost[:, best_arm].mean()), low)
    fractions = np.asarray(fractions, dtype=np.float64)
    if low == 0.0:
        return high * fractions
    return low * (high / low) ** fractions


def guarantee_sweep(predictor, catalog, seeds, n_queries: int, budgets_per_query,
                    probabilities) -> dict[float, np.ndarray]:
    """Fresh synthetic-world backlogs routed as the batch job routes them, billed at the world's
    realised outcomes: per spend-guarantee probability, an array [seeds, budgets, 3] of realised
    spend ÷ budget, realised mean quality and κ. In memory (``arm_scores`` →
    :func:`~r2ray.predictor.spend_guarantee.guaranteed_bills`); the seeds are world seeds the
    predictor was not trained on."""
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.predictor.data import bench_arrays
    from r2ray.predictor.spend_guarantee import guaranteed_bills
    from r2ray.routing import arm_scores

    seeds, budgets = list(seeds), np.asarray(budgets_per_query, dtype=np.float64) * n_queries
    out = {float(p): np.zeros((len(seeds), len(budgets), 3)) for p in probabilities}
    for i, seed in enumerate(seeds):
        backlog = bench_arrays(synth_bench(catalog, n_queries, seed=seed), catalog,
                               synth_backlog(catalog, n_queries, seed=seed, embeddings=True))
        p = predictor.predict(backlog.embedding)
        scores = arm_scores(p.quality, p.output_tokens, catalog, backlog.input_tokens)
        for probability, table in out.items():
            bills = guaranteed_bills(scores.quality, scores.cost_usd, backlog.quality,
                                     backlog.cost_usd, budgets, probability,
                                     predictor.spend_simulation_)
            table[i] = [(r["realised_usd"] / b, r["realised_quality"], plan.inflation)
                        for (plan, r), b in zip(bills, budgets)]
    return out


def guarantee_on_splits(arrays, catalog, make_predictor, seeds, fractions, probabilities,
                        test_fraction: float = 0.2) -> dict[float, np.ndarray]:
    """The spend guarantee on a real bench: per seed, ``make_predictor()`` fitted on a seeded
    ``1 − test_fraction`` of the queries, the rest routed as one backlog as the batch job routes
    it (``guaranteed_bills``) at :func:`budget_levels` ``fractions`` of that split
    (the top: the default arm of the model with the best mean quality there) and billed at the
    bench's recorded costs. Per probability an array [seeds, levels, 4]:
    realised spend ÷ budget, realised mean quality, κ, and the planned spend ÷ budget without
    the guarantee (below 1: the budget does not bind, every query already has its best arm)."""
    from r2ray.catalog import DEFAULT_BUDGET
    from r2ray.evaluation.method_scores import evaluable_queries
    from r2ray.predictor.data import holdout_indices
    from r2ray.predictor.spend_guarantee import guaranteed_bills
    from r2ray.routing import arm_scores

    seeds = list(seeds)
    out = {float(p): np.zeros((len(seeds), len(fractions), 4)) for p in probabilities}
    for i, seed in enumerate(seeds):
        train_rows, test_rows = holdout_indices(arrays.n_queries, test_fraction, seed)
        train, test = arrays.subset(train_rows), arrays.subset(test_rows)
        test = test.subset(evaluable_queries(test, catalog))
        predictor = make_predictor().fit(train, catalog)
        best = catalog.arm_of(catalog.models[int(np.argmax(
            [np.nanmean(test.quality[:, catalog.arm_of(m.name, DEFAULT_BUDGET)])
             for m in catalog.models]))].name, DEFAULT_BUDGET)
        budgets = budget_levels(test.cost_usd, best, tuple(fractions)) * test.n_queries
        p = predictor.predict(test.embedding)
        scores = arm_scores(p.quality, p.output_tokens, catalog, test.input_tokens)
        bills = {probability: guaranteed_bills(scores.quality, scores.cost_usd, test.quality,
                                               test.cost_usd, budgets, probability,
                                               predictor.spend_simulation_)
                 for probability in {*out, 0.0}}      # 0: the plan without the guarantee
        for probability, table in out.items():
            table[i] = [(r["realised_usd"] / b, r["realised_quality"], plan.inflation,
                         free["predicted_spend_ratio"])
                        for (plan, r), b, (_, free) in zip(bills[probability], budgets,
                                                           bills[0.0])]
    return out
