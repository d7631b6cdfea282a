"""The numpy hull that ``r2ray.solver.hull_steps`` replaced, kept only as a bit-for-bit reference.

Vectorised over rows: sort each row by cost (one packed uint32 sort), keep the Pareto front
(quality strictly above every cheaper arm), gift-wrap the front from its cheapest point (each
round finds every row's next vertex), and peel any vertex whose float64 efficiencies are not
strictly decreasing. The package's numba kernel must give exactly the same HullSteps.
"""
from __future__ import annotations

import numpy as np

from r2ray.solver.hull import NO_ARM, HullSteps, concat_steps, empty_steps

CHUNK_ROWS = 1024        # rows per vectorised chunk: [1024, 176] arrays stay cache-resident
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_FLT_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


def reference_hull_steps(q: np.ndarray, c: np.ndarray, *,
                         chunk_rows: int = CHUNK_ROWS) -> HullSteps:
    """Upper convex hull chain of every query (q, c: float32 or float64 [N, K], costs >= 0)."""
    q, c = np.asarray(q), np.asarray(c)
    with np.errstate(over="ignore", under="ignore"):    # extreme magnitudes in the tests
        parts = [_chunk_hull(q[s:s + chunk_rows], c[s:s + chunk_rows])
                 for s in range(0, q.shape[0], chunk_rows)]
    return concat_steps(parts) if parts else empty_steps()


def reference_efficiency_key(eff: np.ndarray) -> np.ndarray:
    """float32 key of float64 efficiencies: rounded toward zero, clipped to (0, FLT_MAX]."""
    with np.errstate(over="ignore"):
        key = eff.astype(np.float32)
    above = key > eff
    key[above] = np.nextafter(key[above], np.float32(0))
    return np.clip(key, _FLT_TINY, _FLT_MAX)


def _chunk_hull(q: np.ndarray, c: np.ndarray) -> HullSteps:
    """Hull chains of one chunk of rows ([n, K] each)."""
    n, k = q.shape
    valid = np.isfinite(q) & np.isfinite(c)
    order, q_sorted_t = _sorted_by_cost(q, c, valid)
    front = _pareto_front(q_sorted_t).T                # [n, K] bool, in sorted order
    src, rows, slot, width = _compact(front)
    width = max(width, 1)                              # a chunk with no valid arm at all
    arm = order.ravel()[src]
    dst = rows * width + slot
    at = rows * k + arm
    chains = [_packed(values, dst, (n, width), fill) for values, fill in
              ((q.ravel()[at], np.inf), (c.ravel()[at], np.inf), (arm, NO_ARM))]
    steps = _chains_to_csr(*_peel(*_gift_wrap(*chains)))
    return HullSteps(**steps, invalid_arms=(k - valid.sum(axis=1)).astype(np.int32))


def _sorted_by_cost(q, c, valid) -> tuple[np.ndarray, np.ndarray]:
    """Arm order by cost ([n, K], ties by index, invalid arms last) and q in that order,
    transposed ([K, n]; invalid arms -inf).

    Fast path: one uint32 sort of (float32 cost bits with the low bits replaced by the arm index).
    Rows that this leaves out of exact cost order (two costs sharing their top bits) are re-sorted
    with a stable argsort.
    """
    n, k = c.shape
    index_bits = max(1, int(k - 1).bit_length())
    low = np.uint32((1 << index_bits) - 1)
    cols = np.arange(k, dtype=np.uint32)
    bits = c.astype(np.float32, copy=False).view(np.uint32) & np.uint32(0x7FFFFFFF)  # -0.0 -> 0
    packed = (bits & ~low) | cols
    all_valid = bool(valid.all())
    if not all_valid:
        packed[~valid] = ~low | cols[np.nonzero(~valid)[1]]   # after every finite cost
    packed.sort(axis=1)
    order = (packed & low).astype(np.intp)
    flat = order + (np.arange(n, dtype=np.intp) * k)[:, None]
    c_sorted = c.take(flat)
    if not all_valid:
        c_sorted[~valid.take(flat)] = np.inf
    misordered = np.flatnonzero((c_sorted[:, 1:] < c_sorted[:, :-1]).any(axis=1))
    if misordered.size:
        exact_cost = np.where(valid[misordered], c[misordered], np.inf)
        order[misordered] = np.argsort(exact_cost, axis=1, kind="stable")
        flat[misordered] = order[misordered] + (misordered * k)[:, None]
    q_sorted_t = q.take(flat.T)
    if not all_valid:
        q_sorted_t[~valid.take(flat.T)] = -np.inf
    return order, q_sorted_t


def _pareto_front(q_sorted_t: np.ndarray) -> np.ndarray:
    """[K, n] arms whose quality beats every cheaper arm (the first of exact duplicates).

    One vectorised step per sorted position (faster than ufunc.accumulate along rows)."""
    front = np.empty(q_sorted_t.shape, bool)
    best = q_sorted_t[0].copy()
    np.greater(best, -np.inf, out=front[0])
    for j in range(1, q_sorted_t.shape[0]):
        np.greater(q_sorted_t[j], best, out=front[j])
        np.maximum(best, q_sorted_t[j], out=best)
    return front


