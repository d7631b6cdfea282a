"""Numba kernel of ``hull_steps``: one pass over the query rows, each row hulled in turn.

Per row of K arms (cost c USD, quality q; float32 values widened to float64 exactly):
1. mark NaN/inf arms (counted) so that they sort last and never enter the front;
2. bucket the arms by the float bits of their cost (monotone in the cost, a log scale), and drop
   every arm whose quality does not beat the best quality of a cheaper bucket (it is dominated);
3. sort the rest by cost, ties by arm index (a counting sort over the buckets finished by an
   insertion sort, which then only moves arms sharing a bucket);
4. keep the Pareto front: arms whose quality beats every cheaper arm, the best of equal costs
   (the lowest index of exact duplicates); costs and qualities then strictly increase;
5. gift-wrap the front from its cheapest arm: the next vertex is the arm of steepest float64
   slope (q - q_cur) / (c - c_cur), the cheapest one on an exact tie;
6. peel: in rounds, drop at once every inner vertex whose incoming efficiency dq/dc (float64) is
   <= its outgoing one, until the efficiencies strictly decrease (near-collinear vertices).
A step's dc is the cost difference rounded up (``cost_step``), so that a chain's exact sum of
steps never falls below its vertex's cost: the solve's spend bound rests on it.
Only comparisons choose the front, and the slopes are the float64 operations of the vectorised
numpy hull this kernel replaced, so the hull is the same bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

NO_ARM = -1                # base_arm of a query with no valid arm
_BLOCK_ROWS = 64           # rows between two checks that the step buffers have room
_ARMS_PER_BUCKET = 2       # cost buckets per row: K / this
_INF_BITS = np.int64(0x7FF0000000000000)    # float64 bits of +inf
_LOW_63 = np.int64(0x7FFFFFFFFFFFFFFF)
_SHRINK = 1.0 - 2.0**-51   # see _gift_wrap
_SMALLEST_SAFE = 1e-300    # products below this may be subnormal: no skipping there
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_FLT_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


@njit(cache=True, nogil=True)
def hull_rows(q, c):
    """Hull chains of q, c ([n, K] each, C-contiguous float32 or float64).

    Returns (base_arm, base_q, base_c, offsets, step_arm, dq, dc, key, invalid_arms, bad_row,
    bad_arm); bad_row >= 0 names the first negative cost (row-major), and the other outputs are
    then incomplete.
    """
    n, k = q.shape
    rows = (np.full(n, NO_ARM, np.int32), np.zeros(n), np.zeros(n), np.zeros(n + 1, np.int64),
            np.zeros(n, np.int32))           # base_arm, base_q, base_c, offsets, invalid_arms
    size = 4 * _BLOCK_ROWS * k               # grown once the first rows show the chain lengths
    steps = (np.empty(size, np.int32), np.empty(size), np.empty(size),
             np.empty(size, np.float32))    # step_arm, dq, dc, key
    n_buckets = max(1, k // _ARMS_PER_BUCKET)
    work = (np.empty(k), np.empty(k), np.empty(k, np.int64), np.empty(k, np.int64),
            np.empty(n_buckets + 1, np.int64), np.empty(n_buckets, np.int64),
            np.empty(k, np.int64), np.empty(k), np.empty(k), np.empty(k, np.int64),
            np.empty(k, np.bool_))
    start, total = np.int64(0), np.int64(0)   # typed, not literal: one compilation only
    while True:
        start, total, bad_row, bad_arm = _hull_while_room(q, c, start, rows, steps, total, work)
        if start == n or bad_row >= 0:
            break
        size = max(2 * size, int(1.2 * total / start * n) + _BLOCK_ROWS * k)
        steps = (_grown(steps[0], total, size), _grown(steps[1], total, size),
                 _grown(steps[2], total, size), _grown(steps[3], total, size))
    base_arm, base_q, base_c, offsets, invalid = rows
    return (base_arm, base_q, base_c, offsets, steps[0][:total], steps[1][:total],
            steps[2][:total], steps[3][:total], invalid, bad_row, bad_arm)


@njit(cache=True, nogil=True)
def _hull_while_room(q, c, start, rows, steps, total, work):
    """Hull rows from ``start`` while the step buffers have room for a block's longest chains.
    Returns (next row, steps written, bad_row, bad_arm) as ``hull_rows``."""
    n, k = q.shape
    base_arm, base_q, base_c, offsets, invalid = rows
    step_arm, dq, dc, key = steps
    arm_q, arm_c, arm_rank, bucket, first, best_below, kept, front_q, front_c, front_j, drop = work
    arm_bits = arm_c.view(np.int64)
    while start < n and total + _BLOCK_ROWS * k <= step_arm.size:
        stop = min(n, start + _BLOCK_ROWS)
        for i in range(start, stop):
            n_invalid, bad = _load_row(q[i], c[i], arm_q, arm_c, arm_rank)
            if bad >= 0:
                return i, total, i, bad
            invalid[i] = n_invalid
            if n_invalid < k:
                _cost_buckets(arm_bits, bucket, best_below.size)
                n_kept = _undominated_by_cheaper_buckets(arm_rank, bucket, best_below, kept)
                _sort_by_cost(arm_q, arm_c, bucket, kept, n_kept, first, front_q, front_c,
                              front_j)
                n_front = _pareto_front(front_q, front_c, front_j, n_kept)
                n_vert = _gift_wrap(front_q, front_c, front_j, n_front)
                n_vert = _peel(front_q, front_c, front_j, n_vert, drop)
                base_arm[i], base_q[i], base_c[i] = front_j[0], front_q[0], front_c[0]
                total = _emit_steps(front_q, front_c, front_j, n_vert, step_arm, dq, dc, key,
                                    total)
            offsets[i + 1] = total
        start = stop
    return start, total, -1, -1


@njit(cache=True, nogil=True)
def efficiency_key_of(eff):
    """float32 key of one float64 efficiency: rounded toward zero, clipped to (0, FLT_MAX]."""
    key = np.float32(eff)
    if np.float64(key) > eff:                # one float32 step toward zero
        key = np.float32(0) if key == 0 else np.int32(key.view(np.int32) - 1).view(np.float32)
    if key < _FLT_TINY:
        key = _FLT_TINY
    elif key > _FLT_MAX:
        key = _FLT_MAX
    return key


@njit(cache=True, nogil=True)
def efficiency_keys(eff, out):
    """``efficiency_key_of`` of every efficiency in ``eff`` into ``out`` (float32)."""
    for t in range(eff.size):
        out[t] = efficiency_key_of(eff[t])


@njit(cache=True, nogil=True)
def _load_row(q_row, c_row, arm_q, arm_c, arm_rank):
    """One row as float64; a NaN/inf arm gets q = -inf, c = +inf (it sorts last and never
    enters the front). ``arm_rank``: q's bits as integers ordered like q (-0.0 just below 0.0).
    Returns (NaN/inf arm count, first arm with a negative cost or -1)."""
    n_invalid, negative = 0, False
    for j in range(q_row.size):
        qj, cj = np.float64(q_row[j]), np.float64(c_row[j])
        valid = np.isfinite(qj) and np.isfinite(cj)
        arm_q[j] = qj if valid else -np.inf
        arm_c[j] = cj if valid else np.inf
        n_invalid += not valid
        negative |= cj < 0
    bits = arm_q.view(np.int64)
    for j in range(q_row.size):
        arm_rank[j] = bits[j] ^ ((bits[j] >> 63) & _LOW_63)
    if negative:
        for j in range(c_row.size):
            if c_row[j] < 0:
                return n_invalid, j
    return n_invalid, -1


@njit(cache=True, nogil=True)
def _cost_buckets(arm_bits, bucket, n_buckets):
    """Bucket of every arm, monotone in its cost: the float64 bits scaled linearly from the
    cheapest positive finite cost's bits (bucket 0, with zero costs) to the dearest's (the
    last bucket, with the NaN/inf arms). Integer bit arithmetic keeps this loop vectorised."""
    k = arm_bits.size
    low, high = _INF_BITS, np.int64(0)
    for t in range(k):
        bits = arm_bits[t]
        positive = bits > 0 and bits < _INF_BITS
        low = min(low, bits if positive else _INF_BITS)
        high = max(high, bits if positive else 0)
    last = n_buckets - 1.0
    scale = last / max(1.0, np.float64(high - low))
    for t in range(k):      # -0.0's bits are negative; +inf's may scale past any int64
        above_low = np.float64(max(arm_bits[t], low) - low)
        bucket[t] = np.int64(min(above_low * scale, last))


@njit(cache=True, nogil=True)
def _undominated_by_cheaper_buckets(arm_rank, bucket, best_below, kept):
    """Arms whose quality rank beats every arm's in a cheaper bucket (the others have a cheaper
    arm at least as good: dominated), in arm order, into ``kept``; returns their count."""
    k = arm_rank.size
    lowest = np.int64(-_LOW_63 - 1)
    best_below[:] = lowest
    for t in range(k):                       # best rank per bucket
        best_below[bucket[t]] = max(best_below[bucket[t]], arm_rank[t])
    best = lowest
    for b in range(best_below.size):         # best rank of the cheaper buckets
        here = best_below[b]
        best_below[b] = best
        best = max(best, here)
    n_kept = 0
    for t in range(k):                       # branch-free compaction
        kept[n_kept] = t
        n_kept += arm_rank[t] > best_below[bucket[t]]
    return n_kept


@njit(cache=True, nogil=True)
def _sort_by_cost(arm_q, arm_c, bucket, kept, n_kept, first, front_q, front_c, front_j):
    """The kept arms sorted by cost, ties by arm index: a counting sort by bucket (arm order
    kept inside one), then an insertion sort that only moves arms sharing a bucket."""
    first[:] = 0
    for s in range(n_kept):
        first[bucket[kept[s]] + 1] += 1
    for b in range(first.size - 1):
        first[b + 1] += first[b]
    for s in range(n_kept):
        t = kept[s]
        at = first[bucket[t]]
        first[bucket[t]] = at + 1
        front_q[at], front_c[at], front_j[at] = arm_q[t], arm_c[t], t
    dearest = front_c[0]
    for s in range(1, n_kept):
        ct = front_c[s]
        if ct >= dearest:                    # already in place (the usual case)
            dearest = ct
            continue
        qt, jt, at = front_q[s], front_j[s], s
        while at > 0 and front_c[at - 1] > ct:
            front_q[at], front_c[at], front_j[at] = front_q[at - 1], front_c[at - 1], front_j[at - 1]
            at -= 1
        front_q[at], front_c[at], front_j[at] = qt, ct, jt


@njit(cache=True, nogil=True)
def _pareto_front(front_q, front_c, front_j, n):
    """Compact the cost-sorted arms, in place, to those beating every cheaper arm's quality,
    keeping only the best of equal costs; returns their count. Branch-free: a point that is
    not kept is written to the first free slot, which the next kept point overwrites."""
    n_front = 1
    last_q, last_c = front_q[0], front_c[0]
    for t in range(1, n):
        qt, ct, jt = front_q[t], front_c[t], front_j[t]
        better = qt > last_q
        at = n_front - 1 if (better and ct == last_c) else n_front
        front_q[at], front_c[at], front_j[at] = qt, ct, jt
        n_front = at + 1 if better else n_front
        last_q = qt if better else last_q
        last_c = ct if better else last_c
    return n_front


@njit(cache=True, nogil=True)
def _gift_wrap(front_q, front_c, front_j, n_front):
    """Hull vertices of a Pareto front (costs and qualities increasing), collinear ones
    included, compacted in place: from the cheapest, repeatedly the steepest later point (the
    first on a tie); returns their count.

    A point is skipped without dividing when dq < bound = fl(fl(best_slope * dc) * (1 - 2^-51)):
    with no underflow the bound is below the exact best_slope * dc, so dq / dc rounds to at most
    best_slope and could not replace the best (ties keep the first). The scan stops once even
    the front's best quality would fail that test: later points have larger dc and no larger dq.
    """
    cur, n_vert = 0, 1
    top_q = front_q[n_front - 1]
    while cur < n_front - 1:
        cur_q, cur_c = front_q[cur], front_c[cur]
        best, best_slope = cur + 1, (front_q[cur + 1] - cur_q) / (front_c[cur + 1] - cur_c)
        top_dq = top_q - cur_q
        for t in range(cur + 2, n_front):
            dq, dc = front_q[t] - cur_q, front_c[t] - cur_c
            bound = best_slope * dc * _SHRINK
            if dq < bound and bound >= _SMALLEST_SAFE:
                if top_dq < bound:
                    break
                continue
            slope = dq / dc
            if slope > best_slope:
                best, best_slope = t, slope
        cur = best
        front_q[n_vert], front_c[n_vert], front_j[n_vert] = front_q[cur], front_c[cur], front_j[cur]
        n_vert += 1
    return n_vert


@njit(cache=True, nogil=True)
def _peel(vert_q, vert_c, vert_j, n_vert, drop):
    """Drop, round by round and all at once, every inner vertex whose incoming dq/dc is <= its
    outgoing one; returns the count left (float64 efficiencies then strictly decrease)."""
    while n_vert > 2:
        dropped = False
        eff_in = (vert_q[1] - vert_q[0]) / cost_step(vert_c[1], vert_c[0])
        for t in range(1, n_vert - 1):
            eff_out = (vert_q[t + 1] - vert_q[t]) / cost_step(vert_c[t + 1], vert_c[t])
            drop[t] = eff_in <= eff_out
            dropped |= drop[t]
            eff_in = eff_out
        if not dropped:
            return n_vert
        kept = 1
        for t in range(1, n_vert):
            if t == n_vert - 1 or not drop[t]:
                vert_q[kept], vert_c[kept], vert_j[kept] = vert_q[t], vert_c[t], vert_j[t]
                kept += 1
        n_vert = kept
    return n_vert


@njit(cache=True, nogil=True)
def _emit_steps(vert_q, vert_c, vert_j, n_vert, step_arm, dq, dc, key, total):
    """Append the chain's steps at ``total``; returns the new total."""
    for t in range(1, n_vert):
        step_arm[total] = vert_j[t]
        dq[total] = vert_q[t] - vert_q[t - 1]
        dc[total] = cost_step(vert_c[t], vert_c[t - 1])
        key[total] = efficiency_key_of(dq[total] / dc[total])
        total += 1
    return total


@njit(cache=True, nogil=True)
def cost_step(high, low):
    """high - low (USD, high > low >= 0) rounded up, not to nearest: the float difference of
    costs 2x apart can fall an ulp below the exact one, and summed steps would then count a
    vertex as cheaper than it is (its spend could pass the budget). Fast2Sum gives the exact
    rounding error of the difference."""
    diff = high - low
    if (high - diff) - low > 0:              # diff + that error == high - low exactly
        diff = np.nextafter(diff, np.inf)
    return diff


@njit(cache=True, nogil=True)
def _grown(buffer, used, size):
    """A buffer of ``size`` entries starting with the first ``used`` of ``buffer``."""
    out = np.empty(size, buffer.dtype)
    out[:used] = buffer[:used]
    return out
