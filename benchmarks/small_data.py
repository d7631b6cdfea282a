"""Small data: the joint network, its Ridge-residual variant and the baselines on every real bench.

Benches: ParetoBandit (3,559 queries, 4 models) and RouterArena (809 queries, 2 models × 16 hard-cap
budgets) from ``../shared/data`` beside the repository, or ``R2RAY_SHARED_DATA`` (skipped, saying
where it looked, when absent), their copies in ``tests/data`` (301 and
204 queries), the synthetic world (``--world-queries``, seed 11, default knobs and catalogue) and
an *other world* whose knobs were fixed before any result was seen: budgets {50, 200, 1000,
default} only (44 arms: fewer budgets that matter) and more noise (answer-length spread 0.55 → 0.8,
capability sharpness 9 → 6, obey spread 0.2 → 0.35). Real benches use MiniLM embeddings (through
the embedding cache), worlds their own.

Per bench and seed: a random 80/20 split; every method is fitted on the 80 % (``fit``: its
calibrations included) and scored on the 20 % with the evaluation package's AUDC and QNC, costs
normalised over the non-learned methods only, so a method's score does not depend on which other
methods ran. It prints AUDC mean ± sd over seeds for each method, ``oracle_all`` and ``random``,
the mean paired gap of each learned method to the best baseline, QNC, and on the worlds ``truth``
(the world's expected quality and tokens used as the router's beliefs: what a perfect predictor
would score; ``oracle_all`` also knows each answer's realised label noise) and the headroom
captured, (AUDC − AUDC_random) / (AUDC_top − AUDC_random), toward ``oracle_all`` and ``truth``.

Usage: python benchmarks/small_data.py [--seeds 3] [--benches pb,ra,pb_small,ra_small,world,world_other]
       [--methods averaged,r2ray,r2ray_residual,per_arm_ridge,carrot_knn_default,carrot_knn_all,selected]
       [--world-queries 3000] [--cache results.jsonl] [--encoder minilm|FOLDER]
``selected`` is ``r2ray train``'s default (3-fold CV over the ``small`` candidates, refit): the
costliest; ``averaged`` the plain mean of Ridge, KNN and the joint network, which ``selected``
keeps unless a candidate beats it by more than one standard error; ``selected``'s rows keep the CV winner and each candidate's CV AUDC (``winner``, ``cv``), and the
table prints the winner per seed. ``r2ray`` trains on its step budget (batch 128 for up to 40
epochs at these sizes); the epoch plan it had before, for comparison: ``r2ray_old=r2ray{"epochs":12,"batch_size":512,
"patience":3}``. ``--cache`` keeps each (bench, method, seed) result with the fingerprint of what
produced it (the r2ray package's code and default catalogue, this script with its world knobs, and a
real bench's input files and encoder), so a rerun fits only what is new and never reuses a result of
other code, data or settings (such rows stay in the file, unused).
On the shared 2-core host at load 10–20, one world split with every method took 10–20 minutes
(the residual network and the joint network's fits dominate), a real bench's split 1–5 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("R2RAY_SHARED_DATA") or ROOT.parent / "shared" / "data")  # full benches
TESTS = ROOT / "tests" / "data"
BASELINES = ("per_arm_ridge", "carrot_knn_default", "carrot_knn_all")
OTHER_WORLD_BUDGETS = [50, 200, 1000, "default"]
OTHER_WORLD_KNOBS = {"length_sigma": 0.8, "capability_sharpness": 6.0, "obey_sigma": 0.35}


def real_benches() -> dict[str, tuple[str, list[str]]]:
    """name → (format, input files) of the real benches that exist: the full ones under
    ``SHARED`` (``R2RAY_SHARED_DATA``, else ``../shared/data`` beside the repository), their
    copies in ``tests/data`` as ``tests:NAME``."""
    found = {}
    for prefix, root in (("", SHARED), ("tests:", TESTS)):
        pb, ra = root / "paretobandit", root / "routerarena"
        if pb.exists():
            files = [f for f in ("test_k4.jsonl", "val_k4.jsonl") if (pb / f).exists()]
            found[prefix + "paretobandit"] = ("paretobandit", [str(pb / f) for f in files])
        if ra.exists():
            found[prefix + "routerarena"] = ("routerarena", [
                str(ra / "gemini-2.0-flash-001.jsonl"), str(ra / "claude-3-haiku-20240307.jsonl")])
    return found


def load_real(format: str, inputs: list[str], folder: str, encoder: str = "minilm"):
    """(BenchArrays with ``encoder``'s embeddings, catalogue) of a converted real bench."""
    from r2ray.bench.formats import convert_files
    from r2ray.bench.stats import catalog_for_bench
    from r2ray.evaluation.run import load_bench_arrays

    out = os.path.join(folder, f"{format}-{abs(hash(tuple(inputs)))}.parquet")
    convert_files(format, inputs, out=out)
    catalog = catalog_for_bench(out, None)[0]
    return load_bench_arrays(out, catalog, None, encoder, log=lambda line: None)[0], catalog


def load_world(n_queries: int, other: bool):
    """(BenchArrays with the world's embeddings, catalogue): seed 11, default or other knobs."""
    from dataclasses import replace

    from r2ray.bench.synthetic import World
    from r2ray.bench.world import KNOBS
    from r2ray.catalog import catalog_from_dict, load_catalog
    from r2ray.predictor.base import ArmPredictions
    from r2ray.predictor.data import bench_arrays

    catalog, knobs = load_catalog(), KNOBS
    if other:
        catalog = catalog_from_dict(catalog.to_dict() | {"budgets": OTHER_WORLD_BUDGETS})
        knobs = replace(KNOBS, **OTHER_WORLD_KNOBS)
    chunk = World(catalog, 11, knobs).chunk(0, n_queries, embeddings=True)
    truth = ArmPredictions(chunk.expected_quality.astype(np.float32),
                           chunk.expected_output_tokens.astype(np.float32))
    return bench_arrays(chunk.bench_table(), catalog, chunk.backlog_table()), catalog, truth


def build(method: str, seed: int):
    """A fresh predictor: ``kind`` (a registry key), or ``label=kind{json settings}`` for a
    variant; seeded with the split's seed where it has one."""
    from r2ray.predictor import make_predictor

    spec = method.split("=", 1)[-1]
    kind, _, settings = spec.partition("{")
    settings = json.loads("{" + settings) if settings else {}
    if "seed" in make_predictor(kind, **settings).settings():
        settings = {"seed": seed} | settings
    return make_predictor(kind, **settings)


def split_scores(arrays, catalog, methods: list[str], seed: int, truth=None) -> dict[str, dict]:
    """Per method (and oracle_all, random; ``truth``: the world's expected quality and tokens
    [N, K] as a router's beliefs, the ceiling of any predictor): AUDC, QNC, fit seconds on one
    80/20 split. Replay or full information is decided on the whole bench, as ``r2ray evaluate``
    does: decided on each test part, a bench near the sampled threshold had some seeds scored by
    replay and others by full information over their full queries only."""
    from r2ray.evaluation.method_scores import (evaluable_queries, evaluate_methods, is_sampled,
                                                reference_methods, summarise)
    from r2ray.predictor.data import holdout_indices

    replay = is_sampled(arrays, catalog)
    train_rows, test_rows = holdout_indices(arrays.n_queries, 0.2, seed)
    train, test = arrays.subset(train_rows), arrays.subset(test_rows)
    evaluable = evaluable_queries(test, catalog, replay)
    test = test.subset(evaluable)
    predictions, seconds, picked = {}, {}, {}
    for method in methods:
        started = time.perf_counter()
        fitted = build(method, seed).fit(train, catalog)
        predictions[method] = fitted.predict(test.embedding)
        seconds[method] = time.perf_counter() - started
        if getattr(fitted, "selection_", None):   # ``selected``: the CV winner and its table
            picked[method] = {"winner": fitted.winner_name_,
                              "cv": {r["name"]: r["audc"] for r in fitted.selection_}}
    if truth is not None:
        predictions["truth"] = truth.subset(test_rows[evaluable])
    results = evaluate_methods(test, catalog, predictions, replay=replay)
    summary = summarise(results, normalise_over=reference_methods(results, predictions))
    names = [*methods, "oracle_all", "random", *(["truth"] if truth is not None else [])]
    return {n: {"audc": summary["methods"][n]["audc"], "qnc": summary["methods"][n]["qnc"],
                "seconds": seconds.get(n, 0.0)} | picked.get(n, {}) for n in names}


def top_level_split(spec: str) -> list[str]:
    """``spec`` split at the commas outside braces: a method's JSON settings may nest
    (``stacked{"members":[{...},{...}]}``)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return parts + [spec[start:]]


def read_cache(path: str | None) -> dict[tuple, dict]:
    """(bench, method, seed, fingerprint) → scores of every row of the cache file (rows written
    before fingerprints have none, so no run reuses them)."""
    if not path or not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {(r["bench"], r["method"], r["seed"], r.get("fingerprint")): r for r in rows}


def fingerprint(settings: str, inputs: list[str] = ()) -> str:
    """What a result depends on besides (bench name, method spec, seed): the imported r2ray
    package (code, default catalogue), this script, ``settings`` (the world's budgets and knobs,
    or a real bench's encoder) and a real bench's input files' bytes. 16 hex digits of a sha256."""
    import r2ray

    package = Path(r2ray.__file__).resolve().parent
    code = sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml", ".json"))
    digest = hashlib.sha256(settings.encode())
    for path in [*code, Path(__file__).resolve(), *map(Path, inputs)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def bench_results(name: str, loader, methods: list[str], seeds: list[int], cache: dict,
                  cache_path: str | None, source: str) -> dict[str, list[dict]]:
    """{method: [per-seed scores]}, fitting only what the cache lacks under the ``source``
    :func:`fingerprint`."""
    data = None
    out: dict[str, list[dict]] = {}
    for seed in seeds:
        wanted = [m for m in methods if (name, m, seed, source) not in cache]
        if wanted or (name, "random", seed, source) not in cache or (
                name.startswith("world") and (name, "truth", seed, source) not in cache):
            data = data or loader()
            fresh = split_scores(data[0], data[1], wanted, seed, *data[2:])
            for method, scores in fresh.items():
                row = {"bench": name, "method": method, "seed": seed, "fingerprint": source} | scores
                cache[(name, method, seed, source)] = row
                if cache_path:
                    with open(cache_path, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
        extra = ["truth"] if name.startswith("world") else []
        for method in [*methods, "oracle_all", "random", *extra]:
            out.setdefault(method, []).append(cache[(name, method, seed, source)])
    return out


def paired_gap(gaps: np.ndarray) -> str:
    """Mean ± standard error of per-split gaps (one split: the mean alone)."""
    if len(gaps) < 2:
        return f"{gaps.mean():+.4f}"
    return f"{gaps.mean():+.4f} ± {gaps.std(ddof=1) / np.sqrt(len(gaps)):.4f}"


def table(name: str, results: dict[str, list[dict]], methods: list[str]) -> str:
    """AUDC mean ± sd over seeds, the paired gap to the best baseline (mean ± its standard error
    over seeds: the splits are shared, so the gap's spread is much smaller than either AUDC's), QNC,
    and on a world the headroom captured toward ``oracle_all`` and toward ``truth``. The best
    baseline is the one of :data:`BASELINES` with the highest mean *test* AUDC over these same
    splits: chosen on the test scores, it favours the baseline (the max of noisy means runs high),
    so the gaps lean conservative, against the learned methods."""
    audc = {m: np.array([r["audc"] for r in rows]) for m, rows in results.items()}
    baselines = [m for m in BASELINES if m in audc]
    best = max(baselines, key=lambda m: audc[m].mean()) if baselines else None
    world = "truth" in audc
    lines = [f"== {name} ({len(audc['random'])} seeds); best baseline: {best}",
             f"  {'method':32} {'AUDC':>17} {'vs best ± s.e.':>17} {'QNC':>6}"
             + (f" {'hr oracle':>9} {'hr truth':>9}" if world else "") + f" {'fit s':>7}"]
    low = audc["random"]
    for method in [*methods, "oracle_all", "random", *(["truth"] if world else [])]:
        values = audc[method]
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        gap = paired_gap(values - audc[best]) if best and method in methods else ""
        qnc = np.mean([r["qnc"] for r in results[method]])
        line = f"  {method.split('=')[0]:32} {values.mean():.4f} ± {sd:.4f} {gap:>17} {qnc:6.3f}"
        if world:
            line += "".join(f" {np.mean((values - low) / (audc[top] - low)):9.1%}"
                            for top in ("oracle_all", "truth"))
        seconds = np.mean([r["seconds"] for r in results[method]])
        winners = [r["winner"] for r in results[method] if "winner" in r]
        lines.append(line + f" {seconds:7.1f}" + (f"  CV picked {', '.join(winners)}"
                                                   if winners else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--benches", default="paretobandit,routerarena,tests:paretobandit,"
                                               "tests:routerarena,world,world_other")
    parser.add_argument("--methods", default="averaged,r2ray,r2ray_residual,per_arm_ridge,"
                                              "carrot_knn_default,carrot_knn_all")
    parser.add_argument("--world-queries", type=int, default=3000)
    parser.add_argument("--cache", default=None, help="JSON lines of finished results")
    parser.add_argument("--encoder", default="minilm",
                        help="encoder of the real benches (an r2ray.encoders spec or a local "
                             "sentence-transformers folder); other than minilm, the bench's "
                             "name in the table and cache gets @<folder name>")
    args = parser.parse_args()
    methods = [m.strip() for m in top_level_split(args.methods) if m.strip()]
    seeds = list(range(args.seeds))
    cache = read_cache(args.cache)
    real = real_benches()
    encoded = "" if args.encoder == "minilm" else f"@{Path(args.encoder).name}"  # real benches' key
    with tempfile.TemporaryDirectory() as folder:
        for name in [b.strip() for b in args.benches.split(",") if b.strip()]:
            if name in ("world", "world_other"):
                loader = lambda other=name == "world_other": load_world(args.world_queries, other)  # noqa: E731
                source = fingerprint(json.dumps([OTHER_WORLD_BUDGETS, OTHER_WORLD_KNOBS]))
            elif name in real:
                loader = lambda spec=real[name]: load_real(*spec, folder, args.encoder)  # noqa: E731
                encoder = os.path.abspath(args.encoder) if os.path.isdir(args.encoder) else args.encoder
                source = fingerprint(encoder, real[name][1])
            else:
                print(f"== {name}: not found, skipped (the full benches are read from {SHARED}; "
                      "R2RAY_SHARED_DATA=DIR reads them elsewhere)")
                continue
            key = f"{name}@{args.world_queries}" if name.startswith("world") else name + encoded
            results = bench_results(key, loader, methods, seeds, cache, args.cache, source)
            print(table(key, results, methods), flush=True)


if __name__ == "__main__":
    main()
