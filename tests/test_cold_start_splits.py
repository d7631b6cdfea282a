"""benchmarks/cold_start.py's --bench parts: disjoint, and a bench too small for them is refused
by name (it left the new-model and training parts empty and failed on a bare IndexError)."""

from __future__ import annotations

import types

import pytest
from benchmark_scripts import benchmark_module
from predictor_world import planted_arrays, small_catalog


def cold_start():
    return benchmark_module("cold_start")


def test_bench_parts_are_disjoint_and_a_small_bench_is_refused():
    arrays, _ = planted_arrays(small_catalog(), 301, dim=8, seed=0, missing_share=0.0)
    parts = cold_start().bench_parts
    args = types.SimpleNamespace(test_queries=100, sizes=[25, 50], train_queries=2000)
    train, new, test = parts(arrays, args, 0)
    ids = [set(part.query_id.tolist()) for part in (train, new, test)]
    assert [len(i) for i in ids] == [151, 50, 100] and len(set.union(*ids)) == 301
    with pytest.raises(SystemExit, match="301 queries.*need 1,201"):
        parts(arrays, types.SimpleNamespace(test_queries=1000, sizes=[25, 200],
                                            train_queries=2000), 0)
