"""Extensions on the same machinery: per-tenant budgets and per-model capacity caps.

Per-tenant budgets separate into one problem per tenant; all tenants share the passes (their
histograms are indexed by tenant) and each gets its own λ* and certificate.

Per-model caps (at most S USD, or at most n queries, on one model) add one price μ per capped
model: arm j of a capped model is valued q̂ - μ·w (w = ĉ for a spend cap, 1 for a count cap)
and the budget is solved exactly at those prices. Prices only rise, each by bisection to the
smallest value that meets its cap, for a few rounds. Every evaluated (λ, μ) gives an upper bound
λB + Σ μ·cap + Σ_i max_j(q̂ - λĉ - μ·w) on the capped optimum; the certificate keeps the least.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.solver.budget import DualCertificate, SolveResult, solve_budget, solve_groups
from r2ray.solver.hull import HullSteps, hull_steps


def solve_tenant_budgets(steps: HullSteps, tenant, budgets_usd, *, seed: int = 0,
                         defer: bool = False, query_key=None, names=None) -> SolveResult:
    """One budget per tenant. tenant: int [N] in [0, T); budgets_usd: [T] USD.

    Returns one certificate per tenant (``result.certificates[t]``)."""
    tenant = np.asarray(tenant)
    budgets = np.atleast_1d(np.asarray(budgets_usd, dtype=np.float64))
    if tenant.shape != (steps.n_queries,) or tenant.dtype.kind not in "iu":
        raise ValueError(f"tenant must be an integer array of shape ({steps.n_queries},)")
    if tenant.size and (tenant.min() < 0 or tenant.max() >= budgets.size):
        raise ValueError(f"tenant ids must lie in [0, {budgets.size}) (one budget per tenant); "
                         f"got [{tenant.min()}, {tenant.max()}]")
    return solve_groups(steps, budgets, group=tenant, seed=seed, defer=defer,
                        query_key=query_key, names=names)


@dataclass(frozen=True)
class ModelCap:
    """A capacity cap on one model: set exactly one of max_spend_usd or max_queries."""

    model: int                       # the model's index in ``arm_model``
    max_spend_usd: float | None = None
    max_queries: int | None = None

    def __post_init__(self):
        if (self.max_spend_usd is None) == (self.max_queries is None):
            raise ValueError(f"ModelCap({self.model}): set exactly one of max_spend_usd, "
                             "max_queries (use two caps for both)")
        if not self.limit >= 0:     # NaN too: no usage passes it, so no price could meet it
            raise ValueError(f"ModelCap({self.model}): the cap must be a number >= 0; "
                             f"got {self.limit}")

    @property
    def limit(self) -> float:
        return float(self.max_queries if self.max_spend_usd is None else self.max_spend_usd)


@dataclass(frozen=True)
class CapCertificate:
    """What a capped solve proved (quality in q̂ units, money in USD)."""

    budget: DualCertificate          # the budget solve at the final prices (on q̂ - μ·w)
    prices: tuple[float, ...]        # μ per cap: quality per USD (spend) or per query (count)
    usage: tuple[float, ...]         # USD or queries used per cap
    limits: tuple[float, ...]
    objective: float                 # Σ q̂ of the chosen arms
    spend_usd: float
    upper_bound: float               # least Lagrangian bound over the prices tried
    gap: float
    n_solves: int


@dataclass(frozen=True)
class CappedSolveResult:
    arm: np.ndarray                  # int32 [N]
    certificate: CapCertificate


@dataclass(frozen=True)
class _Trial:
    prices: np.ndarray
    result: SolveResult
    usage: np.ndarray
    objective: float
    spend: float
    bound: float


class _CappedProblem:
    """q̂, ĉ and the caps; evaluates the exact budget solve at given prices."""

    def __init__(self, q, c, arm_model, budget_usd, caps, seed, defer):
        self.q, self.c = np.asarray(q, np.float64), np.asarray(c, np.float64)
        arm_model = np.asarray(arm_model)
        if arm_model.shape != (self.q.shape[1],):
            raise ValueError("arm_model must give a model index per arm: "
                             f"shape ({self.q.shape[1]},)")
        for cap in caps:
            if not (arm_model == cap.model).any():
                raise ValueError(f"ModelCap({cap.model}): no arm of that model in arm_model")
        self.models = [cap.model for cap in caps]
        self.masks = [arm_model == cap.model for cap in caps]
        self.spend_cap = np.array([cap.max_spend_usd is not None for cap in caps])
        self.limits = np.array([cap.limit for cap in caps])
        self.budget, self.seed, self.defer, self.n_solves = budget_usd, seed, defer, 0

    def weight(self, k: int) -> np.ndarray:
        """[N, K] what cap k counts for each arm: cost (spend cap) or 1 (count cap)."""
        unit = self.c if self.spend_cap[k] else np.ones_like(self.c)
        return np.where(self.masks[k], unit, 0.0)

    def evaluate(self, prices: np.ndarray) -> _Trial:
        penalty = sum((p * self.weight(k) for k, p in enumerate(prices) if p > 0), 0.0)
        result = solve_budget(hull_steps(self.q - penalty, self.c), self.budget, seed=self.seed,
                              defer=self.defer)
        self.n_solves += 1
        usage = np.array([self._chosen(self.weight(k), result.arm).sum()
                          for k in range(prices.size)])
        objective = float(self._chosen(self.q, result.arm).sum())
        spend = float(self._chosen(self.c, result.arm).sum())
        bound = result.certificate.upper_bound + self.priced_limits(prices)
        return _Trial(prices.copy(), result, usage, objective, spend, bound)

    def priced_limits(self, prices: np.ndarray) -> float:
        """Σ μ·cap (q̂ units) over the priced caps: an unpriced cap adds nothing, even an
        infinite one (0·inf would make the bound NaN)."""
        return float(sum(p * limit for p, limit in zip(prices.tolist(), self.limits.tolist())
                         if p > 0))

    @staticmethod
    def _chosen(values: np.ndarray, arm: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(arm >= 0)
        return values[rows, arm[rows]]

    def price_scale(self, k: int, lam: float) -> float:
        """A first price to try for cap k: about one arm's quality over its cost."""
        quality = float(np.nanmax(np.abs(self.q[:, self.masks[k]]), initial=1.0)) or 1.0
        if not self.spend_cap[k]:
            return quality / 64
        cost = float(np.nanmean(self.c[:, self.masks[k]])) if self.masks[k].any() else 1.0
        return max(lam, quality / max(cost, 1e-300)) / 64


