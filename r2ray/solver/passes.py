"""The solve's passes over one block of steps: pure functions of a StepBlock and small specs.

Each returns something small (scalars, a sparse histogram, at most ``limit`` fill candidates)
with a ``merge`` that is exact and order-independent, except ``block_assign`` which also
returns the block's chosen arms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from r2ray.solver.blocks import DEFER_ARM, StepBlock, quantum, quantum_scale, to_quanta
from r2ray.solver.hull import NO_ARM, HullSteps
from r2ray.solver.select import (
    N_BINS, Hist, digit_of, exact_bincount, exact_float_sums, exponent_counts)

HASH_RANGE = 1 << 32     # tie hashes are uint32; a cut of 2**32 takes every tied step


def _per_step(block: StepBlock, per_group: np.ndarray, rows=None):
    """A per-group array seen per step (a scalar when there is one group)."""
    if block.step_group is None:
        return per_group[0]
    groups = block.step_group if rows is None else block.step_group[rows]
    return per_group[groups]


def _groups_of(block: StepBlock, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if block.group is None else block.group.astype(np.int64)


@dataclass(frozen=True)
class Scale:
    """Counts per group and the exponent histograms that fix the quanta."""

    n_queries: np.ndarray       # int64 [G]
    n_steps: np.ndarray         # int64 [G]
    n_unroutable: np.ndarray    # int64 [G] queries without any valid arm (nor defer)
    n_invalid_arms: np.ndarray  # int64 [G]
    cost_exp: np.ndarray        # int64 [2048]
    quality_exp: np.ndarray     # int64 [2048]
    base_spend: tuple           # [G] exact Σ base_c, Python ints in units of 2**-1074 USD

    def merge(self, other: "Scale") -> "Scale":
        parts = [a + b for a, b in zip(list(self.__dict__.values())[:-1],
                                        list(other.__dict__.values())[:-1])]
        return Scale(*parts, tuple(a + b for a, b in zip(self.base_spend, other.base_spend)))


def block_scale(block: StepBlock, n_groups: int) -> Scale:
    s = block.steps
    g = _groups_of(block, s.n_queries)

    def count(weights=None):
        return np.bincount(g, weights=weights, minlength=n_groups).astype(np.int64)
    return Scale(count(), count(s.steps_per_query), count(s.base_arm == NO_ARM),
                 count(s.invalid_arms), exponent_counts(s.base_c) + exponent_counts(s.dc),
                 exponent_counts(s.base_q) + exponent_counts(s.dq),
                 tuple(exact_float_sums(s.base_c, block.group, n_groups)))


@dataclass(frozen=True)
class RadixSpec:
    """One histogram pass: which steps, which key, which 16-bit digit (all per group)."""

    source: str                      # "key32" | "key64" | "hash"
    shift: np.ndarray                # uint64 [G]: digit = (key >> shift) & 0xFFFF
    prefix: np.ndarray               # uint64 [G]: key >> (shift + 16) must equal this
    active: np.ndarray               # bool [G]
    cost_exp: int
    band32: np.ndarray | None = None  # uint32 [G]: only steps whose key32 equals this
    tie64: np.ndarray | None = None   # uint64 [G]: only steps whose key64 equals this
    seed: int = 0


def _source(block: StepBlock, spec: RadixSpec, rows) -> np.ndarray:
    """uint64 key of the selected steps (``rows`` None = every step)."""
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])  # noqa: E731
    if spec.source == "key32":
        return pick(block.key32).astype(np.uint64)
    if spec.source == "key64":
        return pick(block.key64)
    return block.hash_for(spec.seed)[pick(block.step_query)].astype(np.uint64)


def _filtered(block: StepBlock, active, band32=None, tie64=None):
    """Indices of steps in active groups passing the band / tie filters (None = all steps)."""
    mask = _per_step(block, active)
    if band32 is None and tie64 is None and np.ndim(mask) == 0:
        return None if mask else np.zeros(0, np.intp)
    if band32 is not None:
        mask = mask & (block.key32 == _per_step(block, band32))
    if tie64 is not None:
        mask = mask & (block.key64 == _per_step(block, tie64))
    return np.flatnonzero(np.broadcast_to(mask, block.key64.shape))


def block_histogram(block: StepBlock, spec: RadixSpec, with_base: bool = False):
    """Spend histogram of the spec's digit; with each group's base spend if ``with_base``."""
    n_groups = spec.active.size
    base_q, dc_q = block.cost_quanta(spec.cost_exp)
    rows, digits = _digits(block, spec)
    if block.step_group is not None:
        digits = _take(block.step_group, rows).astype(np.int64) * N_BINS + digits
    hist = Hist.of(digits, _take(dc_q, rows), n_groups)
    if not with_base:
        return hist
    return hist, exact_bincount(_groups_of(block, block.steps.n_queries), base_q, n_groups)


def _take(a: np.ndarray, rows):
    return a if rows is None else a[rows]


def _digits(block: StepBlock, spec: RadixSpec):
    """(selected step indices or None for all, their int64 digits)."""
    rows = _filtered(block, spec.active, spec.band32, spec.tie64)
    if spec.source == "key32" and spec.band32 is None and spec.tie64 is None:
        key = _take(block.key32, rows)              # fast path: uint32 arithmetic
        if spec.shift.any():                        # high digit: every step qualifies
            return rows, key >> np.uint32(16)        # uint32: bincount casts it safely
        inside = np.flatnonzero((key >> np.uint32(16)) == _per_step(block, spec.prefix, rows))
        rows = inside if rows is None else rows[inside]
        return rows, key[inside] & np.uint32(0xFFFF)
    key = _source(block, spec, rows)
    shift = _per_step(block, spec.shift, rows)
    inside = np.flatnonzero((key >> (shift + np.uint64(16))) == _per_step(block, spec.prefix, rows))
    rows = inside if rows is None else rows[inside]
    return rows, digit_of(key[inside], shift if np.ndim(shift) == 0 else shift[inside])


def merge_histograms(a, b):
    return a[0].merge(b[0]), a[1] + b[1]


@dataclass(frozen=True)
class Band:
    """Per group: the range of exact efficiency bits among steps of one float32 key."""

    lo: np.ndarray    # uint64 [G]
    hi: np.ndarray    # uint64 [G]

    def merge(self, other: "Band") -> "Band":
        return Band(np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))


def block_band(block: StepBlock, band32: np.ndarray, active: np.ndarray) -> Band:
    n_groups = active.size
    lo = np.full(n_groups, np.iinfo(np.uint64).max, np.uint64)
    hi = np.zeros(n_groups, np.uint64)
    rows = _filtered(block, active, band32=band32)
    groups = np.zeros(rows.size, np.intp) if block.step_group is None else block.step_group[rows]
    np.minimum.at(lo, groups, block.key64[rows])
    np.maximum.at(hi, groups, block.key64[rows])
    return Band(lo, hi)


@dataclass(frozen=True)
class Selection:
    """The decision rule the selection passes found, per group."""

    lam64: np.ndarray      # uint64 [G] bits of λ*; steps with more efficiency are taken
    cut: np.ndarray        # int64 [G] tied steps (efficiency == λ*) with hash < cut are taken
    leftover: np.ndarray   # int64 [G] quanta left for the greedy fill
    cost_exp: int
    quality_exp: int
    seed: int


def taken_steps(key64: np.ndarray, step_hash: np.ndarray, lam64, cut) -> np.ndarray:
    """The tie rule: steps above λ*, and tied steps whose hash is below the cut."""
    return (key64 > lam64) | ((key64 == lam64) & (step_hash < cut))


def arm_after(steps: HullSteps, n_taken: np.ndarray) -> np.ndarray:
    """int32 [N]: the arm reached after taking the first ``n_taken`` steps of each chain."""
    last = steps.offsets[:-1] + n_taken - 1
    return np.where(n_taken > 0, steps.step_arm[np.maximum(last, 0)] if steps.n_steps else 0,
                    steps.base_arm).astype(np.int32)


def _n_taken(block: StepBlock, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
    """Per query: steps taken by the tie rule, and steps strictly above λ* (both prefixes).

    Cached per selection: the fill and assign passes ask for the same counts.
    """
    def build():
        lam64 = _per_step(block, sel.lam64)
        n_above = _per_chain(block, block.key64 > lam64)
        tied = np.flatnonzero(block.key64 == lam64)      # at most one per chain
        query = block.step_query[tied]
        cut = sel.cut[0] if block.group is None else sel.cut[block.group[query]]
        take = taken_steps(block.key64[tied], block.hash_for(sel.seed)[query].astype(np.int64),
                           lam64 if np.ndim(lam64) == 0 else lam64[tied], cut)
        n_taken = n_above.copy()
        n_taken[query[take]] += 1
        return n_taken, n_above
    return block._cached(("taken", sel.lam64.tobytes(), sel.cut.tobytes(), sel.seed), build)


def _per_chain(block: StepBlock, mask: np.ndarray) -> np.ndarray:
    """How many steps of each chain the mask marks (a prefix of the chain)."""
    return _count_per_chain(mask, block.steps.offsets)


@njit(cache=True, nogil=True)
def _count_per_chain(mask, offsets):
    out = np.zeros(offsets.size - 1, np.int64)
    for i in range(out.size):
        for t in range(offsets[i], offsets[i + 1]):
            out[i] += mask[t]
    return out


@njit(cache=True, nogil=True)
def _chain_totals(dq, dc_q, quality_exp, offsets, n_taken, n_above, groups, n_groups):
    """int64 [4, n_groups]: Σ dc_q and Σ dq (in quality quanta) over each chain's first
    ``n_taken`` steps, then the same two over its first ``n_above`` (<= n_taken) steps. Exact:
    the quanta's totals stay below 2**62, so int64 sums cannot overflow."""
    out = np.zeros((4, n_groups), np.int64)
    scale = quantum_scale(quality_exp)
    for i in range(n_taken.size):
        g = groups[i]
        for t in range(offsets[i], offsets[i] + n_taken[i]):
            dq_q = np.int64(quantum(dq[t], scale, quality_exp, False))
            out[0, g] += dc_q[t]
            out[1, g] += dq_q
            if t < offsets[i] + n_above[i]:
                out[2, g] += dq_q
                out[3, g] += dc_q[t]
    return out


