"""`r2ray demo` (the README's `make run`): the main job end to end on the embedded default."""

from __future__ import annotations

import os

from r2ray.catalog import load_catalog


def run_demo(workdir: str = "runs/demo", n_queries: int = 20_000, seed: int = 0) -> None:
    """Synthetic world → bench statistics, all under ``workdir`` (local files)."""
    from r2ray.bench.stats import bench_stats_report
    from r2ray.bench.synthetic import write_world

    os.makedirs(workdir, exist_ok=True)
    catalog = load_catalog()
    bench = os.path.join(workdir, "bench.parquet")
    print(write_world(catalog, n_queries=n_queries, seed=seed, bench_uri=bench))
    print(bench_stats_report([bench]))
