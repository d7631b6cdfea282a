"""The spend guarantee: how much to plan so the *realised* bill stays under the budget.

The solver is exact about the costs it is given, but it picks argmax(q̂ − λĉ): among arms of
similar value it prefers those whose cost is underestimated, so even unbiased ĉ overspend once
selected, and the bill is a sum of noisy costs besides. Both effects are measured, not assumed:
at fit time the predictor's held-out (cross-fitted) predictions are routed by the exact solve at a
grid of spend levels and the chosen arms are priced with the bench's realised costs
(:func:`simulate_spend`). Per level that gives

- ρ = Σ realised ÷ Σ planned (the selection and calibration bias of a whole plan), and
- cv = std over queries of (realised − ρ · planned) ÷ mean planned (the noise of one query).

For a backlog of N queries planned at spend P, realised − ρP has a spread of about cv·P/√N (the
backlog's own noise), and ρ itself is off by about cv/√n (estimated on n held-out queries: an
error that a fixed model carries into *every* backlog it routes). Planning at P = B ÷ κ with
κ = max(1, ρ + z_p · cv · (1/√N + 1/√n)) (z_p the standard normal p-quantile; the two errors
added, not in quadrature) keeps realised ≤ B with probability about p for a fixed model, on all
but a 1 − p share of the models its bench could have given (:meth:`SpendSimulation.inflation`;
never above the budget: κ ≥ 1). ρ and cv are interpolated in log spend per query; the held-out
models saw less data than the final one. It cannot see a backlog unlike the bench it was fitted
on: reconcile real bills (``r2ray reconcile``) for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from r2ray.solver import InfeasibleBudget, hull_steps, solve_budget

DEFAULT_GUARANTEE = 0.95  # P(realised ≤ budget) the batch job plans for unless told otherwise
N_LEVELS = 16           # simulated spend levels, geometric from the cheapest plan to λ = 0
MIN_QUERIES = 50        # fewer held-out queries than this: no simulation (no guarantee)
METHOD = ("cross-fitted simulation of the exact solve on the model's held-out bench rows (n "
          "queries): planned = budget ÷ max(1, ρ + z_p · cv · (1/√N + 1/√n)), ρ = realised ÷ "
          "planned and cv its per-query spread at this spend, N the backlog's queries")


def solve_and_bill(pred_quality: np.ndarray, pred_cost: np.ndarray,
                   realised_quality: np.ndarray, realised_cost: np.ndarray,
                   budgets_usd) -> list[dict]:
    """Route N queries exactly on predictions at each total budget (USD), then read the bill.

    All arrays are [N, K]; NaN marks an arm the predictions cannot use or the bench lacks (never
    chosen). Row per budget: ``budget_usd``, ``budget_usd_per_query``, ``predicted_spend_ratio``
    and ``realised_spend_ratio`` (Σ ĉ ÷ budget and Σ realised cost ÷ budget of the chosen arms),
    ``predicted_quality`` and ``realised_quality`` (means per query), ``planned_usd`` and
    ``realised_usd`` (float64 sums), ``cv`` (see the module) and ``feasible``: False when the
    budget is below the cheapest plan, which then routes every query to its cheapest arm.
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
        planned, realised = c[rows, arm], realised_cost[rows, arm].astype(np.float64)
        planned_usd = float(planned.sum(dtype=np.float64))
        realised_usd = float(realised.sum(dtype=np.float64))
        ratio = realised_usd / planned_usd if planned_usd > 0 else 1.0
        out.append({"budget_usd": float(budget), "budget_usd_per_query": float(budget) / n,
                    "planned_usd": planned_usd, "realised_usd": realised_usd,
                    "predicted_spend_ratio": planned_usd / budget,
                    "realised_spend_ratio": realised_usd / budget,
                    "predicted_quality": float(q[rows, arm].mean()),
                    "realised_quality": float(realised_quality[rows, arm].mean()),
                    "cv": float(np.std(realised - ratio * planned) / max(planned.mean(), 1e-300)),
                    "feasible": feasible})
    return out


