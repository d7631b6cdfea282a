"""Exact fixed-point sums, sparse histograms, the radix walk, the tie hash, the passes' sizes."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r2ray.solver import hull_steps, solve_budget, tie_hash
from r2ray.solver.blocks import blocks_of
from r2ray.solver.budget import LocalPasses
from r2ray.solver.search import run_solve
from r2ray.solver.select import (
    N_BINS, Hist, exact_bincount, exact_float_sums, exponent_counts, floor_quanta,
    quantum_exponent, walk)


def test_walk_finds_the_bin_where_the_running_total_passes_the_target():
    hist = Hist(np.array([1, 4, 9]), np.array([1, 2, 3]), np.array([10, 20, 30]))
    pick = walk(hist, 35, descending=True)            # 30 (bin 9), then 20 (bin 4) passes 35
    assert (pick.digit, pick.before, pick.count, pick.weight) == (4, 30, 2, 20)
    assert walk(hist, 29, descending=True).digit == 9
    assert walk(hist, 10, descending=False).digit == 4
    assert walk(hist, 9, descending=False).digit == 1


def test_histograms_merge_exactly_whatever_the_split():
    rng = np.random.default_rng(0)
    bins = rng.integers(0, 3 * N_BINS, 5000)
    weights = rng.integers(0, 2**49, 5000)             # totals < 2**62, as in a solve
    whole = Hist.of(bins, weights, 3)
    halves = Hist.of(bins[:1234], weights[:1234], 3).merge(Hist.of(bins[1234:], weights[1234:], 3))
    for name in ("index", "count", "weight"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(halves, name))
    assert whole.total() == sum(int(w) for w in weights)
    assert whole.group(1).index.max() < N_BINS


def test_exact_bincount_is_exact_near_the_int64_limit():
    values = np.full(3000, 2**52 + 12345, np.int64)     # per-bin sums near 2**62.6
    bins = np.arange(3000) % 2
    assert exact_bincount(bins, values, 2).tolist() == [1500 * (2**52 + 12345)] * 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300) | st.floats(-1e-300, 1e-300), max_size=40),
       st.integers(1, 3))
def test_exact_float_sums_are_exact(values, n_groups):
    values = np.array(values, np.float64)
    groups = np.arange(values.size) % n_groups
    sums = exact_float_sums(values, groups, n_groups)
    for g in range(n_groups):
        exact = sum((Fraction(float(v)) for v in values[groups == g]), Fraction(0))
        assert Fraction(sums[g]) / 2**1074 == exact


def test_quantum_keeps_totals_below_2_to_61_and_ignores_order():
    rng = np.random.default_rng(1)
    values = rng.random(10_000) * 1e3
    e = quantum_exponent(exponent_counts(values))
    assert values.sum() / 2.0**e < 2**61 and values.sum() / 2.0**e > 2**58
    parts = exponent_counts(values[:10]) + exponent_counts(values[10:])
    assert quantum_exponent(parts) == e


def test_floor_quanta_is_exact():
    assert floor_quanta(1.5, -1) == 3 and floor_quanta(1.4, 0) == 1
    assert floor_quanta(0.1, -1074) == int(Fraction(0.1) * 2**1074)
    assert floor_quanta(1e300, -1074) > 0 and floor_quanta(float("inf"), 0) > 2**1000


def test_tie_hash_is_deterministic_and_seeded():
    keys = np.arange(1000, dtype=np.uint64)
    a, b = tie_hash(0, keys), tie_hash(1, keys)
    assert a.dtype == np.uint32 and (a == tie_hash(0, keys)).all() and (a != b).mean() > 0.99
    assert 0.45 < (a < 2**31).mean() < 0.55
    assert tie_hash(7, [12345])[0] == tie_hash(7, keys[:0].tolist() + [12345])[0]


class RecordingPasses(LocalPasses):
    """LocalPasses that records the size of every merged pass result the driver receives."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sizes = []

    def reduce(self, fn, args, merge):
        out = super().reduce(fn, args, merge)
        self.sizes.append(max(_array_sizes(out), default=0))
        return out


