"""hull_steps: hand cases, a property test against a brute-force gift wrap, and the numba
kernel against the numpy hull it replaced, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from r2ray.solver import NO_ARM, concat_steps, efficiency_key, hull_steps
from hull_numpy_reference import reference_efficiency_key, reference_hull_steps
from solver_highs import instances


def chain(q, c, row: int = 0):
    """(base arm, [step arms]) of one query."""
    steps = hull_steps(np.asarray(q, np.float64)[None] if np.ndim(q) == 1 else q,
                       np.asarray(c, np.float64)[None] if np.ndim(c) == 1 else c)
    lo, hi = steps.offsets[row], steps.offsets[row + 1]
    return int(steps.base_arm[row]), steps.step_arm[lo:hi].tolist()


def brute_force_chain(q_row, c_row):
    """Reference: start at the cheapest (then best) arm; repeatedly take the steepest
    improving arm, the farthest one on ties."""
    q_row, c_row = np.asarray(q_row, np.float64), np.asarray(c_row, np.float64)
    valid = np.flatnonzero(np.isfinite(q_row) & np.isfinite(c_row))
    if valid.size == 0:
        return NO_ARM, []
    current = min(valid, key=lambda j: (c_row[j], -q_row[j], j))
    base, steps = int(current), []
    while True:
        best, best_slope = None, -np.inf
        for j in valid:
            dq, dc = q_row[j] - q_row[current], c_row[j] - c_row[current]
            if dq > 0 and dc > 0 and (dq / dc > best_slope or
                                      (dq / dc == best_slope and c_row[j] > c_row[best])):
                best, best_slope = j, dq / dc
        if best is None:
            return base, steps
        steps.append(int(best))
        current = best


def test_equal_costs_keep_the_better_arm():
    assert chain([0.2, 0.5, 0.6], [1.0, 1.0, 2.0]) == (1, [2])


def test_equal_qualities_keep_the_cheaper_arm():
    assert chain([0.5, 0.5, 0.75], [1.0, 2.0, 3.0]) == (0, [2])


def test_collinear_middle_point_is_not_a_vertex():
    assert chain([0.25, 0.5, 0.75], [1.0, 2.0, 3.0]) == (0, [2])


def test_dominated_and_below_chord_arms_are_dropped():
    # arm 1 costs more than arm 3 for less quality; arm 2 sits below the chord 0 -> 3
    assert chain([0.0, 0.3, 0.1, 1.0], [0.0, 3.0, 1.0, 2.0]) == (0, [3])


def test_nan_and_inf_arms_are_removed_and_counted():
    q = np.array([[np.nan, 0.5, 0.9], [np.nan, np.nan, np.nan]])
    c = np.array([[0.1, np.inf, 2.0], [1.0, 2.0, 3.0]])
    steps = hull_steps(q, c)
    assert steps.invalid_arms.tolist() == [2, 3] and steps.n_invalid_arms == 5
    assert steps.base_arm.tolist() == [2, NO_ARM] and steps.n_steps == 0
    assert steps.base_q.tolist() == [0.9, 0.0] and steps.base_c.tolist() == [2.0, 0.0]


def test_single_arm_query_has_no_steps():
    steps = hull_steps(np.array([[0.7]]), np.array([[0.2]]))
    assert steps.base_arm.tolist() == [0] and steps.n_steps == 0
    assert steps.offsets.tolist() == [0, 0]


def test_identical_arms_keep_the_lowest_index():
    assert chain([0.5, 0.5, 0.5], [1.0, 1.0, 1.0]) == (0, [])


def test_step_values_and_keys():
    steps = hull_steps(np.array([[0.1, 0.6, 0.7]]), np.array([[0.5, 1.0, 3.0]]))
    assert steps.step_arm.tolist() == [1, 2]
    np.testing.assert_allclose(steps.dq, [0.5, 0.1])
    np.testing.assert_allclose(steps.dc, [0.5, 2.0])
    assert steps.key.dtype == np.float32 and steps.key.tolist() == pytest.approx([1.0, 0.05])


def test_costs_that_share_float32_bits_are_still_ordered_exactly():
    # both costs round to the same float32; the float64 order decides the hull
    c = np.array([[1.0 + 2.0**-40, 1.0, 2.0]])
    q = np.array([[0.9, 0.1, 0.95]])
    assert chain(q, c) == (1, [0, 2])


def test_rows_are_independent_of_their_chunk():
    rng = np.random.default_rng(0)
    q, c = rng.random((300, 20)), rng.random((300, 20))
    whole = hull_steps(q, c, chunk_rows=300)
    pieces = hull_steps(q, c, chunk_rows=7)
    for name in ("base_arm", "offsets", "step_arm", "dq", "dc", "key"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(pieces, name))


def test_slice_take_and_concat_round_trip():
    rng = np.random.default_rng(1)
    steps = hull_steps(rng.random((50, 8)), rng.random((50, 8)))
    joined = concat_steps([steps.slice(0, 20), steps.slice(20, 50)])
    taken = steps.take(np.arange(50))
    for other in (joined, taken):
        for name in ("base_arm", "offsets", "step_arm", "dq", "dc", "key"):
            np.testing.assert_array_equal(getattr(other, name), getattr(steps, name))
    picked = steps.take(np.array([7, 3]))
    assert picked.base_arm.tolist() == steps.base_arm[[7, 3]].tolist()


def test_empty_backlog():
    steps = hull_steps(np.zeros((0, 4), np.float32), np.zeros((0, 4)))
    assert steps.n_queries == 0 and steps.offsets.tolist() == [0]


@pytest.mark.parametrize("q, c, match", [
    (np.zeros((2, 3)), np.zeros((2, 4)), "shape"),
    (np.zeros((2, 3)), -np.ones((2, 3)), "costs must be >= 0"),
    (np.zeros(3), np.zeros(3), "shape"),
])
def test_bad_inputs_say_how_to_fix(q, c, match):
    with pytest.raises(ValueError, match=match):
        hull_steps(q, c)


def test_efficiency_key_rounds_toward_zero_and_stays_positive():
    eff = np.array([1.0 + 2.0**-30, 0.1, 3.0, 1e-60, 1e60])
    key = efficiency_key(eff)
    assert (key[:3].astype(np.float64) <= eff[:3]).all() and key[0] == np.float32(1.0)
    assert key[3] == np.finfo(np.float32).smallest_subnormal      # clipped, still positive
    assert key[4] == np.finfo(np.float32).max
    assert (np.diff(efficiency_key(np.sort(np.random.default_rng(0).random(1000)))) >= 0).all()


def off_frontier(q_row, c_row, found: tuple[int, list[int]], vertices: tuple[int, list[int]]
                 ) -> float:
    """How far (quality, relative) the arms of ``found`` that ``vertices`` lacks lie from the
    frontier through ``vertices``: 0 when the two chains draw the same frontier."""
    arms = [vertices[0], *vertices[1]]
    extra = sorted(set(found[1]) - set(arms))
    if not extra:
        return 0.0
    gap = np.abs(np.interp(c_row[extra], c_row[arms], q_row[arms]) - q_row[extra])
    return float((gap / np.maximum(1.0, np.abs(q_row[extra]))).max())


@settings(max_examples=300, deadline=None)
@given(instances(max_queries=5, max_arms=7))
# three arms collinear in exact terms up to 3e-17: from arm 4, the float64 slopes to 5 and to 2
# both round to 0.4 (the brute force's tie, farthest wins), while the kernel keeps 5, whose slope
# is exactly larger (its float64 efficiencies 0.4 then 0.39999999999999997 strictly decrease)
@example(instance=(np.array([[0.0, 0.0, 0.5, 0.0, 0.1, 0.2]]),
                   np.array([[0.0, 0.0, 1.0, 0.0, 0.0, 0.25]])))
def test_hull_matches_brute_force(instance):
    q, c = instance
    steps = hull_steps(q, c)
    for i in range(q.shape[0]):
        found, expected = chain(q, c, i), brute_force_chain(q[i], c[i])
        # the same chain, or one that differs only by vertices collinear within rounding
        assert found[0] == expected[0] and found[1][-1:] == expected[1][-1:], (found, expected)
        assert off_frontier(q[i], c[i], found, expected) <= 1e-12, (found, expected)
        assert off_frontier(q[i], c[i], expected, found) <= 1e-12, (found, expected)
    eff = steps.dq / steps.dc
    for i in range(steps.n_queries):
        chain_eff = eff[steps.offsets[i]:steps.offsets[i + 1]]
        assert (np.diff(chain_eff) < 0).all()
    assert (steps.dq > 0).all() and (steps.dc > 0).all()
    np.testing.assert_array_equal(steps.key, efficiency_key(eff))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_float32_and_float64_inputs_give_the_same_hull(k, seed):
    rng = np.random.default_rng(seed)
    q = rng.random((20, k)).astype(np.float32)
    c = (rng.random((20, k)) * rng.choice([1e-6, 1.0, 1e3])).astype(np.float32)
    a, b = hull_steps(q, c), hull_steps(q.astype(np.float64), c.astype(np.float64))
    for name in ("base_arm", "offsets", "step_arm", "dq", "dc"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# --- the numba kernel against the numpy hull it replaced (tests/hull_numpy_reference.py) ---

HULL_FIELDS = ("base_arm", "base_q", "base_c", "offsets", "step_arm", "dq", "dc", "key",
               "invalid_arms")


def assert_bit_identical(steps, reference):
    for name in HULL_FIELDS:
        got, want = getattr(steps, name), getattr(reference, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name       # -0.0 and 0.0 differ here


QUANTISED_Q = [0.0, -0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
QUANTISED_C = [0.0, -0.0, 0.25, 0.5, 1.0, 1.5, 3.0, 0.1, 0.2, 0.3]


@st.composite
def hard_rows(draw, max_queries: int = 6, max_arms: int = 24):
    """(q, c): quantised ties, exact and rounded collinear points, wide magnitudes (subnormal
    to huge), NaN/inf holes; float32, float64 or mixed."""
    n, k = draw(st.integers(1, max_queries)), draw(st.integers(1, max_arms))
    style = draw(st.sampled_from(["quantised", "collinear", "wide"]))
    size = dict(min_size=n * k, max_size=n * k)
    if style == "quantised":
        q = draw(st.lists(st.sampled_from(QUANTISED_Q), **size))
        c = draw(st.lists(st.sampled_from(QUANTISED_C), **size))
    elif style == "collinear":    # q = slope * c (+ an intercept), exact or rounded
        slope = draw(st.sampled_from([0.125, 0.1, 3.0, 1e-9]))
        c = draw(st.lists(st.integers(0, 8).map(lambda x: x * 0.5), **size))
        q = [slope * x + draw(st.sampled_from([0.0, 0.3, 5e-17])) for x in c]
    else:                         # slopes that overflow, underflow or go subnormal
        q = draw(st.lists(st.floats(-1e300, 1e300), **size))
        c = draw(st.lists(st.floats(0, 1e300) | st.sampled_from([5e-324, 1e-310, 1e-300]),
                          **size))
    q, c = np.array(q).reshape(n, k), np.array(c).reshape(n, k)
    holes = np.array(draw(st.lists(st.sampled_from(["ok"] * 8 + ["nan_q", "inf_q", "nan_c",
                                                                 "inf_c"]), **size))).reshape(n, k)
    q[holes == "nan_q"], q[holes == "inf_q"] = np.nan, -np.inf
    c[holes == "nan_c"], c[holes == "inf_c"] = np.nan, np.inf
    dtypes = draw(st.sampled_from([(np.float64, np.float64), (np.float32, np.float32),
                                   (np.float32, np.float64), (np.float64, np.float32)]))
    with np.errstate(over="ignore"):
        return q.astype(dtypes[0]), c.astype(dtypes[1])


@settings(max_examples=400, deadline=None)
@given(hard_rows())
def test_kernel_matches_the_numpy_hull_bit_for_bit(instance):
    q, c = instance
    assert_bit_identical(hull_steps(q, c), reference_hull_steps(q, c))


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_the_numpy_hull_on_wide_rows(seed):
    """176 arms like the benchmark's: 11 models x 16 budgets, many equal costs, 5% holes."""
    rng = np.random.default_rng(seed)
    n, models = 500, 11
    tokens = np.minimum([10, 20, 30, 40, 50, 80, 100, 150, 200, 300, 500, 800, 1200, 2000,
                         4000, 10**6], rng.integers(100, 700, (n, models, 1)))
    price = rng.choice([1e-7, 4e-7, 1.5e-6, 1e-5], models)[None, :, None]
    c = (rng.integers(50, 500, (n, 1, 1)) * price / 4 + tokens * price).reshape(n, -1)
    q = np.round(rng.random((n, models, 1)) * (1 - np.exp(-tokens / 300)), seed).reshape(n, -1)
    q[rng.random(q.shape) < 0.05] = np.nan
    for dtype in (np.float64, np.float32):
        qd, cd = q.astype(dtype), c.astype(dtype)
        assert_bit_identical(hull_steps(qd, cd), reference_hull_steps(qd, cd))


