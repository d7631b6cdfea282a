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
κ = max(1, ρ) + z_p · cv · (1/√N + 1/√n) (z_p the standard normal p-quantile; the two errors
added, not in quadrature) keeps realised ≤ B with probability about p for a fixed model, on all
but a 1 − p share of the models its bench could have given (:meth:`SpendSimulation.inflation`;
never above the budget: κ ≥ 1). The held-out models saw less data than the final one.

ρ and cv are looked up by where the plan sits in its backlog's own span (:class:`BacklogSpan`):
position = log(planned ÷ cheapest) ÷ log(top ÷ cheapest), 0 with every query on its cheapest
hull arm, 1 with every query on its best (λ = 0), because that, not the spend per query, sets how
hard the solve selects: a backlog of longer prompts has a dearer cheapest plan, so the same spend
per query buys fewer upgrades there. Measured over random 80/20 splits of RouterArena (binding
backlogs over budget, by position against by spend per query): 14 of 320 against 30 on the
splits the idea came from, 13 of 320 against 10 on fresh ones, 26 of 320 against 32 on its small
copy: about the same coverage, with +0.003 realised quality, both with four fixed-point steps
for κ. With κ solved exactly (:func:`plan_budget`) as well, ``benchmarks/spend_guarantee.py
--bench`` went over budget on 19 of 922 binding backlogs of four real benches, against 70 before
both changes, and gave up more quality for it (``docs/design.md``, Known gaps).
A simulation saved before positions were recorded, or a plan without its backlog's span, is
looked up in log spend per query. It cannot see a backlog unlike the bench it was fitted on:
reconcile real bills (``r2ray reconcile``) for that.
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
KAPPA_STEP = 1.01        # the ladder plan_budget climbs to the least κ its rule accepts
_METHOD = ("cross-fitted simulation of the exact solve on the model's held-out bench rows (n "
           "queries): planned = budget ÷ (max(1, ρ) + z_p · cv · (1/√N + 1/√n)), ρ = realised ÷ "
           "planned and cv its per-query spread at the plan's {where}, N the backlog's queries")
METHOD = _METHOD.format(where="position between the backlog's cheapest and best plans")
SPEND_METHOD = _METHOD.format(where="spend per query")


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
class BacklogSpan:
    """What a backlog's plans can spend on its predicted costs (USD, float64 sums): every query
    on its cheapest hull arm (the least any plan spends) and every query on its best (λ = 0)."""

    cheapest_usd: float
    top_usd: float

    def position(self, planned_usd: float) -> float | None:
        """Where a plan of ``planned_usd`` sits: 0 at the cheapest plan, 1 at the top, in log
        spend (clamped); 1 when the span is empty (every plan is the top); None when the
        cheapest plan is free (no log scale: look up by spend per query instead)."""
        if self.cheapest_usd <= 0:
            return None
        if not self.top_usd > self.cheapest_usd * (1 + 1e-12):
            return 1.0
        x = math.log(max(planned_usd, self.cheapest_usd) / self.cheapest_usd)
        return min(1.0, x / math.log(self.top_usd / self.cheapest_usd))

    def __add__(self, other: BacklogSpan) -> BacklogSpan:
        return BacklogSpan(self.cheapest_usd + other.cheapest_usd, self.top_usd + other.top_usd)


def span_of_steps(steps) -> BacklogSpan:
    """The span of queries' hull chains (:class:`r2ray.solver.HullSteps`, or a step table's
    chains): Σ base cost, and Σ base cost + every step's added cost."""
    cheapest = float(np.sum(steps.base_c, dtype=np.float64))
    return BacklogSpan(cheapest, cheapest + float(np.sum(steps.dc, dtype=np.float64)))


def backlog_span(pred_quality: np.ndarray, pred_cost: np.ndarray,
                 present: np.ndarray | None = None) -> BacklogSpan:
    """The span of a backlog's predictions [N, K] (NaN, or False in ``present``: an arm the plan
    cannot use)."""
    if present is not None:
        pred_quality, pred_cost = (np.where(present, a, np.nan) for a in (pred_quality, pred_cost))
    return span_of_steps(hull_steps(pred_quality, pred_cost))


