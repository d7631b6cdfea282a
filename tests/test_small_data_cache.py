"""benchmarks/small_data.py's result cache: a rerun reuses only results of the same code, data
and settings (before, its key was (bench, method, seed) alone, so a changed world knob, bench file
or r2ray code still printed the old numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "small_data.py"


def small_data():
    spec = importlib.util.spec_from_file_location("small_data_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