def test_long_chains_grow_the_step_buffers():
    # 176 arms on a strictly concave curve: every arm is a vertex, 175 steps per query
    c = np.tile(np.arange(176.0), (2000, 1))
    q = np.sqrt(c) * np.linspace(1.0, 2.0, 2000)[:, None]
    steps = hull_steps(q, c)
    assert (steps.steps_per_query == 175).all()
    assert_bit_identical(steps, reference_hull_steps(q, c))


def test_layouts_and_dtypes_do_not_change_the_hull():
    rng = np.random.default_rng(3)
    q, c = (rng.random((40, 30)) * 10).round(), rng.random((40, 30))
    want = hull_steps(q, c)
    strided = np.zeros((40, 60))
    strided[:, ::2] = q
    for other_q, other_c in ((np.asfortranarray(q), np.asfortranarray(c)),   # copied per chunk
                             (strided[:, ::2], c),
                             (q.astype(np.int64), c),                         # widened
                             (q.astype(np.float32), c)):                      # mixed dtypes
        assert_bit_identical(hull_steps(other_q, other_c, chunk_rows=16), want)


def test_negative_cost_in_a_later_chunk_names_its_row():
    c = np.ones((10, 3))
    c[7, 2] = -0.5
    with pytest.raises(ValueError, match=r"c\[7, 2\] = -0\.5\. Use NaN"):
        hull_steps(np.ones((10, 3)), c, chunk_rows=4)


def test_a_quality_gain_that_overflows_names_its_row():
    # finite q̂ 3e308 apart: the step's dq was inf, and the solve then failed with a bare
    # OverflowError (or reported an objective of -1.5e308 with an lp_value of inf)
    q = np.zeros((10, 2))
    q[6] = -1.5e308, 1.5e308
    with pytest.raises(ValueError, match=r"q\[6\]: two arms' qualities differ by more"):
        hull_steps(q, np.tile([1.0, 2.0], (10, 1)), chunk_rows=4)


def test_efficiency_key_matches_the_numpy_rounding():
    rng = np.random.default_rng(5)
    eff = np.concatenate([rng.random(1000) * 10.0 ** rng.integers(-45, 45, 1000),
                          [0.0, -0.0, -1.0, 5e-324, 1e-46, 3.4028235e38, 3.5e38, np.inf, np.nan,
                           1.0 + 2.0**-30, 0.1]])
    assert efficiency_key(eff).tobytes() == reference_efficiency_key(eff).tobytes()
    view = eff.reshape(3, -1)[:, ::7]
    assert efficiency_key(view).tobytes() == reference_efficiency_key(view).tobytes()
