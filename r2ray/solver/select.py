"""Exact weighted radix select: histograms of 16-bit digits of a key, weighted by spend.

Spend is counted in integer quanta (2**e USD, costs rounded up), so every sum is exact and the
same whatever the order or the block split: a solve over Ray Data blocks is bit-identical to
one in memory. Histograms are sparse (only non-empty bins travel), indexed by
``group * 65536 + digit`` so that every tenant is selected in the same passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numba import njit

DIGIT_BITS = 16
N_BINS = 1 << DIGIT_BITS
TOTAL_BITS = 61                  # totals stay below 2**61 quanta, so int64 sums are exact
_DENSE_BINS = 1 << 22            # above this many bins, histograms are built sparse


def exact_bincount(bins: np.ndarray, values: np.ndarray, minlength: int) -> np.ndarray:
    """Per-bin exact sums of int64 values (|v| < 2**62, |sum| < 2**63), as int64: an int64
    accumulator per bin cannot overflow under those bounds, so the sum is exact in any order."""
    return _bincount_int64(np.ascontiguousarray(bins), np.ascontiguousarray(values, np.int64),
                           np.int64(minlength))


@njit(cache=True, nogil=True)
def _bincount_int64(bins, values, minlength):
    out = np.zeros(max(minlength, bins.max() + 1 if bins.size else 0), np.int64)
    for i in range(bins.size):
        out[bins[i]] += values[i]
    return out


@njit(cache=True, nogil=True)
def _dense_histogram(bins, weights, n_bins):
    """(step count, exact int64 weight) per bin in one pass."""
    count = np.zeros(n_bins, np.int64)
    weight = np.zeros(n_bins, np.int64)
    for i in range(bins.size):
        count[bins[i]] += 1
        weight[bins[i]] += weights[i]
    return count, weight


def exact_float_sums(values: np.ndarray, groups: np.ndarray | None, n_groups: int) -> list[int]:
    """Exact per-group sums of float64 values as Python ints in units of 2**-1074 (every
    finite float64 is a whole number of those): mantissas summed per exponent in two 27-bit
    halves, which float64 bincounts add exactly, then shifted into place."""
    bits = np.ascontiguousarray(values, np.float64).view(np.uint64)
    exps = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    mantissa = (bits & np.uint64((1 << 52) - 1)) | ((exps > 0).astype(np.uint64) << np.uint64(52))
    sign = np.where(bits >> np.uint64(63), -1.0, 1.0)
    bins = exps if groups is None else exps + 2048 * groups.astype(np.int64)
    halves = np.zeros((2, 2048 * n_groups), np.int64)
    for start in range(0, bins.size, 1 << 25):
        part = slice(start, start + (1 << 25))
        for half, shifted in enumerate((mantissa[part] >> np.uint64(26),
                                        mantissa[part] & np.uint64((1 << 26) - 1))):
            halves[half] += np.bincount(bins[part], weights=shifted * sign[part],
                                        minlength=2048 * n_groups).astype(np.int64)
    sums = [0] * n_groups
    for b in np.flatnonzero(halves.any(axis=0)):
        g, e = divmod(int(b), 2048)
        sums[g] += ((int(halves[0, b]) << 26) + int(halves[1, b])) << max(e - 1, 0)
    return sums


def exponent_counts(values: np.ndarray) -> np.ndarray:
    """int64 [2048]: how many |values| (float64) have each biased exponent."""
    return _exponent_counts(np.ascontiguousarray(values, np.float64).view(np.uint64))


@njit(cache=True, nogil=True)
def _exponent_counts(bits):
    out = np.zeros(2048, np.int64)
    for i in range(bits.size):
        out[(bits[i] >> 52) & 0x7FF] += 1                    # the mask drops the sign
    return out


def quantum_exponent(counts: np.ndarray) -> int:
    """Smallest e such that the values counted by ``exponent_counts`` sum below 2**(e + 61).

    Uses only integer counts (a value with biased exponent x is below 2**(x - 1022)), so every
    block split gives the same e.
    """
    bound = 0
    for x in np.flatnonzero(counts):
        bound += int(counts[x]) << int(x)          # exact: count * 2**(x - 1022) * 2**1022
    if bound == 0:
        return -1074
    return max(bound.bit_length() - 1022 - TOTAL_BITS, -1074)


def floor_quanta(usd: float, exponent: int) -> int:
    """floor(usd / 2**exponent) for usd >= 0, as an exact Python int (inf -> 2**4096)."""
    if not math.isfinite(usd):
        return 1 << 4096
    fraction, power = math.frexp(usd)               # usd = fraction * 2**power
    mantissa, shift = int(math.ldexp(fraction, 53)), power - 53 - exponent
    return mantissa << shift if shift >= 0 else mantissa >> -shift


def float_at_least(x) -> float:
    """The least float >= x (an exact Fraction or int, or a float); inf past the largest float.
    What an exact bound (a minimum spend, an upper bound) is reported as: rounding to nearest
    could state a value the bound does not reach."""
    try:
        f = float(x)
    except OverflowError:
        return math.inf
    return f if math.isinf(f) or Fraction(f) >= x else math.nextafter(f, math.inf)


@dataclass(frozen=True)
class Hist:
    """Sparse histogram: sorted bin ``index`` (group * 65536 + digit) -> step count, weight."""

    index: np.ndarray   # int64 [M]
    count: np.ndarray   # int64 [M]
    weight: np.ndarray  # int64 [M] exact quanta

    @staticmethod
    def of(bins: np.ndarray, weights: np.ndarray, n_groups: int) -> "Hist":
        if n_groups * N_BINS <= _DENSE_BINS:
            count, weight = _dense_histogram(np.ascontiguousarray(bins),
                                             np.ascontiguousarray(weights, np.int64),
                                             n_groups * N_BINS)
            index = np.flatnonzero(count)
            return Hist(index.astype(np.int64), count[index], weight[index])
        index, inverse = np.unique(bins, return_inverse=True)
        return Hist(index.astype(np.int64), np.bincount(inverse).astype(np.int64),
                    exact_bincount(inverse, weights, index.size))

    def merge(self, other: "Hist") -> "Hist":
        index, inverse = np.unique(np.concatenate([self.index, other.index]), return_inverse=True)
        count = np.zeros(index.size, np.int64)
        weight = np.zeros(index.size, np.int64)
        np.add.at(count, inverse, np.concatenate([self.count, other.count]))
        np.add.at(weight, inverse, np.concatenate([self.weight, other.weight]))
        return Hist(index, count, weight)

    def group(self, g: int) -> "Hist":
        lo, hi = np.searchsorted(self.index, [g * N_BINS, (g + 1) * N_BINS])
        return Hist(self.index[lo:hi] - g * N_BINS, self.count[lo:hi], self.weight[lo:hi])

    def total(self) -> int:
        return int(self.weight.sum())


@dataclass(frozen=True)
class Pick:
    """Result of one digit's walk: the digit holding the target and what lies before it."""

    digit: int
    before: int        # quanta in bins walked past
    count: int         # steps in the chosen bin
    weight: int        # quanta in the chosen bin


def walk(hist: Hist, target: int, *, descending: bool) -> Pick:
    """The bin where cumulative weight first exceeds ``target`` (0 <= target < total)."""
    order = slice(None, None, -1) if descending else slice(None)
    digits, weights = hist.index[order], hist.weight[order]
    cum = np.cumsum(weights)                       # exact: totals < 2**62
    at = int(np.searchsorted(cum, target, side="right"))
    before = int(cum[at - 1]) if at else 0
    return Pick(int(digits[at]), before, int(hist.count[order][at]), int(weights[at]))


def digit_of(source: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """16-bit digit of uint64 ``source`` at bit ``shift`` (scalar or per element)."""
    return ((source >> shift) & np.uint64(N_BINS - 1)).astype(np.int64)


def common_prefix_shift(lo: int, hi: int) -> int:
    """Bit position below which lo and hi (uint64 values) differ, rounded to a whole digit."""
    differing = (lo ^ hi).bit_length()
    return max(differing - DIGIT_BITS, 0)
