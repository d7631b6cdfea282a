"""A block of hull chains as the solver's passes see it, the tie hash, and the defer arm.

Every pass of the budget solve is a pure function of one ``StepBlock`` and a few scalars, so the
same code runs over in-memory chunks and over Ray Data blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numba import njit

from r2ray.solver.hull import NO_ARM, HullSteps, efficiency_key

DEFER_ARM = -2           # arm index of the "defer" choice (quality 0, cost 0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SEED_MIX = np.uint64(0xD1B54A32D192ED03)


def tie_hash(seed: int, query_key) -> np.ndarray:
    """uint32 hash of (seed, query key): the order in which tied steps are taken (splitmix64)."""
    keys = np.asarray(query_key, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = keys + np.uint64(seed % (1 << 64)) * _SEED_MIX + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(32)).astype(np.uint32)


@dataclass
class StepBlock:
    """Hull chains of a range of queries plus where they sit in the whole backlog."""

    steps: HullSteps
    query_pos: np.ndarray           # int64 [n] position of each query in the backlog
    query_key: np.ndarray           # uint64 [n] key hashed by the tie rule
    group: np.ndarray | None = None  # int32 [n] tenant index, None = one group
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def step_query(self) -> np.ndarray:
        """int32/int64 [S] local query index of every step."""
        dtype = np.int32 if self.steps.n_queries < 2**31 else np.int64
        return np.repeat(np.arange(self.steps.n_queries, dtype=dtype), self.steps.steps_per_query)

    @cached_property
    def step_group(self) -> np.ndarray | None:
        return None if self.group is None else self.group[self.step_query]

    @cached_property
    def eff(self) -> np.ndarray:
        """float64 [S] efficiency dq/dc, quality per USD (the exact order of steps)."""
        return self.steps.dq / self.steps.dc

    @cached_property
    def key64(self) -> np.ndarray:
        """uint64 [S] bits of ``eff``; positive floats sort like their bit patterns."""
        return self.eff.view(np.uint64)

    @cached_property
    def key32(self) -> np.ndarray:
        """uint32 [S] bits of the float32 key (``HullSteps.key``: efficiency_key(dq / dc))."""
        return self.steps.key.view(np.uint32)

    def hash_for(self, seed: int) -> np.ndarray:
        """uint32 [n] tie hash of every query for this seed (cached)."""
        return self._cached(("hash", seed), lambda: tie_hash(seed, self.query_key))

    def cost_quanta(self, exponent: int) -> tuple[np.ndarray, np.ndarray]:
        """(base_c, dc) rounded up to integer multiples of 2**exponent USD, int64."""
        return self._cached(("cost", exponent), lambda: (
            to_quanta(self.steps.base_c, exponent, True), to_quanta(self.steps.dc, exponent, True)))

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def to_quanta(values: np.ndarray, exponent: int, round_up: bool) -> np.ndarray:
    """int64 multiples of 2**exponent: ceil (costs, so spend is never under-counted) or
    round-half-even (qualities) of values / 2**exponent; what np.ceil / np.rint of
    np.ldexp(values, -exponent) give, in one pass, but a positive cost is at least 1."""
    return _to_quanta(np.ascontiguousarray(values, np.float64), np.int64(exponent), round_up)


@njit(cache=True, nogil=True)
def quantum_scale(exponent):
    """2**-exponent where it is a normal float64, else 0 (then ``quantum`` calls ldexp)."""
    return math.ldexp(1.0, -exponent) if -1022 <= exponent <= 1022 else 0.0


@njit(cache=True, nogil=True)
def quantum(value, scale, exponent, round_up):
    """One value in quanta of 2**exponent, as a float64 the caller casts. Multiplying by an
    exact power of two rounds as ldexp does; ldexp itself only where ``scale`` is 0. Rounded
    up, a positive value is at least one quantum: scaled, it can underflow to 0 (a cost below
    2**(exponent - 1074) USD, beside costs summing past 2**61 USD) and would then be free."""
    x = value * scale if scale else math.ldexp(value, -exponent)
    if round_up:
        return max(np.ceil(x), 1.0) if value > 0 else np.ceil(x)
    return np.rint(x)


@njit(cache=True, nogil=True)
def _to_quanta(values, exponent, round_up):
    out = np.empty(values.size, np.int64)
    scale = quantum_scale(exponent)
    for i in range(values.size):
        out[i] = np.int64(quantum(values[i], scale, exponent, round_up))
    return out


def blocks_of(steps: HullSteps, *, query_key=None, group=None, defer: bool = False,
              block_queries: int = 1 << 20, query_pos=None) -> list[StepBlock]:
    """Split in-memory hull chains into blocks of consecutive queries.

    query_pos: int64 [N] backlog positions (default 0..N-1); query_key defaults to them.
    """
    n = steps.n_queries
    pos = np.arange(n, dtype=np.int64) if query_pos is None else np.asarray(query_pos, np.int64)
    keys = pos.astype(np.uint64) if query_key is None else np.asarray(query_key, np.uint64)
    groups = None if group is None else np.asarray(group, np.int32)
    out = []
    for start in range(0, max(n, 1), block_queries):
        stop = min(n, start + block_queries)
        part = steps.slice(start, stop)
        out.append(StepBlock(with_defer_arm(part) if defer else part, pos[start:stop],
                             keys[start:stop], None if groups is None else groups[start:stop]))
    return out


def with_defer_arm(steps: HullSteps) -> HullSteps:
    """Hull chains after adding a "defer" arm (quality 0, cost 0) to every query.

    The defer point becomes the base; the chain jumps from it to the vertex with the best
    quality per USD from the origin (the farthest on ties), then follows the old chain.
    A query whose base already costs 0 with quality >= 0 is unchanged.
    """
    n, counts = steps.n_queries, steps.steps_per_query
    width = int(counts.max(initial=0))
    vq, vc = _vertices(steps, width)                       # [n, width+1] cumulative chain
    keep_base = (steps.base_c == 0) & (steps.base_q >= 0) & (steps.base_arm != NO_ARM)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where((vc > 0) & (vq > 0), vq / vc, -np.inf)
    jump = width - np.argmax(ratio[:, ::-1], axis=1)        # last max, as a vertex index
    jump = np.where(np.isfinite(ratio[np.arange(n), jump]), jump, -1)
    jump = _extend_while_not_steeper(steps, vq, vc, jump)
    jump[keep_base] = 0
    return _rebuild(steps, vq, vc, jump, keep_base)


def _vertices(steps: HullSteps, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Quality and cost of every chain vertex, summed step by step within each query."""
    n, counts = steps.n_queries, steps.steps_per_query
    vq = np.full((n, width + 1), np.nan)
    vc = np.full((n, width + 1), np.nan)
    has_arm = steps.base_arm != NO_ARM
    vq[has_arm, 0], vc[has_arm, 0] = steps.base_q[has_arm], steps.base_c[has_arm]
    for t in range(width):
        rows = np.flatnonzero(counts > t)
        at = steps.offsets[rows] + t
        vq[rows, t + 1] = vq[rows, t] + steps.dq[at]
        vc[rows, t + 1] = vc[rows, t] + steps.dc[at]
    return vq, vc


