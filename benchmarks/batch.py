"""Batch job throughput and driver memory (prints figures; not a test).

1. Text input, encoder on: end-to-end queries/s of `route_batch` ÷ queries/s of the encoder alone
   over the same backlog through the same Ray Data actor pool, in the same run (goal ≥ 0.85).
2. Precomputed embeddings: end-to-end queries/s at N = 200k and 1M, and the driver's peak RSS
   (it must not grow with N). Each size runs in a fresh driver process so peaks are separate.

Usage: python benchmarks/batch.py [--text-queries 4000] [--sizes 200000 1000000] [--gpus-per-worker 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def train_model(folder: str, catalog, encoder: str | None, n_queries: int = 2000) -> str:
    """A jointly conditioned predictor fitted quickly on the world (MiniLM or world embeddings)."""
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.encoders import load_encoder
    from r2ray.predictor import make_predictor, save_predictor
    from r2ray.predictor.data import bench_arrays

    bench = synth_bench(catalog, n_queries, seed=101)
    if encoder:
        arrays = bench_arrays(bench, catalog)
        arrays = arrays.with_embedding(load_encoder(encoder).encode(list(arrays.query)))
    else:
        arrays = bench_arrays(bench, catalog, synth_backlog(catalog, n_queries, 101, True))
    predictor = make_predictor("r2ray", epochs=3).fit(arrays, catalog)
    save_predictor(predictor, folder, encoder_spec=encoder or "precomputed")
    return folder


def write_backlog(folder: str, catalog, n: int, embeddings: bool) -> str:
    from r2ray.bench.synthetic import write_world

    write_world(catalog, n_queries=n, seed=202, backlog_uri=f"{folder}/part-0.parquet",
                embeddings=embeddings, chunk_queries=65_536)
    return folder


class EncodeOnly:
    """The encoder alone, in the same actor pool shape as the scoring stage."""

    def __init__(self):
        from r2ray.encoders import load_encoder
        self.encoder = load_encoder("minilm", device=None)

    def __call__(self, batch):
        import pyarrow as pa
        vectors = self.encoder.encode(batch.column("query").to_pylist())
        return pa.table({"n": [len(vectors)]})


def encoder_only_qps(backlog: str, workers: int, cpus: float, gpus: float, batch: int) -> float:
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.read_parquet(backlog).repartition(workers * 8).materialize()
    n = ds.count()
    start = time.perf_counter()
    ds.map_batches(EncodeOnly, batch_size=batch, batch_format="pyarrow",
                   compute=ActorPoolStrategy(size=workers), num_cpus=cpus,
                   num_gpus=gpus or None).materialize()
    return n / (time.perf_counter() - start)


def route(backlog: str, model: str, out: str, run_id: str, args) -> dict:
    from r2ray.batch.config import route_config
    from r2ray.batch import route_batch

    config = route_config(input=backlog, output=out, model=model, budget_per_query_usd=2e-4,
                          run_id=run_id, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size,
                          tracking_uri=f"sqlite:///{out}/mlflow.db")
    start = time.perf_counter()
    manifest = route_batch(config)
    manifest["wall_s"] = time.perf_counter() - start
    return manifest


def one_size(args) -> None:
    """Child process: only the routing of a prepared backlog, so its peak RSS is the driver's."""
    manifest = route(args.backlog, args.model, args.out, f"n{args.size}", args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": args.size, "wall_s": manifest["wall_s"],
                      "qps": args.size / manifest["wall_s"], "timings": manifest["timings"],
                      "driver_peak_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-queries", type=int, default=4000)
    parser.add_argument("--sizes", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--backlog", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--skip-text", action="store_true")
    args = parser.parse_args()
    if args.size:
        return one_size(args)

    from r2ray.catalog import load_catalog

    catalog = load_catalog()
    if not args.skip_text:
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="r2ray-bench-") as tmp:
            model = train_model(f"{tmp}/model", catalog, encoder="minilm", n_queries=1000)
            backlog = write_backlog(f"{tmp}/backlog", catalog, args.text_queries, embeddings=False)
            encode_qps = encoder_only_qps(backlog, args.workers, args.cpus_per_worker,
                                          args.gpus_per_worker, args.batch_size)
            manifest = route(backlog, model, f"{tmp}/out", "text", args)
            e2e_qps = args.text_queries / manifest["wall_s"]
        ray.shutdown()
        print(f"text input, {args.text_queries:,} queries, MiniLM on "
              f"{args.workers} workers × {args.cpus_per_worker} CPU, {args.gpus_per_worker} GPU")
        print(f"  encoder only      {encode_qps:8.1f} queries/s")
        print(f"  end to end        {e2e_qps:8.1f} queries/s   (stages: {manifest['timings']})")
        print(f"  ratio e2e/encoder {e2e_qps / encode_qps:8.3f}   (goal ≥ 0.85)")
    with tempfile.TemporaryDirectory(prefix="r2ray-bench-") as tmp:
        model = train_model(f"{tmp}/model", catalog, encoder=None) if args.sizes else None
        for size in args.sizes:
            backlog = write_backlog(f"{tmp}/backlog-{size}", catalog, size, embeddings=True)
            child = subprocess.run(
                [sys.executable, __file__, "--size", str(size), "--backlog", backlog,
                 "--model", model, "--out", f"{tmp}/out", "--workers", str(args.workers),
                 "--cpus-per-worker", str(args.cpus_per_worker), "--gpus-per-worker",
                 str(args.gpus_per_worker), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"N = {size} failed:\n{child.stderr[-3000:]}")
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"precomputed embeddings, N = {size:,}: {figures['qps']:,.0f} queries/s end to "
                  f"end ({figures['wall_s']:.1f} s); driver peak RSS "
                  f"{figures['driver_peak_rss_mb']:.0f} MB; stages {figures['timings']}")


if __name__ == "__main__":
    main()
