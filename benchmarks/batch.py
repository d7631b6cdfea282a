"""Batch job throughput against its limits, side by side in one run (prints figures; not a test).

1. Text input, encoder on, the same texts three ways: the encoder alone in this process (batch 32,
   all cores' threads; measured before and after the Ray passes, the faster taken), the
   job's own encoder-only pass (``EncodeOnlyWorker`` in the job's pool shape, actor start
   included), and ``route_batch`` end to end. Targets: end to end ≥ 0.8 × in-process.
2. Precomputed embeddings, per size N: the predictor's ``predict`` in this process over the same
   N embeddings (one thread and all cores' threads, before the jobs and after each; the fastest
   is the reference), and
   ``route_batch`` end to end in a fresh driver process (stage timings, driver peak RSS, which
   must not grow with N): starting its own local Ray, then twice joining a Ray cluster that is
   already up (as ``ray job submit`` runs the nightly job): the fresh cluster's first job, and
   the next, as a standing nightly cluster runs it. Target: end to end ≥ 0.5 × in-process.
   With two sizes or more, each way's marginal rate between consecutive sizes (the rate on the
   extra rows) and the fixed seconds a run pays once, apart from its rows.
The job logs into an MLflow store created before the clock starts (``tracking_store``).

Usage: python benchmarks/batch.py [--text-queries 2000 [20000 ...]] [--sizes 200000 1000000]
       [--workers W] [--cpus-per-worker C] [--threads-per-worker T] [--gpus-per-worker G]
       [--batch-size B] [--read-tasks R]   (pool settings left out are derived from the cluster, as in the job)
       [--encoder-precision auto|float32|bfloat16]   (the job's and the in-process encoder's)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

POOL_FLAGS = ("workers", "cpus_per_worker", "threads_per_worker", "gpus_per_worker", "batch_size",
              "read_tasks", "encoder_precision")


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


def route_settings(args, backlog: str, model: str, out: str, run_id: str):
    from r2ray.batch.config import route_config

    return route_config(input=backlog, output=out, model=model, budget_per_query_usd=2e-4,
                        run_id=run_id, tracking_uri=tracking_store(out),
                        **{name: getattr(args, name) for name in POOL_FLAGS})


def tracking_store(out: str) -> str:
    """A SQLite MLflow store under ``out``, created (its tables migrated: ~4 s here) before any
    clock starts, as a nightly job logs into a store that exists; the job's report stage still
    imports MLflow and logs its run."""
    os.makedirs(out, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    if not os.path.exists(f"{out}/mlflow.db"):
        subprocess.run([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient("
                        "tracking_uri=sys.argv[1]).search_experiments()", uri], check=True,
                       capture_output=True)
    return uri


def route(config) -> dict:
    from r2ray.batch import route_batch

    start = time.perf_counter()
    manifest = route_batch(config)
    manifest["wall_s"] = time.perf_counter() - start
    return manifest


def in_process_encoder_qps(texts: list[str], precision: str) -> float:
    """The plain encoder: batch 32, one torch thread per core, model loaded and warm, at the
    job's precision."""
    import torch

    from r2ray.encoders import load_encoder

    torch.set_num_threads(os.cpu_count())
    encoder = load_encoder("minilm", device=None, batch_size=32, precision=precision)
    encoder.encode(texts[:64])
    start = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / (time.perf_counter() - start)


def actor_encoder_qps(backlog: str, model: str, config) -> float:
    """The job's encoder pass alone, in the job's pool shape, actor start included."""
    import ray

    from r2ray.batch.backlog import plan_units, planned_rows
    from r2ray.batch.job import load_model, score_pool_options
    from r2ray.batch.pool import pool_shape
    from r2ray.batch.score import EncodeOnlyWorker

    pool = pool_shape(config, ray.cluster_resources(), encodes_text=True,  # as the job plans it
                      backlog_rows=planned_rows(plan_units(backlog)[0]))
    files = load_model(model, None, None).files
    ds = ray.data.read_parquet(backlog).repartition(target_num_rows_per_block=pool.batch_size)
    ds = ds.materialize()
    start = time.perf_counter()
    ds.map_batches(EncodeOnlyWorker, batch_size=pool.batch_size, batch_format="pyarrow",
                   **score_pool_options(pool), fn_constructor_kwargs={
                       "files": files, "threads": pool.threads_per_worker,
                       "precision": pool.encoder_precision}).materialize()
    return ds.count() / (time.perf_counter() - start)