def _extend_while_not_steeper(steps, vq, vc, jump) -> np.ndarray:
    """Move the jump target on while the next old step is at least as efficient as the jump."""
    counts = steps.steps_per_query
    while True:
        rows = np.flatnonzero((jump >= 0) & (jump < counts))
        if rows.size == 0:
            return jump
        at = steps.offsets[rows] + jump[rows]
        j = jump[rows]
        further = steps.dq[at] / steps.dc[at] >= vq[rows, j] / vc[rows, j]
        if not further.any():
            return jump
        jump[rows[further]] += 1


def _rebuild(steps, vq, vc, jump, keep_base) -> HullSteps:
    """New chains: defer base, one jump step to vertex ``jump``, then the old steps after it."""
    n, counts = steps.n_queries, steps.steps_per_query
    has_jump = (jump >= 0) & ~keep_base
    rest = np.where(keep_base, counts, np.where(jump >= 0, counts - np.maximum(jump, 0), 0))
    new_counts = rest + has_jump
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(new_counts, out=offsets[1:])
    old_start = steps.offsets[:-1] + np.where(keep_base, 0, np.maximum(jump, 0))
    total = int(offsets[-1])
    keep = np.ones(total, bool)                  # new slots that copy an old step
    keep[offsets[:-1][has_jump]] = False
    first = offsets[:-1] + has_jump
    flat_old = np.repeat(old_start - first, rest) + np.arange(total)[keep]
    step_arm = np.empty(total, np.int32)
    dq, dc = np.empty(total), np.empty(total)
    step_arm[keep], dq[keep] = steps.step_arm[flat_old], steps.dq[flat_old]
    dc[keep] = steps.dc[flat_old]
    rows = np.flatnonzero(has_jump)
    j = jump[rows]
    target = steps.base_arm[rows]
    later = j > 0
    target[later] = steps.step_arm[steps.offsets[rows[later]] + j[later] - 1]
    step_arm[offsets[rows]] = target
    dq[offsets[rows]], dc[offsets[rows]] = vq[rows, j], vc[rows, j]
    base_arm = np.where(keep_base, steps.base_arm, DEFER_ARM).astype(np.int32)
    return HullSteps(base_arm, np.where(keep_base, steps.base_q, 0.0),
                     np.where(keep_base, steps.base_c, 0.0), offsets, step_arm, dq, dc,
                     efficiency_key(dq / dc) if total else np.zeros(0, np.float32),
                     steps.invalid_arms)