def _compact(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flat index, row and left-packed slot of every True entry of a 2-D mask, and max count."""
    counts = mask.sum(axis=1)
    flat = np.flatnonzero(mask)
    rows = flat // mask.shape[1]
    starts = np.cumsum(counts) - counts
    slot = np.arange(flat.size) - starts[rows]
    return flat, rows, slot, int(counts.max(initial=0))


def _packed(values: np.ndarray, dst: np.ndarray, shape, fill) -> np.ndarray:
    """A fresh array of ``shape`` filled with ``fill`` (float64 unless integer values)."""
    out = np.full(shape, fill, values.dtype if values.dtype.kind == "i" else np.float64)
    out.ravel()[dst] = values
    return out


def _gift_wrap(qa: np.ndarray, ca: np.ndarray, ja: np.ndarray):
    """Hull vertices of Pareto fronts ([n, W], cost and quality increasing, +inf padded).

    From the cheapest point, each round moves every unfinished row to the point of steepest
    slope after it; returns the vertices, +inf padded (collinear ones included).
    Points before a row's current one have dc <= 0 and are masked by that alone; unusable
    points get quality -inf (and padding a finite cost) so their slope is -inf.
    """
    n, width = qa.shape
    usable = ca < np.inf
    usable[:, :-1] &= ca[:, :-1] != ca[:, 1:]        # the cheaper of equal costs is dominated
    current = np.argmax(usable, axis=1)               # the base: first usable point
    has_base = usable.any(axis=1)
    rows = np.flatnonzero(has_base)
    q_live = np.where(usable, qa, -np.inf)[rows]
    c_live = np.where(ca < np.inf, ca, np.finfo(np.float64).max)[rows]
    cur, offset, hops = current[rows], 0, []
    with np.errstate(invalid="ignore", divide="ignore"):
        while rows.size:
            at = np.arange(rows.size)
            dc = c_live - c_live[at, cur][:, None]
            slope = np.full(dc.shape, -np.inf)
            np.divide(q_live - q_live[at, cur][:, None], dc, out=slope, where=dc > 0)
            nxt = np.argmax(slope, axis=1)     # on exact ties the nearest; _peel drops it later
            moved = slope[at, nxt] > -np.inf
            hops.append((rows[moved], nxt[moved] + offset))
            shift = int(nxt[moved].min(initial=0))                  # columns no row needs
            if not moved.all():
                rows, nxt, q_live, c_live = rows[moved], nxt[moved], q_live[moved], c_live[moved]
            q_live, c_live, cur = q_live[:, shift:], c_live[:, shift:], nxt - shift
            offset += shift
    return _vertices_of(qa, ca, ja, current, has_base, hops)


def _vertices_of(qa, ca, ja, base, has_base, hops):
    """Gather the chosen points into [n, H] arrays (+inf / NO_ARM padded)."""
    n = qa.shape[0]
    position = np.full((n, len(hops) + 1), -1)
    position[has_base, 0] = base[has_base]
    for t, (rows, pos) in enumerate(hops):
        position[rows, t + 1] = pos
    keep = position >= 0
    r = np.nonzero(keep)[0]
    out = []
    for a, fill in ((qa, np.inf), (ca, np.inf), (ja, NO_ARM)):
        vertex = np.full(position.shape, fill, a.dtype)
        vertex[keep] = a[r, position[keep]]
        out.append(vertex)
    return out


def _peel(qa: np.ndarray, ca: np.ndarray, ja: np.ndarray):
    """Concave chains from Pareto fronts ([n, W], cost and quality increasing, +inf padded).

    Each round drops, in every unfinished row, the points whose incoming efficiency is <= their
    outgoing one (on or below their neighbours' chord) and the cheaper of two equal-cost points.
    A row is final when nothing is dropped: its efficiencies, computed exactly as the solver
    computes them (dq / dc in float64), are then strictly decreasing.
    """
    out = [np.full_like(a, fill) for a, fill in ((qa, np.inf), (ca, np.inf), (ja, NO_ARM))]
    rows = np.arange(qa.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        while rows.size:
            dq, dc = qa[:, 1:] - qa[:, :-1], cost_steps(ca[:, 1:], ca[:, :-1])
            drop = np.zeros(qa.shape, bool)
            np.equal(dc, 0, out=drop[:, :-1])
            drop[:, 1:-1] |= dq[:, :-1] / dc[:, :-1] <= dq[:, 1:] / dc[:, 1:]
            final = ~drop.any(axis=1)
            for o, a in zip(out, (qa, ca, ja)):
                o[rows[final], :a.shape[1]] = a[final]
            rows, live = rows[~final], ~final
            src, r, slot, width = _compact(~drop[live] & (ca[live] < np.inf))
            dst = r * width + slot
            qa, ca, ja = (_packed(a[live].ravel()[src], dst, (rows.size, width), fill)
                          for a, fill in ((qa, np.inf), (ca, np.inf), (ja, NO_ARM)))
    return out


def cost_steps(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """high - low rounded up where the float difference falls below the exact one, as the
    kernel's ``cost_step`` (inf and NaN padding pass through)."""
    diff = high - low
    with np.errstate(invalid="ignore"):
        short = (high - diff) - low > 0
    return np.where(short, np.nextafter(diff, np.inf), diff)


def _chains_to_csr(qa: np.ndarray, ca: np.ndarray, ja: np.ndarray) -> dict:
    """Base arrays and CSR steps from per-row concave chains ([n, W], +inf padded)."""
    n = qa.shape[0]
    has_base = ca[:, 0] < np.inf
    base_q = np.where(has_base, qa[:, 0], 0.0)
    base_c = np.where(has_base, ca[:, 0], 0.0)
    is_step = ca[:, 1:] < np.inf
    counts = is_step.sum(axis=1)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    with np.errstate(invalid="ignore"):  # inf - inf in the padding
        dq = (qa[:, 1:] - qa[:, :-1])[is_step]
        dc = cost_steps(ca[:, 1:], ca[:, :-1])[is_step]
    return dict(base_arm=ja[:, 0].astype(np.int32), base_q=base_q, base_c=base_c,
                offsets=offsets, step_arm=ja[:, 1:][is_step].astype(np.int32), dq=dq, dc=dc,
                key=reference_efficiency_key(dq / dc))