@dataclass(frozen=True)
class FillCandidates:
    """Each chain's next untaken step that fits the leftover, best first, top ``limit``."""

    group: np.ndarray
    key64: np.ndarray
    hash: np.ndarray
    pos: np.ndarray
    dc_q: np.ndarray
    limit: int

    def merge(self, other: "FillCandidates") -> "FillCandidates":
        return _top(*(np.concatenate([a, b]) for a, b in
                      zip(self.arrays(), other.arrays())), limit=self.limit)

    def arrays(self):
        return self.group, self.key64, self.hash, self.pos, self.dc_q


def _top(group, key64, hash_, pos, dc_q, *, limit: int) -> FillCandidates:
    """Best ``limit`` per group by (efficiency desc, hash asc, position asc)."""
    if group.size > limit:      # sort only the candidates that can make a group's top
        near = _within_top_keys(group, key64, limit)
        group, key64, hash_, pos, dc_q = (a[near] for a in (group, key64, hash_, pos, dc_q))
    order = _fill_order(group, key64, hash_, pos)
    group = group[order]
    rank = np.arange(group.size) - np.searchsorted(group, group)
    keep = order[rank < limit]
    return FillCandidates(group[rank < limit], key64[keep], hash_[keep], pos[keep], dc_q[keep],
                          limit)


