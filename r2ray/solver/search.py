"""The driver of the budget solve: which passes to run and what to make of their histograms.

It only ever holds histograms (at most 65,536 bins per group), per-group scalars and at most
``fill_limit`` fill candidates per group, so its memory does not grow with the number of
queries. ``passes`` runs a pass over every block (in memory or on Ray) and merges the parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from r2ray.solver.passes import (
    HASH_RANGE, Band, FillCandidates, RadixSpec, Scale, Selection, Totals, block_band,
    block_fill_candidates, block_histogram, block_scale, merge_histograms)
from r2ray.solver.select import Hist, float_at_least, floor_quanta, quantum_exponent, walk

FILL_LIMIT = 1 << 16     # most fill candidates the driver considers per group
EXACT_EXP = -1074        # exact float sums count units of 2**-1074


class InfeasibleBudget(ValueError):
    """The budget is below the spend of every query on its cheapest arm."""

    def __init__(self, message: str, min_spend_usd: float):
        super().__init__(message)
        self.min_spend_usd = min_spend_usd

    def __reduce__(self):      # pickled with both arguments: it is raised in a SolveWorker
        return type(self), (self.args[0], self.min_spend_usd)


@dataclass(frozen=True)
class Outcome:
    """Exact integer results of a solve, per group (costs and qualities in their quanta)."""

    budgets: list[float]          # USD
    cost_exp: int                 # a cost quantum is 2**cost_exp USD
    quality_exp: int
    scale: Scale
    base_spend: list[int]         # every query on its base arm
    selection: Selection
    remaining: list[int]          # budget left for the tied steps (what the LP spends on them)
    tie_weight: list[int]         # spend of all tied steps
    tied_taken: list[int]         # spend of the tied steps taken
    totals: Totals


def run_solve(passes, budgets: list[float], *, seed: int, fill_limit: int = FILL_LIMIT,
              names=None):
    """Run all passes; returns the Outcome and what ``passes.assign`` returned for the arms."""
    n_groups = len(budgets)
    scale = passes.reduce(block_scale, (n_groups,), Scale.merge)
    ce, qe = quantum_exponent(scale.cost_exp), quantum_exponent(scale.quality_exp)
    spec = RadixSpec("key32", np.full(n_groups, 16, np.uint64), np.zeros(n_groups, np.uint64),
                     np.ones(n_groups, bool), ce)
    hist, base = passes.reduce(block_histogram, (spec, True), merge_histograms)
    base_spend = [int(b) for b in base]
    _check_feasible(scale.base_spend, budgets, names)
    # costs are rounded up to quanta; a budget the exact base spend fits leaves >= 0 quanta
    room = [max(floor_quanta(budgets[g], ce) - base_spend[g], 0) for g in range(n_groups)]
    active = np.array([room[g] < hist.group(g).total() for g in range(n_groups)])
    target = [room[g] if active[g] else 0 for g in range(n_groups)]
    lam64, above, tie_count, tie_weight = _select_efficiency(passes, hist, active, target, ce)
    cut, tied_taken = _select_ties(passes, lam64, active, target, tie_count, seed, ce)
    leftover = np.array([min(target[g] - tied_taken[g], 1 << 62) for g in range(n_groups)],
                        np.int64)
    selection = Selection(lam64, cut, leftover, ce, qe, seed)
    fill_pos = _greedy_fill(passes, selection, fill_limit) if (leftover > 0).any() \
        else np.zeros(0, np.int64)
    totals, arms = passes.assign(selection, fill_pos)
    outcome = Outcome(budgets, ce, qe, scale, base_spend, selection, target, tie_weight,
                      tied_taken, totals)
    return outcome, arms


def _check_feasible(exact_base_spend, budgets, names) -> None:
    """Raise unless each group's exact base spend (units of 2**-1074 USD) fits its budget."""
    short = [g for g, spend in enumerate(exact_base_spend)
             if spend > floor_quanta(budgets[g], EXACT_EXP)]
    if not short:
        return
    # rounded up: a budget of the rounded-to-nearest sum can still fall short of the exact one
    min_usd = [float_at_least(Fraction(exact_base_spend[g], 1 << -EXACT_EXP)) for g in short]
    def who(g):
        return "" if len(budgets) == 1 else f"tenant {names[g] if names else g}: "
    lines = [f"{who(g)}budget {budgets[g]:.12g} USD is below the minimum feasible spend "
             f"{m!r} USD (every query on its cheapest valid arm)"
             for g, m in zip(short, min_usd)]
    raise InfeasibleBudget("; ".join(lines) + ". Raise the budget or solve with defer=True "
                           "(r2ray route --defer).", min_usd[0])


