"""`r2ray demo` (the README's `make run`): the main job end to end on the embedded default.

Synthetic world bench → the predictor chosen by 3-fold cross-validation among the ``small``
candidates (``TrainConfig``'s defaults) on MiniLM embeddings of the query text, register it in a
local MLflow store and promote it to ``champion`` → route a fresh synthetic backlog of queries
(text only; the workers embed it) under one global budget on a local Ray → print the committed
manifest's summary. Everything lands under ``workdir`` (local files).
"""

from __future__ import annotations

import os

DEMO_MODEL = "r2ray"
DEMO_ALIAS = "champion"
TRAIN_QUERIES = 3_000            # bench queries × 176 arms
BUDGET_PER_QUERY_USD = 2e-4      # between the cheapest arms (~1e-5) and the best (~1e-3)
ARTIFACTS_FOLDER = "mlartifacts"  # under workdir: the local store's artifacts (models, plots)


def demo_experiments(tracking_uri: str, artifact_root: str) -> None:
    """Create the MLflow experiments the demo logs to with their artifacts under
    ``artifact_root``: a local SQLite store otherwise puts them in ``./mlruns`` of the current
    folder, outside ``workdir`` (left behind by ``rm -r workdir``, and lost to the registered
    model when the demo is next run from elsewhere). An existing experiment is left as it is."""
    from mlflow import MlflowClient

    from r2ray.batch.report import BATCH_EXPERIMENT
    from r2ray.registry import REGISTER_EXPERIMENT, mlflow_guard
    from r2ray.training import TrainConfig

    client = MlflowClient(tracking_uri)
    with mlflow_guard():
        for name in (TrainConfig.model_fields["experiment"].default, REGISTER_EXPERIMENT,
                     BATCH_EXPERIMENT):
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=f"{artifact_root}/{name}")


def check_demo_arguments(n_queries: int, seed: int) -> None:
    """Refuse a backlog size below 1 query or a negative seed before any work: the backlog is
    written only after minutes of training, so a bad ``--queries`` used to fail there."""
    from r2ray.errors import R2RayError

    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise R2RayError(f"--queries {n_queries!r}: give a whole number of backlog queries of "
                         "at least 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise R2RayError(f"--seed {seed!r}: give a whole number of at least 0")


def run_demo(workdir: str = "runs/demo", n_queries: int = 20_000, seed: int = 0) -> dict:
    from r2ray.bench.stats import bench_stats_report
    from r2ray.bench.synthetic import write_world
    from r2ray.catalog import load_catalog
    from r2ray.batch.config import route_config
    from r2ray.batch import route_batch, summarise_manifest
    from r2ray.training import TrainConfig, train_predictor_job

    check_demo_arguments(n_queries, seed)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tracking = f"sqlite:///{workdir}/mlflow.db"
    demo_experiments(tracking, f"{workdir}/{ARTIFACTS_FOLDER}")
    catalog = load_catalog()
    bench, backlog = f"{workdir}/bench.parquet", f"{workdir}/backlog/part-0.parquet"

    print(f"[1/4] synthetic world: {TRAIN_QUERIES:,} bench queries × {catalog.n_arms} arms")
    print(write_world(catalog, n_queries=TRAIN_QUERIES, seed=seed, bench_uri=bench))
    print(bench_stats_report([bench]))
    print(f"[2/4] train on MiniLM embeddings, register {DEMO_MODEL}, promote @{DEMO_ALIAS}")
    trained = train_predictor_job(TrainConfig(
        bench=bench, registered_name=DEMO_MODEL, encoder="minilm", promote=DEMO_ALIAS,
        seed=seed, tracking_uri=tracking))
    print(trained.report())
    print(f"[3/4] backlog: {n_queries:,} new queries (world seed {seed + 1}), text only")
    print(write_world(catalog, n_queries=n_queries, seed=seed + 1, backlog_uri=backlog))
    print(f"[4/4] route under ${BUDGET_PER_QUERY_USD * n_queries:,.2f} "
          f"(${BUDGET_PER_QUERY_USD} per query) on a local Ray")
    manifest = route_batch(route_config(
        input=os.path.dirname(backlog), output=f"{workdir}/runs",
        model=f"models:/{DEMO_MODEL}@{DEMO_ALIAS}", tracking_uri=tracking,
        budget_per_query_usd=BUDGET_PER_QUERY_USD, run_id=f"demo-seed{seed}", force=True))
    print(summarise_manifest(manifest))
    return manifest