def _fill_order(group, key64, hash_, pos) -> np.ndarray:
    """Order by (group asc, efficiency desc, hash asc, position asc): one argsort by efficiency
    (and a stable one by group when there are several), the full lexsort only when some group
    holds tied efficiencies, which hash and position then order."""
    order = np.argsort(~key64, kind="stable")
    if group.size and (group != group[0]).any():
        order = order[np.argsort(group[order], kind="stable")]
    k, g = key64[order], group[order]
    if ((k[1:] == k[:-1]) & (g[1:] == g[:-1])).any():
        return np.lexsort((pos, hash_, ~key64, group))
    return order


def _within_top_keys(group, key64, limit: int) -> np.ndarray:
    """Indices of candidates whose efficiency is at least their group's ``limit``-th best (ties
    kept): the others have ``limit`` better candidates, so no tie-break lets them in."""
    near = np.ones(group.size, bool)
    groups = np.unique(group)
    for g in groups:
        rows = slice(None) if groups.size == 1 else np.flatnonzero(group == g)
        keys = key64[rows]
        if keys.size > limit:
            near[rows] = keys >= np.partition(keys, keys.size - limit)[keys.size - limit]
    return np.flatnonzero(near)


def block_fill_candidates(block: StepBlock, sel: Selection, limit: int) -> FillCandidates:
    s = block.steps
    n_taken, _ = _n_taken(block, sel)
    open_ = np.flatnonzero(n_taken < s.steps_per_query)
    at = s.offsets[open_] + n_taken[open_]
    _, dc_q = block.cost_quanta(sel.cost_exp)
    groups = _groups_of(block, s.n_queries)[open_]
    fits = dc_q[at] <= sel.leftover[groups]
    open_, at, groups = open_[fits], at[fits], groups[fits]
    return _top(groups, block.key64[at], block.hash_for(sel.seed)[open_].astype(np.int64),
                block.query_pos[open_], dc_q[at], limit=limit)