@dataclass(frozen=True)
class SpendSimulation:
    """What routing held-out queries did to the bill, per simulated spend level (see module)."""

    spend_per_query_usd: np.ndarray  # [L] planned USD per query of each simulated solve, rising
    ratio: np.ndarray                # [L] ρ: Σ realised ÷ Σ planned of the chosen arms
    cv: np.ndarray                   # [L] per-query noise of realised − ρ·planned ÷ mean planned
    quality: np.ndarray              # [L] mean realised quality of the chosen arms
    n_queries: int                   # held-out queries the simulation rests on

    def at(self, spend_per_query_usd: float) -> tuple[float, float]:
        """(ρ, cv) at a planned spend per query (USD), interpolated in log spend, clamped."""
        x = math.log(max(spend_per_query_usd, 1e-300))
        grid = np.log(self.spend_per_query_usd)
        return float(np.interp(x, grid, self.ratio)), float(np.interp(x, grid, self.cv))

    def inflation(self, spend_per_query_usd: float, n_backlog: int, probability: float) -> float:
        """κ ≥ 1: plan budget ÷ κ so that realised ≤ budget with about ``probability``."""
        ratio, cv = self.at(spend_per_query_usd)
        z = NormalDist().inv_cdf(probability)
        spread = 1.0 / math.sqrt(max(n_backlog, 1)) + 1.0 / math.sqrt(self.n_queries)
        return max(1.0, ratio + z * cv * spread)

    def to_json(self) -> dict:
        return {"spend_per_query_usd": self.spend_per_query_usd.tolist(),
                "ratio": self.ratio.tolist(), "cv": self.cv.tolist(),
                "quality": self.quality.tolist(), "n_queries": self.n_queries}

    @classmethod
    def from_json(cls, document: dict) -> SpendSimulation:
        arrays = (np.asarray(document[n], dtype=np.float64)
                  for n in ("spend_per_query_usd", "ratio", "cv", "quality"))
        return cls(*arrays, int(document["n_queries"]))


def simulate_spend(pred_quality: np.ndarray, pred_cost: np.ndarray,
                   realised_quality: np.ndarray, realised_cost: np.ndarray,
                   n_levels: int = N_LEVELS) -> SpendSimulation | None:
    """The simulation on held-out predictions [M, K] (uncalibrated by any fit on these rows) and
    the bench's realised outcomes [M, K]; None when fewer than ``MIN_QUERIES`` queries have an arm
    both sides know. Levels run geometrically from the cheapest plan to the spend at λ = 0."""
    present = (np.isfinite(realised_quality) & np.isfinite(realised_cost)
               & np.isfinite(pred_quality) & np.isfinite(pred_cost))
    usable = present.any(axis=1)
    if usable.sum() < MIN_QUERIES:
        return None
    q = np.where(present, pred_quality, np.nan)[usable]
    c = np.where(present, pred_cost, np.nan)[usable]
    low = float(np.nanmin(c, axis=1).sum(dtype=np.float64))
    best = np.nanargmax(np.where(np.isfinite(q), q, -np.inf), axis=1)
    high = max(float(c[np.arange(len(c)), best].sum(dtype=np.float64)), low * 1.01)
    budgets = low * 1.001 * (high / (low * 1.001)) ** np.linspace(0.0, 1.0, n_levels)
    rows = solve_and_bill(q, c, realised_quality[usable], realised_cost[usable], budgets)
    m = int(usable.sum())
    spend = np.array([r["planned_usd"] / m for r in rows])
    keep = np.concatenate([[True], np.diff(spend) > 0])  # plans stop changing past λ = 0
    column = lambda name: np.array([r[name] for r in rows])[keep]  # noqa: E731
    return SpendSimulation(spend[keep], column("realised_usd") / column("planned_usd"),
                           column("cv"), column("realised_quality"), m)


@dataclass(frozen=True)
class SpendPlan:
    """How much of a budget to plan, and why (USD; for the manifest)."""

    budget_usd: float
    planned_limit_usd: float   # the budget the solver is given: budget ÷ inflation
    inflation: float           # κ ≥ 1
    probability: float         # the guarantee asked for; 0 = none
    expected_ratio: float      # ρ at the planned spend: expected realised ÷ planned
    method: str

    def to_json(self) -> dict:
        return {"budget_usd": self.budget_usd, "planned_limit_usd": self.planned_limit_usd,
                "inflation": self.inflation, "probability": self.probability,
                "expected_realised_over_planned": self.expected_ratio, "method": self.method}


def plan_budget(budget_usd: float, n_queries: int, probability: float,
                simulation: SpendSimulation | None, *, strict: bool = False) -> SpendPlan:
    """The limit to solve under so that realised spend ≤ ``budget_usd`` with ``probability``.

    ``probability`` 0 plans the whole budget on predicted costs (no guarantee); ``strict`` (every
    arm priced at its cap) already bounds the bill with certainty, so it plans the whole budget
    too. κ depends on the spend per query it is looked up at, which depends on κ: a few fixed-point
    steps from the whole budget settle it (ρ and cv change slowly with spend)."""
    if strict:
        return SpendPlan(budget_usd, budget_usd, 1.0, 1.0, 1.0,
                         "strict budget: every arm priced at its max_tokens cap, Σ ≤ budget")
    if probability <= 0:
        return SpendPlan(budget_usd, budget_usd, 1.0, 0.0, float("nan"),
                         "none: planned on predicted costs (--spend-guarantee 0)")
    if simulation is None:
        raise ValueError("the model carries no spend simulation")
    n = max(n_queries, 1)
    inflation = 1.0
    for _ in range(4):
        inflation = simulation.inflation(budget_usd / inflation / n, n, probability)
    ratio, _ = simulation.at(budget_usd / inflation / n)
    return SpendPlan(budget_usd, budget_usd / inflation, inflation, probability, ratio, METHOD)
