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
