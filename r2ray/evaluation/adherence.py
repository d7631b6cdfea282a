"""Budget adherence: route the test split under one global budget, then read the bill. Pure.

The λ sweep shows what a method could buy; it never holds a budget. Here each budget is solved
exactly on the method's predictions (``hull_steps`` + ``solve_budget``, float64 USD), and the
chosen arms are priced with the bench's realised costs: ``realised_spend / budget`` above 1 is
an overspend the solver could not see. Arms the bench has no outcome for are never chosen.

Levels (:func:`budget_levels`): per-query budgets spaced geometrically from the cheapest-arm
spend (every query on its cheapest realised arm) to the best single model's spend, at
``LEVEL_FRACTIONS`` of that span in log10 USD; the same for every method on a split.
"""

from __future__ import annotations

import numpy as np

from r2ray.solver import InfeasibleBudget, hull_steps, solve_budget

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


def budget_adherence(pred_quality: np.ndarray, pred_cost: np.ndarray,
                     realised_quality: np.ndarray, realised_cost: np.ndarray,
                     budgets_usd) -> list[dict]:
    """One row per total budget (USD over the N queries), solved exactly on the predictions.

    All arrays are [N, K]; NaN marks an arm the method cannot use (predictions) or the bench
    lacks (realised). Row: ``budget_usd``, ``budget_usd_per_query``, ``predicted_spend_ratio``
    and ``realised_spend_ratio`` (Σ ĉ ÷ budget and Σ realised cost ÷ budget of the chosen arms),
    ``predicted_quality`` and ``realised_quality`` (means per query) and ``feasible``: False when
    the budget is below the method's own cheapest plan, which then routes every query to its
    cheapest predicted arm.
    """
    present = np.isfinite(realised_quality) & np.isfinite(realised_cost)
    q = np.where(present, pred_quality, np.nan).astype(np.float64)
    c = np.where(present, pred_cost, np.nan).astype(np.float64)
    steps = hull_steps(q, c)
    rows, n = np.arange(q.shape[0]), q.shape[0]
    out = []
    for budget in np.asarray(budgets_usd, dtype=np.float64):
        try:
            arm, feasible = solve_budget(steps, float(budget)).arm, True
        except InfeasibleBudget:
            arm, feasible = steps.base_arm, False
        if (arm < 0).any():
            raise ValueError(f"query {int(np.argmax(arm < 0))} has no arm the method can use "
                             "that the bench has")
        out.append({"budget_usd": float(budget), "budget_usd_per_query": float(budget) / n,
                    "predicted_spend_ratio": float(c[rows, arm].sum()) / budget,
                    "realised_spend_ratio": float(realised_cost[rows, arm].sum()) / budget,
                    "predicted_quality": float(q[rows, arm].mean()),
                    "realised_quality": float(realised_quality[rows, arm].mean()),
                    "feasible": feasible})
    return out