def solve_with_model_caps(q, c, arm_model, budget_usd: float, caps: list[ModelCap], *,
                          seed: int = 0, defer: bool = False, rounds: int = 8,
                          bisect_steps: int = 24) -> CappedSolveResult:
    """Budget solve with per-model caps. q, c: [N, K] (as ``hull_steps``); arm_model: int [K]."""
    problem = _CappedProblem(q, c, arm_model, budget_usd, caps, seed, defer)
    trial = problem.evaluate(np.zeros(len(caps)))
    trials = [trial]
    for _ in range(rounds):
        violated = np.flatnonzero(trial.usage > problem.limits)
        if violated.size == 0:
            break
        for k in violated:
            if trial.usage[k] > problem.limits[k]:
                trial = _raise_price(problem, trial, k, bisect_steps, trials)
    feasible = [t for t in trials if (t.usage <= problem.limits).all()]
    if not feasible:
        raise ValueError(f"model caps not met after {rounds} rounds of price updates; usage "
                         f"{trial.usage.tolist()} vs caps {problem.limits.tolist()}")
    best = max(feasible, key=lambda t: t.objective)
    bound = min(t.bound for t in trials)
    cert = CapCertificate(best.result.certificate, tuple(best.prices.tolist()),
                          tuple(best.usage.tolist()), tuple(problem.limits.tolist()),
                          best.objective, best.spend, bound, bound - best.objective,
                          problem.n_solves)
    return CappedSolveResult(best.result.arm, cert)


def _raise_price(problem: _CappedProblem, trial: _Trial, k: int, steps: int, trials) -> _Trial:
    """Smallest price for cap k (others fixed) that meets it: doubling, then bisection."""
    def at(price: float) -> _Trial:
        prices = trial.prices.copy()
        prices[k] = price
        trials.append(problem.evaluate(prices))
        return trials[-1]

    low = trial.prices[k]
    high = max(2 * low, problem.price_scale(k, trial.result.certificate.lam))
    upper = at(high)
    for _ in range(64):
        if upper.usage[k] <= problem.limits[k]:
            break
        low, high = high, 2 * high
        upper = at(high)
    else:
        raise ValueError(f"the cap on model {problem.models[k]} cannot be met at any price: "
                         "the budget forces its use")
    for _ in range(steps):
        middle = at((low + high) / 2)
        if middle.usage[k] <= problem.limits[k]:
            high, upper = middle.prices[k], middle
        else:
            low = middle.prices[k]
    return upper
