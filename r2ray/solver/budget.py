"""Exact global-budget solve: λ* by radix select, the tie rule, rounding, and the certificate.

Maximise Σ q̂ over one arm per query subject to Σ ĉ <= B. Every query starts on its cheapest hull
arm; the money left buys hull steps in order of decreasing efficiency. λ* is the efficiency at
which it runs out, found exactly by histogram passes (see ``select``); tied steps are taken in
seeded-hash order while they fit, the first that does not is rounded down, and a greedy fill
spends what is left. The dual value g(λ*) bounds the optimum from above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from r2ray.solver.blocks import StepBlock, blocks_of, tie_hash, with_defer_arm
from r2ray.solver.hull import HullSteps, hull_steps
from r2ray.solver.passes import HASH_RANGE, arm_after, block_assign, taken_steps
from r2ray.solver.search import FILL_LIMIT, InfeasibleBudget, Outcome, run_solve
from r2ray.solver.select import TOTAL_BITS, float_at_least

FLOAT_SLACK_BITS = 48     # the dual bound adds 2**-48 of the chains' magnitudes: see _dual_bound


@dataclass(frozen=True)
class DualCertificate:
    """What one budget solve proved. Quality in q̂ units, money in USD, λ in quality per USD."""

    lam: float              # λ*: price of budget; steps more efficient than this are taken
    theta: float            # share of the tied spend (efficiency == λ*) that was taken
    tie_cut: float          # a tied step is taken iff tie_hash(seed, query_key) / 2**32 < tie_cut
    lp_fraction: float      # share of the tied spend the LP relaxation takes
    spend_usd: float        # of the chosen arms (costs rounded up to the solve's quantum)
    budget_usd: float
    objective: float        # Σ q̂ of the chosen arms
    lp_value: float         # optimum of the LP relaxation
    upper_bound: float      # dual value g(λ*) >= any feasible objective
    gap: float              # upper_bound - objective: the proven optimality gap
    n_queries: int
    n_steps: int
    n_steps_taken: int
    n_filled: int           # queries moved one extra step by the greedy fill
    n_invalid_arms: int     # NaN/inf arms removed
    n_unroutable: int       # queries with no valid arm (arm = NO_ARM)
    n_deferred: int         # queries on the defer arm (arm = DEFER_ARM)
    seed: int


class CertifiedResult:
    """Mixin for results holding ``certificates``: one per tenant, or one for the backlog."""

    certificates: tuple[DualCertificate, ...]

    @property
    def certificate(self) -> DualCertificate:
        """The certificate of a solve with one budget."""
        if len(self.certificates) != 1:
            raise ValueError("this solve has one certificate per tenant; use .certificates")
        return self.certificates[0]


@dataclass(frozen=True)
class SolveResult(CertifiedResult):
    """Chosen arm per query and the certificate(s)."""

    arm: np.ndarray                             # int32 [N]
    filled: np.ndarray                          # bool [N] moved by the greedy fill
    certificates: tuple[DualCertificate, ...]


class LocalPasses:
    """Runs each pass over in-memory blocks; the driver logic is shared with Ray."""

    def __init__(self, blocks: list[StepBlock]):
        self.blocks = blocks

    def reduce(self, fn, args: tuple, merge):
        out = None
        for block in self.blocks:
            part = fn(block, *args)
            out = part if out is None else merge(out, part)
        return out

    def assign(self, selection, fill_pos):
        """Totals, and (arm int32, filled bool) of every query in block order."""
        parts = [block_assign(block, selection, fill_pos) for block in self.blocks]
        totals = parts[0][1]
        for _, part in parts[1:]:
            totals = totals.merge(part)
        return totals, tuple(np.concatenate([p[0][i] for p in parts]) for i in (0, 1))


def solve_budget(steps: HullSteps, budget_usd: float, *, seed: int = 0, defer: bool = False,
                 query_key: np.ndarray | None = None, fill_limit: int = FILL_LIMIT) -> SolveResult:
    """Assign one arm per query maximising Σ q̂ with Σ ĉ <= budget_usd (USD).

    query_key: uint64 [N] keys hashed by the tie rule (default: the query positions); the online
    side must pass the same key to ``choose_arm``. defer: add a "defer" arm (q 0, cost 0) to every
    query instead of raising ``InfeasibleBudget`` when the budget is too small.
    """
    return solve_groups(steps, [budget_usd], seed=seed, defer=defer, query_key=query_key,
                        fill_limit=fill_limit)


def solve_groups(steps: HullSteps, budgets_usd, *, group=None, seed: int = 0,
                 defer: bool = False, query_key=None, fill_limit: int = FILL_LIMIT,
                 names=None) -> SolveResult:
    """Independent budgets for groups of queries (``group``: int [N] in [0, len(budgets))),
    solved together in the same passes."""
    blocks = blocks_of(steps, query_key=query_key, group=group, defer=defer)
    outcome, (arm, filled) = run_solve(LocalPasses(blocks), validated_budgets(budgets_usd),
                                       seed=seed, fill_limit=fill_limit, names=names)
    return SolveResult(arm, filled, certificates(outcome))


def validated_budgets(budgets_usd) -> list[float]:
    """One or more budgets (USD) as floats; NaN and negative budgets are rejected."""
    budgets = [float(b) for b in np.atleast_1d(np.asarray(budgets_usd, dtype=np.float64))]
    for b in budgets:
        if math.isnan(b) or b < 0:
            raise ValueError(f"budget must be a non-negative number of USD; got {b!r}")
    return budgets


def certificates(outcome: Outcome) -> tuple[DualCertificate, ...]:
    """Float certificates from the exact integer outcome of a solve."""
    return tuple(_certificate(outcome, g) for g in range(len(outcome.budgets)))


def _certificate(o: Outcome, g: int) -> DualCertificate:
    usd = lambda quanta: math.ldexp(int(quanta), o.cost_exp)          # noqa: E731
    quality = lambda quanta: math.ldexp(int(quanta), o.quality_exp)   # noqa: E731
    t, s = o.totals, o.scale
    lam = float(np.uint64(o.selection.lam64[g]).view(np.float64))
    items = int(s.n_queries[g] + s.n_steps[g])
    above_q = quality(t.base_q[g] + t.above_dq[g])
    # no money left adds nothing, even at a λ* of inf (a step whose efficiency overflowed)
    lp_value = above_q + (lam * usd(o.remaining[g]) if o.remaining[g] else 0.0)
    upper = _dual_bound(o, g, lam, items)
    objective = quality(t.quality[g])
    tie_weight = o.tie_weight[g]
    return DualCertificate(
        lam=lam, theta=o.tied_taken[g] / tie_weight if tie_weight else 1.0,
        tie_cut=int(o.selection.cut[g]) / HASH_RANGE,
        lp_fraction=o.remaining[g] / tie_weight if tie_weight else 1.0,
        # quanta round costs up, so this bounds the true spend (and so does the float, rounded
        # up: its up to 61 bits of quanta rounded to nearest fell an ulp below the arms' sum);
        # it can pass the budget only when the exact base spend fits a budget that the rounded
        # one does not (no steps taken)
        spend_usd=min(float_at_least(_exactly(int(t.spend[g]), o.cost_exp)), o.budgets[g]),
        budget_usd=o.budgets[g],
        objective=objective,
        lp_value=lp_value, upper_bound=float_at_least(upper),
        gap=float_at_least(upper - _exactly(int(t.quality[g]), o.quality_exp)),
        n_queries=int(s.n_queries[g]), n_steps=int(s.n_steps[g]),
        n_steps_taken=int(t.steps_taken[g]), n_filled=int(t.filled[g]),
        n_invalid_arms=int(s.n_invalid_arms[g]), n_unroutable=int(s.n_unroutable[g]),
        n_deferred=int(t.deferred[g]), seed=o.selection.seed)


def _dual_bound(o: Outcome, g: int, lam: float, items: int) -> Fraction | float:
    """The dual bound g(λ*) (q̂ units) as an exact fraction: Σ q̂ on the arms above λ* plus
    λ* × (B - their spend) (USD), plus what rounding costs (a quantum per query and step) and
    qualities (half a quantum each) to quanta can hide, plus what float rounding can hide: a
    step's dq is a rounded difference of two arms' qualities, its dc a rounded-up one, λ* a
    rounded dq / dc and the hull's slopes float comparisons, each off by a few ulps of |dq| and
    λ*·dc, whose sums lie below 2**(quality_exp + 61) and 2**(cost_exp + 61): 2**-48 of those
    (q̂ units; USD times λ*) covers them. Without it the bound fell ~1e-16 below g(λ*) and the
    optimum (0.78, 0.07 / 0.03, 0.38 at 0.87, 0.13 / 0.01, 0.48 mUSD with 1.35 mUSD).

    Not in floats: B - spend cancels, and the spend (up to 61 bits of quanta) rounded to a float
    can land on B with up to half an ulp of B still unspent; times a λ* of 1e9 quality per USD
    (steps costing nano-dollars) that put the bound below the objective (a negative gap)."""
    t = o.totals
    bound = _exactly(int(t.base_q[g] + t.above_dq[g]) + Fraction(items, 2), o.quality_exp)
    bound += _exactly(1, o.quality_exp + TOTAL_BITS - FLOAT_SLACK_BITS)
    if not lam:     # at λ* = 0 the budget's terms vanish (the budget may be infinite)
        return bound
    if math.isinf(lam):     # a step of infinite efficiency (its cost underflowed): no bound
        return math.inf
    spend_less_rounding = _exactly(o.base_spend[g] + int(t.above_dc[g]) - items, o.cost_exp)
    float_slack = _exactly(1, o.cost_exp + TOTAL_BITS - FLOAT_SLACK_BITS)
    return bound + Fraction(lam) * (Fraction(o.budgets[g]) - spend_less_rounding + float_slack)


def _exactly(quanta, exponent: int) -> Fraction:
    """quanta × 2**exponent as an exact fraction."""
    return Fraction(quanta) * Fraction(2) ** exponent


def choose_arms(q: np.ndarray, c: np.ndarray, lam: float, *, tie_cut: float = 1.0,
                seed: int = 0, query_key=None, defer: bool = False) -> np.ndarray:
    """Arms the batch solve's rule picks at price ``lam`` (quality per USD) for [N, K] rows.

    The same hull, tie hash and ``taken_steps`` rule as ``solve_budget``: with the certificate's
    λ*, tie_cut and seed it reproduces the batch assignment of every query not moved by the fill.
    """
    steps = hull_steps(q, c)
    steps = with_defer_arm(steps) if defer else steps
    keys = np.arange(steps.n_queries) if query_key is None else query_key
    block = StepBlock(steps, np.arange(steps.n_queries), np.asarray(keys, np.uint64))
    step_hash = block.hash_for(seed)[block.step_query].astype(np.int64)
    taken = taken_steps(block.key64, step_hash, _lam_bits(lam), _hash_cut(tie_cut))
    return arm_after(steps, np.bincount(block.step_query[taken], minlength=steps.n_queries))


def choose_arm(q_row: np.ndarray, c_row: np.ndarray, lam: float, *, tie_cut: float = 1.0,
               seed: int = 0, query_key: int = 0, defer: bool = False) -> int:
    """The arm for one query (q, c rows of K arms) at price ``lam``; what ``choose_arms`` gives
    its row. One row has a handful of hull steps, so the rule runs on Python ints here: the
    array passes cost ~30 µs of numpy calls per Serve request for a few comparisons."""
    q2, c2 = np.asarray(q_row)[None, :], np.asarray(c_row)[None, :]
    if defer:
        return int(choose_arms(q2, c2, lam, tie_cut=tie_cut, seed=seed, query_key=[query_key],
                               defer=True)[0])
    steps = hull_steps(q2, c2)
    lam64 = int(_lam_bits(lam))
    n_taken = 0
    for key64 in (steps.dq / steps.dc).view(np.uint64).tolist():   # StepBlock.key64's bits
        tied = key64 == lam64   # hashed only then: at most one step of a chain ties
        n_taken += key64 > lam64 or (tied and int(tie_hash(seed, np.asarray(
            [query_key], np.uint64))[0]) < _hash_cut(tie_cut))
    return int(steps.step_arm[n_taken - 1] if n_taken else steps.base_arm[0])   # arm_after


def _lam_bits(lam: float) -> np.uint64:
    """Bits of the price as the tie rule compares them with steps' efficiency bits. A price of
    -0.0 (``"lambda": -0.0`` passes ``ge=0``) is 0: its sign bit made it the largest price,
    every query on its cheapest arm where λ = 0 gives each its best."""
    return np.float64(max(float(lam), 0.0) + 0.0).view(np.uint64)   # -0.0 + 0.0 is +0.0


def _hash_cut(tie_cut: float) -> int:
    """Tied steps whose uint32 hash is below this are taken (``tie_cut`` of 1 takes all)."""
    return math.ceil(min(max(float(tie_cut), 0.0), 1.0) * HASH_RANGE)


__all__ = ["DualCertificate", "InfeasibleBudget", "SolveResult", "choose_arm", "choose_arms",
           "solve_budget", "solve_groups", "tie_hash"]