def text_figures(args, catalog) -> None:
    """Per size in ``--text-queries``: the in-process encoder (before and after the Ray passes,
    the faster taken), the job's encoder-only actor pass and ``route_batch`` end to end, on one
    running local Ray. With two sizes or more, the job's marginal rate between consecutive sizes
    and the fixed seconds a run pays once (its actors' and the solver's start, MLflow): the
    target holds at a size only where those seconds are small against the encoding."""
    import pyarrow.parquet as pq
    import ray

    walls: dict[str, list[tuple[int, float, float]]] = {}   # as embedding_figures keeps them
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)   # "local": never a cluster a stale ray_current_cluster names
    with tempfile.TemporaryDirectory(prefix="r2ray-bench-") as tmp:
        model = train_model(f"{tmp}/model", catalog, encoder="minilm", n_queries=1000)
        for size in args.text_queries:
            backlog = write_backlog(f"{tmp}/backlog-{size}", catalog, size, embeddings=False)
            texts = pq.read_table(backlog, columns=["query"]).column("query").to_pylist()
            config = route_settings(args, backlog, model, f"{tmp}/out-{size}", f"text{size}")
            before = in_process_encoder_qps(texts, config.encoder_precision)
            actors = actor_encoder_qps(backlog, model, config)
            manifest = route(config)
            after = in_process_encoder_qps(texts, config.encoder_precision)
            plain = max(before, after)   # the slower one ran beside an idle cluster, or a busy host
            e2e = len(texts) / manifest["wall_s"]
            print(f"text input, {len(texts):,} queries, MiniLM at precision "
                  f"{config.encoder_precision}; pool {manifest['scoring_pool']}")
            print(f"  in-process encoder (batch 32, {os.cpu_count()} threads) {plain:8.1f} texts/s"
                  f"   (before {before:.1f}, after {after:.1f}: the faster)")
            print(f"  job's encoder-only actor pass      {actors:8.1f} texts/s   ratio "
                  f"{actors / plain:.3f}")
            print(f"  job end to end                     {e2e:8.1f} queries/s ratio "
                  f"{e2e / plain:.3f}   (target ≥ 0.8; {manifest['wall_s']:.1f} s, stages "
                  f"{manifest['timings']})", flush=True)
            walls.setdefault("text, a running cluster", []).append(
                (size, manifest["wall_s"], plain))
    ray.shutdown()
    print_marginal(walls, "the in-process encoder")


def in_process_predict_qps(model: str, backlog: str) -> dict[int, float]:
    """{torch threads: queries/s} of the saved predictor's ``predict`` over the backlog's
    embeddings in this process (read before the clock starts)."""
    import pyarrow.parquet as pq

    from r2ray.predictor.data import embedding_matrix
    from r2ray.predictor.persist import load_predictor

    predictor = load_predictor(model, device=None)
    x = embedding_matrix(pq.read_table(backlog, columns=["embedding"]).column("embedding"))
    out = {}
    for threads in sorted({1, os.cpu_count()}):
        predictor.threads = threads
        predictor.predict(x[:256])
        start = time.perf_counter()
        predictor.predict(x)
        out[threads] = len(x) / (time.perf_counter() - start)
    return out


def peak_rss_mb() -> float:
    """This process's own peak resident memory (MB): ``VmHWM`` of /proc/self/status. Not
    ``getrusage``'s ``ru_maxrss``: Linux carries the parent's peak over fork and exec into it, so
    the child reported this script's peak (the model it trained, the backlog it wrote) instead
    (a child of a 400 MB parent: ru_maxrss 407 MB, VmHWM 11 MB)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):       # not Linux: the rusage figure, with that caveat
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PrivateMemoryPeak:
    """Peak private (``RssAnon``) and shared (``RssShmem``) resident memory of this process (MB),
    sampled every ``every_s`` in a thread. ``VmHWM`` counts the object store's pages a driver
    reads in place (mapped, not copied) as its own; these two tell its heap from those pages."""

    def __init__(self, every_s: float = 0.005):
        self.peak = {"RssAnon": 0.0, "RssShmem": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                with open("/proc/self/status") as status:
                    for line in status:
                        key = line.split(":")[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)
            except OSError:                  # not Linux: no figures
                return

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


def one_size(args) -> None:
    """Child process: only the routing of a prepared backlog, so its peak RSS is the driver's."""
    sampler = PrivateMemoryPeak()
    manifest = route(route_settings(args, args.backlog, args.model, args.out, f"n{args.size}"))
    peak, private = peak_rss_mb(), sampler.stop()
    print(json.dumps({"size": args.size, "wall_s": manifest["wall_s"],
                      "qps": args.size / manifest["wall_s"], "timings": manifest["timings"],
                      "pool": manifest["scoring_pool"], "driver_peak_rss_mb": peak,
                      "driver_peak_private_mb": private["RssAnon"],
                      "driver_peak_shared_mb": private["RssShmem"]}))


def running_cluster() -> str:
    """Start a local Ray cluster in this process (token auth off, so another process may join
    it) and return its GCS address; ``ray.shutdown()`` here stops it."""
    import ray

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:          # read at start-up only: later children that start their own Ray do not see it
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = before
    return ray.get_runtime_context().gcs_address