def _array_sizes(obj):
    if isinstance(obj, np.ndarray):
        yield obj.size
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _array_sizes(item)
    elif hasattr(obj, "__dict__"):
        yield from _array_sizes(tuple(obj.__dict__.values()))


@pytest.mark.parametrize("n_queries", [2_000, 40_000])
def test_the_driver_sees_only_histograms_and_scalars(n_queries):
    rng = np.random.default_rng(2)
    q, c = rng.random((n_queries, 16)).round(2), rng.random((n_queries, 16)).round(3)
    steps = hull_steps(q, c)
    budget = steps.base_c.sum() + 0.4 * steps.dc.sum()
    passes = RecordingPasses(blocks_of(steps, block_queries=1000))
    outcome, _ = run_solve(passes, [budget], seed=0, fill_limit=256)
    assert max(passes.sizes) <= max(N_BINS, 2048)          # never grows with the backlog
    single = solve_budget(steps, budget, fill_limit=256).certificate
    assert outcome.selection.lam64[0] == np.float64(single.lam).view(np.uint64)


@pytest.mark.parametrize("exponent", [-1074, -1060, -1022, -60, -40, 0, 17, 1022, 1030])
def test_quanta_round_as_ldexp_does_at_every_exponent(exponent):
    """The one-pass kernel multiplies by 2**-exponent where that is a float64 and calls ldexp
    elsewhere; both must give numpy's ceil / rint of ldexp, subnormals and halves included,
    except that rounded up a positive value is at least one quantum (ldexp underflows to 0)."""
    from r2ray.solver.blocks import to_quanta
    rng = np.random.default_rng(exponent + 2000)
    values = np.concatenate([
        rng.random(2000) * 2.0 ** rng.integers(-1074, 40, 2000),
        np.ldexp(np.arange(-8, 9) / 2, exponent),         # exact halves of a quantum
        [0.0, 5e-324, 2.2250738585072014e-308, 1.0]])
    scaled = np.ldexp(values, -exponent)
    values = values[np.isfinite(scaled) & (np.abs(scaled) < 2.0 ** 62)]
    scaled = scaled[np.isfinite(scaled) & (np.abs(scaled) < 2.0 ** 62)]
    ceil = np.where(values > 0, np.maximum(np.ceil(scaled), 1), np.ceil(scaled))
    assert np.array_equal(to_quanta(values, exponent, True), ceil.astype(np.int64))
    assert np.array_equal(to_quanta(values, exponent, False), np.rint(scaled).astype(np.int64))


@pytest.mark.parametrize("n_groups,distinct", [(1, 10**9), (1, 7), (3, 10**9), (3, 5)])
def test_fill_candidates_rank_as_the_full_lexsort_does(n_groups, distinct):
    """The fill's shortcuts (partition to the top keys, one argsort unless efficiencies tie)
    keep exactly the candidates, in exactly the order, of the plain four-key lexsort."""
    from r2ray.solver.passes import _top
    rng = np.random.default_rng(n_groups * distinct % 97)
    n, limit = 3000, 700
    group = rng.integers(0, n_groups, n).astype(np.int64)
    key64 = rng.integers(1, distinct + 1, n).astype(np.uint64) << np.uint64(20)
    hash_ = rng.integers(0, 50, n).astype(np.int64)
    pos = rng.permutation(n).astype(np.int64)
    dc_q = rng.integers(1, 100, n).astype(np.int64)
    top = _top(group, key64, hash_, pos, dc_q, limit=limit)
    order = np.lexsort((pos, hash_, ~key64, group))
    g = group[order]
    keep = order[np.arange(n) - np.searchsorted(g, g) < limit]
    assert np.array_equal(top.pos, pos[keep]) and np.array_equal(top.group, group[keep])
    assert np.array_equal(top.dc_q, dc_q[keep])