@dataclass(frozen=True)
class SpendSimulation:
    """What routing held-out queries did to the bill, per simulated spend level (see module)."""

    spend_per_query_usd: np.ndarray  # [L] planned USD per query of each simulated solve, rising
    ratio: np.ndarray                # [L] ρ: Σ realised ÷ Σ planned of the chosen arms
    cv: np.ndarray                   # [L] per-query noise of realised − ρ·planned ÷ mean planned
    quality: np.ndarray              # [L] mean realised quality of the chosen arms
    n_queries: int                   # held-out queries the simulation rests on
    position: np.ndarray | None = None  # [L] each level's place in the held-out span (None:
                                        # saved before positions were recorded)

    def at(self, spend_per_query_usd: float, position: float | None = None
           ) -> tuple[float, float]:
        """(ρ, cv) at a plan's ``position`` in its backlog's span when both sides have one, else
        at its spend per query (USD) in log spend; interpolated, clamped to the levels."""
        if position is not None and self.position is not None:
            x, grid = position, self.position
        else:
            x, grid = math.log(max(spend_per_query_usd, 1e-300)), np.log(self.spend_per_query_usd)
        return float(np.interp(x, grid, self.ratio)), float(np.interp(x, grid, self.cv))

    def _margin(self, n_backlog: int, probability: float) -> float:
        """z_p · (1/√N + 1/√n): κ is max(1, ρ) + cv × this."""
        spread = 1.0 / math.sqrt(max(n_backlog, 1)) + 1.0 / math.sqrt(self.n_queries)
        return NormalDist().inv_cdf(probability) * spread

    def inflation(self, spend_per_query_usd: float, n_backlog: int, probability: float,
                  position: float | None = None) -> float:
        """κ ≥ 1: plan budget ÷ κ so that realised ≤ budget with about ``probability``. A
        simulated ρ below 1 counts as 1: with t̂ calibrated to the mean, selection can only make
        the chosen arms dearer than planned, so a lower ρ is the simulation's noise, not credit
        (ParetoBandit, `averaged`, budget levels binding on every split: 5 of 40 backlogs over
        budget with the credit, 2 without it on the splits where this was found; 1 either way
        on 10 fresh ones; ``docs/design.md``)."""
        ratio, cv = self.at(spend_per_query_usd, position)   # below p = 0.5 the margin is < 0,
        return max(1.0, max(1.0, ratio) + cv * self._margin(n_backlog, probability))  # κ ≥ 1

    def check(self) -> None:
        """Refuse a simulation no κ can be read from (a corrupt or hand-edited ``predictor.json``):
        no levels, levels of unequal lengths, NaN/inf, or no held-out queries. ValueError."""
        levels = (self.spend_per_query_usd, self.ratio, self.cv,
                  *(() if self.position is None else (self.position,)))
        if len({len(a) for a in levels}) != 1 or len(self.ratio) == 0:
            raise ValueError(f"the model's spend simulation has {[len(a) for a in levels]} "
                             "spend levels, ρ, cv (and positions): it needs the same number "
                             "(at least one) of each: refit it, or plan with --spend-guarantee 0")
        if not all(np.isfinite(a).all() for a in levels):
            raise ValueError("the model's spend simulation holds NaN/inf (ρ, cv, spend levels or "
                             "positions): refit it, or plan with --spend-guarantee 0")
        if self.n_queries < 1:
            raise ValueError(f"the model's spend simulation rests on {self.n_queries} held-out "
                             "queries: refit it, or plan with --spend-guarantee 0")

    def to_json(self) -> dict:
        document = {"spend_per_query_usd": self.spend_per_query_usd.tolist(),
                    "ratio": self.ratio.tolist(), "cv": self.cv.tolist(),
                    "quality": self.quality.tolist(), "n_queries": self.n_queries}
        if self.position is not None:
            document["position"] = self.position.tolist()
        return document

    @classmethod
    def from_json(cls, document: dict) -> SpendSimulation:
        arrays = (np.asarray(document[n], dtype=np.float64)
                  for n in ("spend_per_query_usd", "ratio", "cv", "quality"))
        position = document.get("position")   # absent in simulations saved before it
        return cls(*arrays, int(document["n_queries"]),
                   None if position is None else np.asarray(position, dtype=np.float64))


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
    span = backlog_span(q, c)
    if span.top_usd <= 0:        # every arm it would choose is free: nothing to guarantee
        return None
    high = max(span.top_usd, span.cheapest_usd * 1.01)
    low = span.cheapest_usd * 1.001 if span.cheapest_usd > 0 else high * 1e-4   # free arms
    budgets = low * (high / low) ** np.linspace(0.0, 1.0, n_levels)
    rows = solve_and_bill(q, c, realised_quality[usable], realised_cost[usable], budgets)
    m = int(usable.sum())
    spend = np.array([r["planned_usd"] / m for r in rows])
    keep = np.concatenate([[True], np.diff(spend) > 0])  # plans stop changing past λ = 0
    keep &= spend > 0                                    # a free plan has no ratio
    column = lambda name: np.array([r[name] for r in rows])[keep]  # noqa: E731
    position = [span.position(r["planned_usd"]) for r in rows]
    position = (None if None in position       # a free cheapest plan: by spend per query
                else np.maximum.accumulate(np.array(position)[keep]))
    return SpendSimulation(spend[keep], column("realised_usd") / column("planned_usd"),
                           column("cv"), column("realised_quality"), m, position)