def _select_efficiency(passes, hist, active, target, cost_exp):
    """Exact λ* per active group: two digits of the float32 key, then, only if the chosen key
    holds different float64 efficiencies, the digits where they differ. Updates ``target`` to
    the budget left for the steps of efficiency exactly λ*."""
    n_groups = active.size
    above, tie_count, tie_weight = [0] * n_groups, [0] * n_groups, [0] * n_groups
    high = np.zeros(n_groups, np.uint64)
    for g in np.flatnonzero(active):
        high[g] = _advance(walk(hist.group(g), target[g], descending=True), g, target, above)
    if not active.any():
        return np.zeros(n_groups, np.uint64), above, tie_count, tie_weight
    spec = RadixSpec("key32", np.zeros(n_groups, np.uint64), high, active, cost_exp)
    hist = passes.reduce(block_histogram, (spec,), Hist.merge)
    band32 = np.zeros(n_groups, np.uint32)
    for g in np.flatnonzero(active):
        pick = walk(hist.group(g), target[g], descending=True)
        band32[g] = (int(high[g]) << 16) | _advance(pick, g, target, above)
        tie_count[g], tie_weight[g] = pick.count, pick.weight
    band = passes.reduce(block_band, (band32, active), Band.merge)
    lam64 = np.where(active, band.lo, 0).astype(np.uint64)
    refine = active & (band.lo != band.hi)
    shift, prefix = np.zeros(n_groups, np.uint64), np.zeros(n_groups, np.uint64)
    for g in np.flatnonzero(refine):
        top_bit = (int(band.lo[g]) ^ int(band.hi[g])).bit_length() - 1
        shift[g] = 16 * (top_bit // 16)
        prefix[g] = int(band.lo[g]) >> (int(shift[g]) + 16)
    while refine.any():
        spec = RadixSpec("key64", shift.copy(), prefix.copy(), refine.copy(), cost_exp,
                         band32=band32)
        hist = passes.reduce(block_histogram, (spec,), Hist.merge)
        for g in np.flatnonzero(refine):
            pick = walk(hist.group(g), target[g], descending=True)
            known = (int(prefix[g]) << 16) | _advance(pick, g, target, above)
            tie_count[g], tie_weight[g] = pick.count, pick.weight
            if shift[g] == 0:
                lam64[g], refine[g] = known, False
            else:
                prefix[g], shift[g] = known, int(shift[g]) - 16
    return lam64, above, tie_count, tie_weight


def _advance(pick, g, target, above) -> int:
    """Account for the bins walked past; return the chosen digit."""
    target[g] -= pick.before
    above[g] += pick.before
    return pick.digit


def _select_ties(passes, lam64, active, target, tie_count, seed, cost_exp):
    """Hash cut per group: tied steps are taken in hash order while they fit the target."""
    n_groups = active.size
    cut = np.where(active, 0, HASH_RANGE).astype(np.int64)
    tied_taken = [0] * n_groups
    need = active & (np.asarray(tie_count) >= 2)
    if not need.any():
        return cut, tied_taken
    remaining = list(target)
    high = np.zeros(n_groups, np.uint64)
    for shift in (16, 0):
        spec = RadixSpec("hash", np.full(n_groups, shift, np.uint64), high.copy(), need,
                         cost_exp, tie64=lam64, seed=seed)
        hist = passes.reduce(block_histogram, (spec,), Hist.merge)
        for g in np.flatnonzero(need):
            pick = walk(hist.group(g), remaining[g], descending=False)
            known = (int(high[g]) << 16) | _advance(pick, g, remaining, tied_taken)
            high[g] = known
    cut[need] = high[need].astype(np.int64)
    return cut, tied_taken


def _greedy_fill(passes, selection: Selection, limit: int) -> np.ndarray:
    """Positions of queries that take their next step with the money left, best first."""
    cands: FillCandidates = passes.reduce(block_fill_candidates, (selection, limit),
                                          FillCandidates.merge)
    chosen = []
    for g in np.unique(cands.group):
        left = int(selection.leftover[g])
        rows = np.flatnonzero(cands.group == g)
        for pos, cost in zip(cands.pos[rows].tolist(), cands.dc_q[rows].tolist()):
            if cost <= left:
                chosen.append(pos)
                left -= cost
    return np.sort(np.asarray(chosen, np.int64))
