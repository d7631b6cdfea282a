"""Per-query upper convex hull of (cost, quality) arms, as a chain of efficiency steps.

A query's arms are points (c_j USD, q_j quality). Only the upper convex hull, from the cheapest
arm up to the best one, can ever be chosen by the budget solve. It is stored as a base arm plus
steps; step t moves the query from one hull vertex to the next, adding ``dq`` quality for ``dc``
USD at efficiency ``dq / dc`` (quality per USD), strictly decreasing along the chain.

The hull itself is computed row by row by a numba kernel (``r2ray.solver.hull_kernel``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2ray.solver.hull_kernel import NO_ARM, efficiency_keys, hull_rows

CHUNK_ROWS = 1 << 21     # rows per kernel call; bounds the copy made of inputs that are not
                         # C-contiguous float32/float64 (others are read in place)


@dataclass(frozen=True)
class HullSteps:
    """Hull chains of N queries in CSR form; steps of query i are ``offsets[i]:offsets[i+1]``."""

    base_arm: np.ndarray      # int32 [N] cheapest hull arm (NO_ARM if the query has no valid arm)
    base_q: np.ndarray        # float64 [N] quality of the base arm (0 when NO_ARM)
    base_c: np.ndarray        # float64 [N] USD cost of the base arm (0 when NO_ARM)
    offsets: np.ndarray       # int64 [N+1]
    step_arm: np.ndarray      # int32 [S] arm reached by the step
    dq: np.ndarray            # float64 [S] quality gained, > 0
    dc: np.ndarray            # float64 [S] USD added, > 0
    key: np.ndarray           # float32 [S] efficiency dq/dc (quality per USD), truncated, > 0
    invalid_arms: np.ndarray  # int32 [N] NaN/inf arms removed per query

    @property
    def n_queries(self) -> int:
        return int(self.base_arm.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.step_arm.shape[0])

    @property
    def n_invalid_arms(self) -> int:
        return int(self.invalid_arms.sum())

    @property
    def steps_per_query(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slice(self, start: int, stop: int) -> "HullSteps":
        """Queries ``start:stop`` (views where possible; offsets rebased to 0)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return HullSteps(
            self.base_arm[start:stop], self.base_q[start:stop], self.base_c[start:stop],
            self.offsets[start:stop + 1] - lo, self.step_arm[lo:hi], self.dq[lo:hi],
            self.dc[lo:hi], self.key[lo:hi], self.invalid_arms[start:stop])

    def take(self, queries: np.ndarray) -> "HullSteps":
        """The hull chains of the given query indices, in that order."""
        queries = np.asarray(queries, dtype=np.int64)
        counts = self.steps_per_query[queries]
        starts = self.offsets[:-1][queries]
        offsets = np.zeros(queries.size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
        return HullSteps(
            self.base_arm[queries], self.base_q[queries], self.base_c[queries], offsets,
            self.step_arm[flat], self.dq[flat], self.dc[flat], self.key[flat],
            self.invalid_arms[queries])


def efficiency_key(eff: np.ndarray) -> np.ndarray:
    """float32 key of float64 efficiencies: rounded toward zero, clipped to (0, FLT_MAX].

    Monotone in ``eff``, so sorting keys never contradicts sorting efficiencies; rounding toward
    zero makes all efficiencies sharing one key share their top 35 bits as well.
    """
    eff = np.ascontiguousarray(eff, np.float64)
    key = np.empty(eff.shape, np.float32)
    efficiency_keys(eff.reshape(-1), key.reshape(-1))
    return key


def concat_steps(parts: list[HullSteps]) -> HullSteps:
    """Concatenate hull chains of consecutive query ranges."""
    if len(parts) == 1:
        return parts[0]
    counts = np.concatenate([p.steps_per_query for p in parts])
    offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return HullSteps(cat("base_arm"), cat("base_q"), cat("base_c"), offsets, cat("step_arm"),
                     cat("dq"), cat("dc"), cat("key"), cat("invalid_arms"))


def hull_steps(q: np.ndarray, c: np.ndarray, *, chunk_rows: int = CHUNK_ROWS) -> HullSteps:
    """Upper convex hull chain of every query.

    q: [N, K] predicted quality; c: [N, K] predicted cost in USD (>= 0). A NaN or inf in either
    marks the arm unavailable: it is removed and counted in ``invalid_arms``. float32 inputs are
    widened exactly, so they give the same hull as their float64 copies.
    """
    q, c = _validated(q, c)
    parts = [_chunk_hull(q[s:s + chunk_rows], c[s:s + chunk_rows], s)
             for s in range(0, q.shape[0], chunk_rows)]
    return concat_steps(parts) if parts else empty_steps()


def _validated(q, c) -> tuple[np.ndarray, np.ndarray]:
    q, c = np.asarray(q), np.asarray(c)
    if q.ndim != 2 or q.shape != c.shape:
        raise ValueError(f"q and c must both be [N, K] arrays; got shapes {q.shape} and {c.shape}")
    if q.shape[1] == 0 or q.shape[1] > 1 << 16:
        raise ValueError(f"need 1 <= K <= 65536 arms per query; got K={q.shape[1]}")
    return q, c


def empty_steps(n: int = 0) -> HullSteps:
    """Chains of n queries without any valid arm."""
    f64, i32 = np.zeros(0, np.float64), np.zeros(0, np.int32)
    return HullSteps(np.full(n, NO_ARM, np.int32), np.zeros(n), np.zeros(n),
                     np.zeros(n + 1, np.int64), i32, f64, f64.copy(), np.zeros(0, np.float32),
                     np.zeros(n, np.int32))


def _chunk_hull(q: np.ndarray, c: np.ndarray, first_row: int) -> HullSteps:
    """Hull chains of one chunk of rows ([n, K] each; ``first_row`` only names a bad cost)."""
    *chains, bad_row, bad_arm = hull_rows(_kernel_input(q), _kernel_input(c))
    if bad_row >= 0:
        raise ValueError(f"costs must be >= 0 USD; c[{first_row + bad_row}, {bad_arm}] = "
                         f"{float(c[bad_row, bad_arm])!r}. Use NaN to mark an unavailable arm.")
    steps = HullSteps(*chains)
    _check_finite_steps(steps, first_row)
    return steps


def _check_finite_steps(steps: HullSteps, first_row: int) -> None:
    """Raise if a hull step's quality gain overflowed to inf (finite q̂ about 1e308 apart): the
    solve's quanta and sums would then be garbage or fail with a bare OverflowError."""
    overflowed = np.flatnonzero(np.isinf(steps.dq))
    if overflowed.size:
        row = int(np.searchsorted(steps.offsets, overflowed[0], side="right")) - 1
        raise ValueError(f"q[{first_row + row}]: two arms' qualities differ by more than the "
                         "largest float64 (their step's gain overflows to inf); rescale q")


def _kernel_input(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 or float64 array (copied only when it is not one)."""
    return np.ascontiguousarray(x if x.dtype in (np.float32, np.float64) else x.astype(np.float64))
