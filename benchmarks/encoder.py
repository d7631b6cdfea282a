"""The encoder's forward passes: fixed slices against token-length chunks, or float32 against
bfloat16; prints its figures.

    python benchmarks/encoder.py                                   # synthetic queries
    python benchmarks/encoder.py --texts ../shared/data/paretobandit/test_k4.jsonl --calls 32,256
    python benchmarks/encoder.py --compare precision               # float32 vs bfloat16

sentence-transformers sorts a call's texts by length and pads each slice of ``batch_size`` texts
to its longest; r2ray's ``MeanPooledTransformer`` cuts the sorted call where lengths drop
(``encoders.length_chunks``). Both run here on the same model, the same calls and one torch
thread, in alternating rounds; the slices are the ``overhead = inf`` case of ``length_chunks``.
Per call size: ms per text each way, their ratio per round, the padded tokens per real token
each way, and the largest difference and smallest cosine between the two embeddings.
``--compare precision`` runs the float32 and the bfloat16 encoder (``load_encoder(precision=)``)
the same way, both cut into token-length chunks, then routes 1,500 of the texts on each one's
embeddings and prints how many decisions agree and what the moved ones cost.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def read_texts(path: str | None, n: int) -> list[str]:
    """Queries of a jsonl file (``prompt``, ``question`` or ``query``), or synthetic ones."""
    if path is None:
        from r2ray.bench.synthetic import synth_backlog
        from r2ray.catalog import load_catalog

        return synth_backlog(load_catalog(), n, seed=9).column("query").to_pylist()
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r.get("prompt") or r.get("question") or r["query"] for r in rows][:n]


def padding(model, calls: list[list[str]], batch_size: int) -> float:
    """Padded tokens per real token over ``calls``, in the forward passes the model plans."""
    padded = real = 0
    for texts in calls:
        ids, _, passes = model.plan(texts, batch_size)
        lengths = np.array([len(row) for row in ids])
        padded += sum(len(rows) * lengths[rows].max() for rows in passes)
        real += lengths.sum()
    return padded / real


def objective_lost_share(value: np.ndarray, cost_usd: np.ndarray, exact: np.ndarray,
                         fast: np.ndarray) -> float:
    """Objective Σ q̂ − λĉ lost by routing to ``fast``'s arms [N] instead of ``exact``'s, as a
    share of ``exact``'s gain over each query's cheapest arm (lowest predicted USD among the arms
    with a score; ``value`` [N, K] NaN elsewhere). Not over the arm of lowest objective: at
    λ = 10,000 that one sat far below the cheapest and made the gain 37x larger, the loss tiny."""
    rows = np.arange(len(exact))
    cheapest = np.nanargmin(np.where(np.isnan(value), np.nan, cost_usd), axis=1)
    gain = np.sum(value[rows, exact] - value[rows, cheapest])
    return float(np.sum(value[rows, exact] - value[rows, fast]) / gain)


def decision_agreement(exact, fast, texts: list[str], n_train: int = 2000) -> None:
    """Route ``texts`` with a per-arm Ridge fitted on float32 embeddings of ``n_train`` synthetic
    bench queries, once on each encoder's embeddings, at several λ; print how many decisions
    agree and what the moved ones cost in the objective Σ q̂ − λĉ (float32's predictions)."""
    from r2ray.bench.synthetic import synth_bench
    from r2ray.catalog import load_catalog
    from r2ray.predictor import make_predictor
    from r2ray.predictor.data import bench_arrays
    from r2ray.prompting import estimate_tokens
    from r2ray.routing import query_key
    from r2ray.serving.router import RouteItem, RoutingModel, predict_scores, route_items

    catalog = load_catalog()
    arrays = bench_arrays(synth_bench(catalog, n_train, seed=3), catalog)
    model = RoutingModel(make_predictor("per_arm_ridge").fit(
        arrays.with_embedding(exact.encode(list(arrays.query))), catalog), None, catalog, "bench")
    vectors = {name: encoder.encode(texts) for name, encoder in (("exact", exact), ("fast", fast))}
    for lam in (100.0, 1_000.0, 10_000.0):
        items = {name: [RouteItem(t, estimate_tokens(t), query_key(t), lam, embedding=list(v))
                        for t, v in zip(texts, x.tolist())] for name, x in vectors.items()}
        arms = {name: np.array([d.arm for d in route_items(model, batch)])
                for name, batch in items.items()}
        scores = predict_scores(model, items["exact"], np.ones((len(texts), len(catalog.arms)), bool))
        value = np.where(np.isnan(scores.quality), np.nan, scores.quality - lam * scores.cost_usd)
        lost = objective_lost_share(value, scores.cost_usd, arms["exact"], arms["fast"])
        rows = np.arange(len(texts))
        spend = scores.cost_usd[rows, arms["fast"]].sum() / scores.cost_usd[rows, arms["exact"]].sum()
        print(f"lambda {lam:8.0f}: same arm for {np.mean(arms['exact'] == arms['fast']) * 100:6.2f} % "
              f"of {len(texts)} queries; objective lost {lost * 100:.4f} % of routing's gain "
              f"over the cheapest arm; predicted spend x{spend:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", help="a jsonl file of queries (default: synthetic queries)")
    parser.add_argument("--calls", default="1,8,16,32,128,1024", help="texts per encode call")
    parser.add_argument("--texts-per-size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", choices=("padding", "precision"), default="padding",
                        help="padding: fixed slices vs token-length chunks (float32); precision: "
                             "float32 vs bfloat16 forward passes (both chunked)")
    args = parser.parse_args()

    import torch

    from r2ray.encoders import MINILM, load_encoder

    torch.set_num_threads(1)
    exact = load_encoder(MINILM, device="cpu")
    if args.compare == "padding":   # (name, encoder, overhead of length_chunks)
        ways = [("slices", exact, np.inf), ("chunks", exact, exact._model.overhead)]
    else:
        fast = load_encoder(MINILM, device="cpu", precision="bfloat16")
        ways = [("float32", exact, exact._model.overhead),
                ("bfloat16", fast, fast._model.overhead)]
    (a, _, _), (b, _, _) = ways
    pool = read_texts(args.texts, 3000)
    rng = np.random.default_rng(0)
    print(f"{len(pool)} texts ({args.texts or 'synthetic'}), MiniLM on one thread, batch_size "
          f"{exact.batch_size}, {args.rounds} alternating rounds, {a} vs {b}")
    for size in (int(s) for s in args.calls.split(",")):
        calls = [list(rng.choice(pool, min(size, len(pool)), replace=False))
                 for _ in range(max(3, args.texts_per_size // size))]
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        vectors, pads = {}, {}
        for _ in range(args.rounds):
            for name, encoder, overhead in ways:
                encoder._model.overhead = overhead
                started = time.perf_counter()
                vectors[name] = np.concatenate([encoder.encode(texts) for texts in calls])
                seconds[name].append((time.perf_counter() - started) / sum(map(len, calls)))
        for name, encoder, overhead in ways:
            encoder._model.overhead = overhead
            pads[name] = padding(encoder._model, calls, encoder.batch_size)
        diff = float(np.abs(vectors[a] - vectors[b]).max())
        cosine = float(((vectors[a] * vectors[b]).sum(1) / np.linalg.norm(vectors[a], axis=1)
                        / np.linalg.norm(vectors[b], axis=1)).min())
        ratios = [x / y for x, y in zip(seconds[a], seconds[b])]
        print(f"calls of {size:5d}: ms per text {a} {statistics.median(seconds[a]) * 1e3:6.2f}"
              f", {b} {statistics.median(seconds[b]) * 1e3:6.2f}; {a} / {b} "
              f"{statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"padded per real token {pads[a]:.2f} vs {pads[b]:.2f}; max |difference| "
              f"{diff:.1e}, min cosine {cosine:.5f}", flush=True)
    if args.compare == "precision":
        print(f"\ndecisions, default catalogue ({len(pool[:1500])} queries, per-arm Ridge on "
              "float32 embeddings of 2,000 synthetic queries), float32 vs bfloat16 embeddings:")
        decision_agreement(exact, fast, pool[:1500])


if __name__ == "__main__":
    main()