@dataclass(frozen=True)
class Totals:
    """Exact per-group sums of the assignment (cost and quality in their quanta)."""

    spend: np.ndarray        # base + taken + filled spend
    quality: np.ndarray      # base + taken + filled quality
    above_dq: np.ndarray     # quality of the steps with efficiency > λ*
    above_dc: np.ndarray     # spend of the steps with efficiency > λ*
    base_q: np.ndarray       # quality of every base arm
    steps_taken: np.ndarray
    filled: np.ndarray
    deferred: np.ndarray

    def merge(self, other: "Totals") -> "Totals":
        return Totals(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


def block_assign(block: StepBlock, sel: Selection, fill_pos: np.ndarray):
    """Chosen arm and fill flag of every query in the block, and the block's exact totals."""
    s = block.steps
    n_groups = sel.lam64.size
    filled = np.isin(block.query_pos, fill_pos)
    n_taken, n_above = _n_taken(block, sel)
    n_taken = n_taken + filled
    arm = arm_after(s, n_taken)
    base_cq, dc_q = block.cost_quanta(sel.cost_exp)
    base_qq = to_quanta(s.base_q, sel.quality_exp, False)
    groups = _groups_of(block, s.n_queries)
    per_group = lambda v: exact_bincount(groups, v, n_groups)      # noqa: E731
    taken_c, taken_q, above_q, above_c = _chain_totals(
        s.dq, dc_q, sel.quality_exp, s.offsets, n_taken, n_above, groups, n_groups)
    totals = Totals(
        per_group(base_cq) + taken_c, per_group(base_qq) + taken_q, above_q, above_c,
        per_group(base_qq), per_group(n_taken), per_group(filled.astype(np.int64)),
        per_group((arm == DEFER_ARM).astype(np.int64)))
    return (arm, filled), totals
