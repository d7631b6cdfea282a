"""benchmarks/small_data.py: its result cache reuses only results of the same code, data and
settings (before, its key was (bench, method, seed) alone, so a changed world knob, bench file or
r2ray code still printed the old numbers); every split of a bench is scored one way (replay or
full information), decided on the whole bench."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from benchmark_scripts import benchmark_module
from predictor_world import planted_arrays, small_catalog

from r2ray.evaluation.method_scores import (evaluable_queries, evaluate_methods, is_sampled,
                                            reference_methods, summarise)
from r2ray.predictor.data import holdout_indices

def small_data():
    return benchmark_module("small_data")


def test_fingerprint_follows_settings_and_input_bytes(tmp_path):
    sd = small_data()
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"q": 1}\n')
    before = sd.fingerprint("minilm", [str(bench)])
    assert sd.fingerprint("minilm", [str(bench)]) == before
    assert sd.fingerprint("other-encoder", [str(bench)]) != before
    bench.write_text('{"q": 2}\n')
    assert sd.fingerprint("minilm", [str(bench)]) != before


def test_cached_result_is_reused_only_under_its_fingerprint(tmp_path, monkeypatch):
    sd = small_data()
    fits = []

    def split_scores(arrays, catalog, methods, seed):
        fits.append(list(methods))
        return {m: {"audc": 0.5 + len(fits) / 100, "qnc": 1.0, "seconds": 0.0}
                for m in [*methods, "oracle_all", "random"]}

    monkeypatch.setattr(sd, "split_scores", split_scores)
    cache_path = str(tmp_path / "cache.jsonl")
    loader = lambda: (None, None)  # noqa: E731
    old, new = sd.fingerprint("knobs a"), sd.fingerprint("knobs b")
    first = sd.bench_results("pb", loader, ["ridge"], [0], {}, cache_path, old)
    again = sd.bench_results("pb", loader, ["ridge"], [0], sd.read_cache(cache_path), cache_path, old)
    assert fits == [["ridge"]] and again == first             # same fingerprint: read back, not refitted
    changed = sd.bench_results("pb", loader, ["ridge"], [0], sd.read_cache(cache_path), cache_path, new)
    assert fits == [["ridge"], ["ridge"]]                      # other code or settings: refitted
    assert changed["ridge"][0]["audc"] != first["ridge"][0]["audc"]


def near_threshold_bench(catalog):
    """400 planted queries, about half with every arm and half with one arm dealt: sampled as a
    whole, while some 80/20 test parts are not."""
    arrays, _ = planted_arrays(catalog, 400, dim=8, seed=0, missing_share=0.0)
    rng = np.random.default_rng(1)
    partial = rng.random(arrays.n_queries) < 0.5
    keep = np.ones(arrays.quality.shape, bool)
    keep[partial] = False
    keep[np.flatnonzero(partial), rng.integers(0, catalog.n_arms, partial.sum())] = True
    return replace(arrays, **{name: np.where(keep, getattr(arrays, name), np.nan)
                              for name in ("quality", "output_tokens", "cost_usd")})


def test_every_split_is_scored_as_the_whole_bench_is_sampled():
    catalog = small_catalog()
    arrays = near_threshold_bench(catalog)
    assert is_sampled(arrays, catalog)
    test_parts = {seed: arrays.subset(holdout_indices(arrays.n_queries, 0.2, seed)[1])
                  for seed in range(8)}
    seed = next(s for s, test in test_parts.items() if not is_sampled(test, catalog))
    test = test_parts[seed]
    test = test.subset(evaluable_queries(test, catalog, replay=True))
    results = evaluate_methods(test, catalog, {}, replay=True)
    replayed = summarise(results, normalise_over=reference_methods(results, {}))["methods"]
    scores = small_data().split_scores(arrays, catalog, [], seed)
    assert scores["random"]["audc"] == replayed["random"]["audc"]
    assert scores["oracle_all"]["audc"] == replayed["oracle_all"]["audc"]
