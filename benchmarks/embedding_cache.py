"""What the embedding cache saves (prints figures; not a test): the same bench's query texts
encoded by MiniLM with an empty cache (what `r2ray train` pays), then again through the cache
(what `r2ray evaluate` and promotion pay after it), side by side in one process.

Usage: python benchmarks/embedding_cache.py [--queries 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    from r2ray.bench.synthetic import synth_backlog
    from r2ray.catalog import load_catalog
    from r2ray.embedding_cache import embed_texts
    from r2ray.encoders import load_encoder

    texts = synth_backlog(load_catalog(), args.queries, seed=7).column("query").to_pylist()
    encoder = load_encoder("minilm")
    with tempfile.TemporaryDirectory(prefix="r2ray-cache-") as folder:
        os.environ["R2RAY_EMBEDDING_CACHE"] = folder
        start = time.perf_counter()
        first = embed_texts(encoder, texts)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        again = embed_texts(encoder, texts)
        cached_s = time.perf_counter() - start
    assert (first == again).all()
    print(f"{len(texts):,} query texts (mean {sum(map(len, texts)) / len(texts):.0f} characters), "
          f"MiniLM on {encoder.device}")
    print(f"  encode, empty cache   {encode_s:8.2f} s  ({len(texts) / encode_s:,.0f} texts/s)")
    print(f"  again, from the cache {cached_s:8.2f} s  ({len(texts) / cached_s:,.0f} texts/s)")
    print(f"  saved per later command: {encode_s - cached_s:.2f} s ({encode_s / cached_s:.0f}x)")


if __name__ == "__main__":
    main()
