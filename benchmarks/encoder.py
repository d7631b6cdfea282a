"""The encoder's forward passes: fixed slices against token-length chunks; prints its figures.

    python benchmarks/encoder.py                                   # synthetic queries
    python benchmarks/encoder.py --texts ../shared/data/paretobandit/test_k4.jsonl --calls 32,256

sentence-transformers sorts a call's texts by length and pads each slice of ``batch_size`` texts
to its longest; r2ray's ``MeanPooledTransformer`` cuts the sorted call where lengths drop
(``encoders.length_chunks``). Both run here on the same model, the same calls and one torch
thread, in alternating rounds; the slices are the ``overhead = inf`` case of ``length_chunks``.
Per call size: ms per text each way, their ratio per round, the padded tokens per real token
each way, and the largest difference between the two embeddings.
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
        tokens, _, passes = model.plan(texts, batch_size)
        lengths = np.array([len(ids) for ids in tokens["input_ids"]])
        padded += sum(len(rows) * lengths[rows].max() for rows in passes)
        real += lengths.sum()
    return padded / real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", help="a jsonl file of queries (default: synthetic queries)")
    parser.add_argument("--calls", default="1,8,16,32,128,1024", help="texts per encode call")
    parser.add_argument("--texts-per-size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    from r2ray.encoders import MINILM, load_encoder

    torch.set_num_threads(1)
    encoder = load_encoder(MINILM, device="cpu")
    model, chunked = encoder._model, encoder._model.overhead
    pool = read_texts(args.texts, 3000)
    rng = np.random.default_rng(0)
    print(f"{len(pool)} texts ({args.texts or 'synthetic'}), MiniLM on one thread, batch_size "
          f"{encoder.batch_size}, {args.rounds} alternating rounds")
    for size in (int(s) for s in args.calls.split(",")):
        calls = [list(rng.choice(pool, min(size, len(pool)), replace=False))
                 for _ in range(max(3, args.texts_per_size // size))]
        seconds: dict[str, list[float]] = {"slices": [], "chunks": []}
        vectors, pads = {}, {}
        for _ in range(args.rounds):
            for way, overhead in (("slices", np.inf), ("chunks", chunked)):
                model.overhead = overhead
                started = time.perf_counter()
                vectors[way] = [encoder.encode(texts) for texts in calls]
                seconds[way].append((time.perf_counter() - started) / sum(map(len, calls)))
        for way, overhead in (("slices", np.inf), ("chunks", chunked)):
            model.overhead = overhead
            pads[way] = padding(model, calls, encoder.batch_size)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(vectors["slices"], vectors["chunks"]))
        ratios = [a / b for a, b in zip(seconds["slices"], seconds["chunks"])]
        print(f"calls of {size:5d}: ms per text slices {statistics.median(seconds['slices']) * 1e3:6.2f}"
              f", chunks {statistics.median(seconds['chunks']) * 1e3:6.2f}; slices / chunks "
              f"{statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"padded per real token {pads['slices']:.2f} vs {pads['chunks']:.2f}; max |difference| "
              f"{diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