def route_child(args, size: int, backlog: str, model: str, out: str, address: str | None):
    """``one_size`` in a fresh driver process, on its own local Ray or joining ``address``."""
    pool = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in POOL_FLAGS
            if getattr(args, name) is not None]
    env = dict(os.environ, **({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
                              if address else {}))
    if not address:
        env.pop("RAY_ADDRESS", None)
    child = subprocess.run(
        [sys.executable, __file__, "--size", str(size), "--backlog", backlog, "--model", model,
         "--out", out, "--text-queries", "0", *pool], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        sys.exit(f"N = {size} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def embedding_figures(args, catalog) -> None:
    """Per size: the job in a fresh driver that starts its own local Ray (``r2ray route`` on one
    machine), then two jobs, one after the other, joining a running cluster (what ``ray job
    submit`` does: the cluster is up before the job). The first job on a fresh cluster also
    starts what Ray Data keeps for every later one (its detached stats and autoscaling actors);
    the second is what a standing nightly cluster runs on every night but its first. Each
    against the in-process forward pass measured before the jobs and right after them, whichever
    was faster (one measurement swung 19.0k-23.6k q/s on this host within two minutes, and a
    ratio against the slow one flattered the job: 0.55 against 0.44)."""
    import ray

    walls: dict[str, list[tuple[int, float, float]]] = {}   # where → (N, wall s, reference q/s)
    with tempfile.TemporaryDirectory(prefix="r2ray-bench-") as tmp:
        model = train_model(f"{tmp}/model", catalog, encoder=None)
        for size in args.sizes:
            backlog = write_backlog(f"{tmp}/backlog-{size}", catalog, size, embeddings=True)
            print(f"precomputed embeddings, N = {size:,}")
            before = in_process_predict_qps(model, backlog)
            own = route_child(args, size, backlog, model, f"{tmp}/out-own-{size}", None)
            print_job("its own local Ray", own, size, in_process_predict_qps(model, backlog),
                      before, walls)
            address = running_cluster()
            try:
                first = route_child(args, size, backlog, model, f"{tmp}/out-first-{size}", address)
                second = route_child(args, size, backlog, model, f"{tmp}/out-next-{size}", address)
            finally:
                ray.shutdown()
            forward = in_process_predict_qps(model, backlog)
            print_job("a running cluster, its first job", first, size, forward, before, walls)
            print_job("the same cluster, its next job", second, size, forward, before, walls)
    print_marginal(walls, "the in-process predict")


def print_job(where: str, job: dict, size: int, forward: dict[int, float],
              before: dict[int, float], walls: dict) -> None:
    """One job's figures against the faster in-process forward pass, before or after it."""
    best = max(*forward.values(), *before.values())
    print(f"  job on {where}; pool {job['pool']}")
    print("    in-process predict  " + ", ".join(
        f"{q:,.0f} q/s on {t} thread(s)" for t, q in forward.items())
          + f" (before the jobs: {max(before.values()):,.0f}; the ratio uses the "
          f"higher, {best:,.0f})")
    print(f"    job end to end      {job['qps']:,.0f} q/s ({job['wall_s']:.1f} s)   "
          f"ratio {job['qps'] / best:.3f} (target ≥ 0.5); driver peak RSS "
          f"{job['driver_peak_rss_mb']:.0f} MB (private {job['driver_peak_private_mb']:.0f}"
          f", object store pages {job['driver_peak_shared_mb']:.0f})")
    print(f"    stages (s)          {job['timings']}", flush=True)
    walls.setdefault(where, []).append((size, job["wall_s"], best))


def print_marginal(walls: dict[str, list[tuple[int, float, float]]], reference_name: str) -> None:
    """Between consecutive sizes: the job's rate on the extra rows, (N₂ − N₁) / (T₂ − T₁), against
    the larger size's reference, and the fixed seconds that rate implies (T₁ − N₁ / rate): what
    a nightly bill scales with, apart from what every run pays once."""
    for where, runs in walls.items():
        for (n1, t1, _), (n2, t2, reference) in zip(runs, runs[1:]):
            if t2 <= t1:
                print(f"  {where}, N {n1:,} → {n2:,}: no marginal rate (the larger run was not "
                      f"slower: {t1:.1f} s, {t2:.1f} s)")
                continue
            rate = (n2 - n1) / (t2 - t1)
            print(f"  {where}, N {n1:,} → {n2:,}: marginal {rate:,.0f} q/s, ratio "
                  f"{rate / reference:.3f} to {reference_name}; fixed "
                  f"{t1 - n1 / rate:.1f} s a run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-queries", type=int, nargs="*", default=[2000],
                        help="text backlog sizes; 0 or none: skip the text path")
    parser.add_argument("--sizes", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--workers", type=int)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--threads-per-worker", type=int)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--read-tasks", type=int)
    parser.add_argument("--encoder-precision", default="auto",
                        choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--backlog", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size:
        return one_size(args)

    from r2ray.catalog import load_catalog

    catalog = load_catalog()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    args.text_queries = [n for n in args.text_queries if n > 0]
    if args.text_queries:
        text_figures(args, catalog)
    if args.sizes:
        embedding_figures(args, catalog)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
