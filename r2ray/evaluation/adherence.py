"""Budget adherence: route the test split under one global budget, then read the bill. Pure.

The λ sweep shows what a method could buy; it never holds a budget. Here each budget is solved
exactly on the method's predictions and the chosen arms are priced with the bench's realised
costs (``budget_adherence``, which is the spend guarantee's own
:func:`r2ray.predictor.spend_guarantee.solve_and_bill`): ``realised_spend / budget`` above 1 is an
overspend the solver could not see. Arms the bench has no outcome for are never chosen.

Levels (:func:`budget_levels`): per-query budgets spaced geometrically from the cheapest-arm
spend (every query on its cheapest realised arm) to the best single model's spend, at
``LEVEL_FRACTIONS`` of that span in log10 USD; the same for every method on a split.
"""

from __future__ import annotations

import numpy as np

from r2ray.predictor.spend_guarantee import solve_and_bill as budget_adherence  # noqa: F401

LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""Level positions in log USD: 0 = the cheapest-arm spend, 1 = the best single model's."""


def budget_levels(realised_cost: np.ndarray, best_arm: int,
                  fractions: tuple[float, ...] = LEVEL_FRACTIONS) -> np.ndarray:
    """Per-query budgets (USD) [L]: mean cheapest realised arm × (best model's mean ÷ it)^f.

    ``realised_cost`` [N, K] USD (NaN: no outcome); ``best_arm`` is the best single model's
    default arm, whose cost every query has.
    """
    low = float(np.nanmin(realised_cost, axis=1).mean())
    high = max(float(realised_cost[:, best_arm].mean()), low)
    return low * (high / low) ** np.asarray(fractions, dtype=np.float64)


def guarantee_sweep(predictor, catalog, seeds, n_queries: int, budgets_per_query,
                    probabilities) -> dict[float, np.ndarray]:
    """Fresh synthetic-world backlogs routed as the batch job routes them, billed at the world's
    realised outcomes: per spend-guarantee probability, an array [seeds, budgets, 3] of realised
    spend ÷ budget, realised mean quality and κ. In memory (``arm_scores`` → ``plan_budget`` →
    the exact solve); the seeds are world seeds the predictor was not trained on."""
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.predictor.data import bench_arrays
    from r2ray.predictor.spend_guarantee import plan_budget, solve_and_bill
    from r2ray.routing import arm_scores

    seeds, budgets = list(seeds), np.asarray(budgets_per_query, dtype=np.float64) * n_queries
    out = {float(p): np.zeros((len(seeds), len(budgets), 3)) for p in probabilities}
    for i, seed in enumerate(seeds):
        backlog = bench_arrays(synth_bench(catalog, n_queries, seed=seed), catalog,
                               synth_backlog(catalog, n_queries, seed=seed, embeddings=True))
        p = predictor.predict(backlog.embedding)
        scores = arm_scores(p.quality, p.output_tokens, catalog, backlog.input_tokens)
        for probability, table in out.items():
            plans = [plan_budget(b, n_queries, probability, predictor.spend_simulation_)
                     for b in budgets]
            rows = solve_and_bill(scores.quality, scores.cost_usd, backlog.quality,
                                  backlog.cost_usd, [plan.planned_limit_usd for plan in plans])
            table[i] = [(r["realised_usd"] / b, r["realised_quality"], plan.inflation)
                        for r, b, plan in zip(rows, budgets, plans)]
    return out
