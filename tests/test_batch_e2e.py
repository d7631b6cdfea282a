"""End to end as operators run it: `ray job submit` of jobs/route_batch.py to a cluster started with
`ray start --head` (the session's, from conftest), backlog and output on a real S3 server
(SeaweedFS on 127.0.0.1), the model from the MLflow registry by alias. The job loses a scoring
worker mid-run and must still commit exactly the routing of the same stages run in memory without
Ray.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from conftest import RAY, REPO
from r2ray import storage
from r2ray.bench.io import read_table, write_table
from r2ray.bench.synthetic import synth_backlog

pytestmark = pytest.mark.slow
NO_AGENT = "No available agent to submit job"   # Ray's 500 while the head's job agent starts
AGENT_WAIT_TRIES = 30                           # × 2 s


@pytest.fixture(scope="module")
def registered_model(small_routing_model, mlflow_store, tmp_path_factory):
    """The small predictor registered in a SQLite MLflow store, alias `champion`."""
    import mlflow

    from r2ray.predictor import load_predictor
    from r2ray.registry import register_predictor

    tracking = mlflow_store(tmp_path_factory.mktemp("mlflow"))
    predictor = load_predictor(small_routing_model["path"])
    version = register_predictor(predictor, "r2ray-e2e", encoder_spec="precomputed",
                                 tracking_uri=tracking)
    mlflow.MlflowClient().set_registered_model_alias("r2ray-e2e", "champion", version.version)
    return {"uri": "models:/r2ray-e2e@champion", "tracking": tracking}


def _submit(cluster, args: list[str], runtime_env: dict | None = None) -> str:
    command = [RAY, "job", "submit", "--address", cluster["dashboard"]]
    if runtime_env:
        command += ["--runtime-env-json", json.dumps(runtime_env)]
    entry = " ".join([f"cd {REPO} &&", sys.executable, "jobs/route_batch.py", *args])
    for _ in range(AGENT_WAIT_TRIES):  # a fresh head's job agent may not be up yet, on a busy
        done = subprocess.run([*command, "--", "bash", "-c", entry], env=cluster["env"],  # host
                              capture_output=True, text=True, timeout=900, cwd=cluster["cwd"])
        output = done.stdout + done.stderr
        if done.returncode == 0 or NO_AGENT not in output:  # refused: nothing was submitted
            break
        time.sleep(2)
    assert done.returncode == 0, output[-4000:]
    return output


def _routed(root: str) -> pa.Table:
    return pa.concat_tables([read_table(f) for f in
                             storage.list_files(root, (".parquet",))])


def test_job_submit_routes_s3_backlog_and_survives_a_lost_worker(
        ray_cluster, registered_model, small_routing_model, s3_bucket, tmp_path):
    backlog = synth_backlog(small_routing_model["catalog"], 600, seed=21, embeddings=True)
    write_table(backlog.slice(0, 300), f"{s3_bucket}/backlog/part-0.parquet")
    write_table(backlog.slice(300), f"{s3_bucket}/backlog/part-1.parquet")
    bad = [{"query_id": "blank", "query": " "}, {"query": "no id"},
           {"query_id": backlog.column("query_id")[0].as_py(), "query": "repeat",
            "embedding": backlog.column("embedding")[0].as_py()}]
    storage.write_text(f"{s3_bucket}/backlog/part-2.jsonl",
                       "\n".join(json.dumps(r) for r in bad) + "\n")
    budget = 3e-5 * 600
    args = ["--input", f"{s3_bucket}/backlog", "--output", f"{s3_bucket}/runs",
            "--model", registered_model["uri"], "--tracking-uri", registered_model["tracking"],
            "--budget-usd", str(budget), "--batch-size", "100",
            "--spend-guarantee", "0"]  # the reference solves the whole budget (the guarantee's
                                       # plan is tested in test_spend_guarantee.py)
    marker = tmp_path / "worker-killed"
    output = _submit(ray_cluster, [*args, "--run-id", "nightly"],
                     {"env_vars": {"R2RAY_FAILPOINT": f"kill_worker_once:{marker}"}})
    print(output[-2000:])   # the job's summary, its seconds per stage among it (with -s)
    assert marker.exists()  # a scoring worker really died mid-run
    assert "run nightly committed" in output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in output  # credentials are never logged

    manifest = json.loads(storage.read_text(f"{s3_bucket}/runs/nightly/manifest.json"))
    assert manifest["counts"]["rows_in"] == 603
    assert manifest["counts"]["routed"] == 600 and manifest["counts"]["quarantined"] == 3
    assert manifest["model"]["version"] == "1" and manifest["model"]["name"] == "r2ray-e2e"
    routed = _routed(manifest["output"]["routed"])
    quarantine = pa.concat_tables([read_table(f) for f in storage.list_files(
        manifest["output"]["quarantine"], (".parquet",))])
    assert set(routed.column("query_id").to_pylist()) == set(
        backlog.column("query_id").to_pylist())
    assert quarantine.num_rows == 3
    spend = routed.column("c_hat_usd").to_numpy().sum(dtype=np.float64)
    assert spend <= budget and manifest["spend"]["predicted_usd"] == pytest.approx(spend)
    assert storage.exists(manifest["artifacts"]["spend_plot"])

    # despite the lost worker, the routing is the single-node reference's, arm for arm
    key = lambda t: sorted(zip(t.column("query_id").to_pylist(), t.column("model").to_pylist(),  # noqa: E731
                               t.column("budget").to_pylist()))
    assert key(routed) == _reference_routing(f"{s3_bucket}/backlog", small_routing_model, budget)


def _reference_routing(input_uri: str, model: dict, budget_usd: float) -> list[tuple]:
    """The job's stages called in memory, without Ray: read and validate, keep each id's first
    row, score, solve with the same tie keys; (query_id, model, budget) per query."""
    from r2ray.batch.backlog import plan_units, read_and_validate
    from r2ray.batch.score import score_batch
    from r2ray.predictor import load_predictor
    from r2ray.solver import solve_budget, table_to_steps

    predictor, catalog = load_predictor(model["path"]), model["catalog"]
    units, _ = plan_units(input_uri)
    context = max(m.context for m in catalog.models)
    good = pa.concat_tables([read_and_validate(u, context, predictor.embedding_dim_, True)[0]
                             for u in units]).sort_by("order")
    seen, keep = set(), []
    for query_id in good.column("query_id").to_pylist():
        keep.append(query_id not in seen)
        seen.add(query_id)
    scored = score_batch(good.filter(pa.array(keep)), predictor, catalog)
    steps, _, keys, _ = table_to_steps(scored)
    arms = solve_budget(steps, budget_usd, seed=0, query_key=keys).arm
    return sorted((q, catalog.arms[a].model, catalog.arms[a].budget_tokens)
                  for q, a in zip(scored.column("query_id").to_pylist(), arms))