@dataclass(frozen=True)
class SpendPlan:
    """How much of a budget to plan, and why (USD; for the manifest)."""

    budget_usd: float
    planned_limit_usd: float   # the budget the solver is given: budget ÷ inflation
    inflation: float           # κ ≥ 1
    probability: float         # the guarantee asked for; 0 = none
    expected_ratio: float      # ρ at the planned spend: expected realised ÷ planned
    method: str
    position: float | None = None  # the plan's place in its backlog's span (None: not looked
                                   # up by position)

    def to_json(self) -> dict:
        return {"budget_usd": self.budget_usd, "planned_limit_usd": self.planned_limit_usd,
                "inflation": self.inflation, "probability": self.probability,
                "expected_realised_over_planned": self.expected_ratio, "method": self.method,
                "position_in_span": self.position}


def plan_budget(budget_usd: float, n_queries: int, probability: float,
                simulation: SpendSimulation | None, *, strict: bool = False,
                span: BacklogSpan | None = None) -> SpendPlan:
    """The limit to solve under so that realised spend ≤ ``budget_usd`` with ``probability``.

    ``probability`` 0 plans the whole budget on predicted costs (no guarantee); ``strict`` (every
    arm priced at its cap) already bounds the bill with certainty, so it plans the whole budget
    too. ``span``: the backlog's (:func:`span_of_steps`), to look κ up by the plan's position in
    it (else by spend per query). κ depends on where it is looked up, which depends on κ: the κ
    returned is the least the rule accepts at its own plan (κ ≥ the κ asked for there) on a
    ladder of ``KAPPA_STEP`` steps up from 1, refined by bisection below it. A budget that is not
    a finite number ≥ 0 (an overflowed budget per query × N), or a ``probability`` outside
    [0, 1), is refused."""
    if not (math.isfinite(budget_usd) and budget_usd >= 0):
        raise ValueError(f"budget must be a finite number of USD ≥ 0; got {budget_usd!r}")
    if not 0 <= probability < 1:   # NaN planned κ 1 (no guarantee), 1 a StatisticsError
        raise ValueError(f"the spend guarantee must be a probability in [0, 1); got "
                         f"{probability!r}")
    if strict:
        return SpendPlan(budget_usd, budget_usd, 1.0, 1.0, 1.0,
                         "strict budget: every arm priced at its max_tokens cap, Σ ≤ budget")
    if probability <= 0:
        return SpendPlan(budget_usd, budget_usd, 1.0, 0.0, float("nan"),
                         "none: planned on predicted costs (--spend-guarantee 0)")
    if simulation is None:
        raise ValueError("the model carries no spend simulation")
    simulation.check()
    n = max(n_queries, 1)
    by_position = span is not None and simulation.position is not None
    where = span.position if by_position else (lambda planned: None)

    def wanted(kappa: float) -> float:
        """The κ the rule asks for at the plan of budget ÷ ``kappa``."""
        planned = budget_usd / kappa
        return simulation.inflation(planned / n, n, probability, where(planned))

    # κ ≥ wanted(κ): wanted is continuous, ≥ 1 and at most the largest level's κ (a finite
    # simulation: check), so the climb ends. It may cross κ more than once (ρ and cv go up and
    # down level to level): a bisection over all of [1, that top] found whichever crossing its
    # midpoints met, so a larger p could plan more. The first rung of one ladder (the same for
    # every p) the rule accepts, then bisection from the rung below, keeps κ non-decreasing in p
    low = high = 1.0
    while wanted(high) > high:
        low, high = high, high * KAPPA_STEP
    while high - low > 1e-12 * high:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if wanted(middle) > middle else (low, middle)
    inflation = high
    position = where(budget_usd / inflation)
    ratio, _ = simulation.at(budget_usd / inflation / n, position)
    return SpendPlan(budget_usd, budget_usd / inflation, inflation, probability, ratio,
                     METHOD if position is not None else SPEND_METHOD, position)


def guaranteed_bills(pred_quality: np.ndarray, pred_cost: np.ndarray,
                     realised_quality: np.ndarray, realised_cost: np.ndarray, budgets_usd,
                     probability: float, simulation: SpendSimulation | None
                     ) -> list[tuple[SpendPlan, dict]]:
    """Each total budget (USD) planned as the batch job plans it (:func:`plan_budget` with the
    backlog's span) and the plan billed (:func:`solve_and_bill`): (plan, bill row) per budget."""
    present = np.isfinite(realised_quality) & np.isfinite(realised_cost)
    span = backlog_span(pred_quality, pred_cost, present)
    n = pred_quality.shape[0]
    plans = [plan_budget(float(b), n, probability, simulation, span=span) for b in budgets_usd]
    rows = solve_and_bill(pred_quality, pred_cost, realised_quality, realised_cost,
                          [plan.planned_limit_usd for plan in plans])
    return list(zip(plans, rows))
