"""The local stack (infra/local) as an operator uses it: up.sh; a model registered on its MLflow
*server* and promoted; a backlog on its S3; the README's `ray job submit`, loading the model by
alias through the server; `serve deploy` of the config up.sh wrote; one /v1/route call priced
from the job's manifest; down.sh, after which none of the stack's processes is left."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import REPO, free_port, port_listeners
from r2ray.bench.synthetic import synth_backlog

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PORTS = ["RAY_PORT", "DASHBOARD_PORT", "RAY_CLIENT_PORT", "DASHBOARD_AGENT_PORT", "SERVE_PORT",
         "MLFLOW_PORT", "S3_PORT", "WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT",
         "WEED_ADMIN_PORT", "HAPROXY_METRICS_PORT", "HAPROXY_STATS_PORT"]


def run(command: list[str], env: dict, timeout_s: float) -> str:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command[:3]} exited {done.returncode}:\n{output[-4000:]}"
    return output


def stack_env(state: Path) -> dict:
    """The clients' environment, as `source env.sh` gives it."""
    env = {}
    for line in (state / "env.sh").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def stack_processes(state: Path) -> list:
    """Every process of the stack: up.sh's leaders, their descendants and their sessions'
    members."""
    leaders = [int((state / f"{name}.pid").read_text()) for name in ("ray", "mlflow", "s3")]
    found = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in leaders or proc.pid in leaders:
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return list(found.values())


def wait_healthy(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not healthy within {timeout_s} s"
        time.sleep(1)


def test_up_job_submit_serve_deploy_route_down(small_routing_model, tmp_path, monkeypatch):
    from r2ray import storage
    from r2ray.predictor import load_predictor
    from r2ray.registry import register_predictor

    state = tmp_path / "stack"
    ports = {name: free_port() for name in PORTS}
    env = {**os.environ, "R2RAY_LOCAL_DIR": str(state), "R2RAY_PYTHON": sys.executable,
           "AWS_ACCESS_KEY_ID": "r2ray-local", "AWS_SECRET_ACCESS_KEY": "r2ray-local-secret",
           "R2RAY_LOCAL_CPUS": "2", "R2RAY_LOCAL_OBJECT_STORE_BYTES": "300000000",
           # per service: MLflow's server took over 120 s to answer on a host at load 30-40
           "R2RAY_LOCAL_WAIT_S": "300",
           **{f"R2RAY_LOCAL_{name}": str(port) for name, port in ports.items()}}
    for key in ("RAY_ADDRESS", "R2RAY_S3_ENDPOINT", "R2RAY_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    processes, stamps = [], [("start", time.monotonic())]
    try:
        run([str(REPO / "infra" / "local" / "up.sh")], env, timeout_s=900)
        stamps.append(("up.sh", time.monotonic()))
        clients = stack_env(state)
        for key, value in clients.items():
            monkeypatch.setenv(key, value)
        storage_env = {**env, **clients}

        # the model, on the tracking server (artifacts through it to S3), promoted
        import mlflow

        predictor = load_predictor(small_routing_model["path"])
        version = register_predictor(predictor, "r2ray", encoder_spec="precomputed",
                                     tracking_uri=clients["R2RAY_TRACKING_URI"])
        mlflow.MlflowClient(clients["R2RAY_TRACKING_URI"]).set_registered_model_alias(
            "r2ray", "champion", version.version)

        backlog = synth_backlog(small_routing_model["catalog"], 50, seed=21, embeddings=True)
        from r2ray.bench.io import write_table

        write_table(backlog, "s3://backlog/2026-11-29/part-0.parquet")
        stamps.append(("register, backlog", time.monotonic()))

        # the README's command, against the stack
        budget = 3e-5 * 50
        output = run([str(BIN / "ray"), "job", "submit", "--address",
                      clients["RAY_DASHBOARD_ADDRESS"], "--", "python", "jobs/route_batch.py",
                      "--input", "s3://backlog/2026-11-29/", "--output", "s3://routed",
                      "--model", "models:/r2ray@champion", "--budget-usd", str(budget),
                      "--run-id", "nightly-2026-11-29", "--workers", "1"],
                     storage_env, timeout_s=300)
        stamps.append(("job submit", time.monotonic()))
        assert "run nightly-2026-11-29 committed" in output
        manifest = json.loads(storage.read_text("s3://routed/nightly-2026-11-29/manifest.json"))
        assert manifest["counts"]["routed"] == 50
        assert manifest["model"]["name"] == "r2ray" and manifest["model"]["version"] == "1"
        assert manifest["solve"]["lambda"] > 0  # the budget binds

        run([str(BIN / "serve"), "deploy", str(state / "serve.yaml")], storage_env, timeout_s=120)
        url = clients["R2RAY_LOCAL_SERVE_URL"]
        health = wait_healthy(f"{url}/healthz", timeout_s=180)
        stamps.append(("serve deploy, healthy", time.monotonic()))
        assert health["version"] == "r2ray/1"
        assert health["price_source"] == "manifest s3://routed/nightly-2026-11-29/manifest.json"
        row = backlog.slice(0, 1).to_pylist()[0]
        response = httpx.post(f"{url}/v1/route", timeout=30,
                              headers={"Authorization": f"Bearer {clients['R2RAY_LOCAL_API_KEY']}"},
                              json={"query": row["query"], "query_id": row["query_id"],
                                    "embedding": row["embedding"]})
        assert response.status_code == 200, response.text
        assert port_listeners(httpx.URL(url).port) == {"haproxy"}   # as on the cluster
        routed = response.json()
        assert routed["model"] in {m.name for m in small_routing_model["catalog"].models}
        assert routed["version"] == "r2ray/1" and routed["max_tokens"] > 0
        stamps.append(("route call", time.monotonic()))
    finally:
        if (state / "ray.pid").exists():
            processes = stack_processes(state)  # now: with the job's and Serve's workers
            stopped = subprocess.run([str(REPO / "infra" / "local" / "down.sh")], env=env,
                                     capture_output=True, text=True, timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            stamps.append(("down.sh", time.monotonic()))
            print("seconds per stage:", {name: round(at - before, 1) for (_, before), (name, at)
                                         in zip(stamps, stamps[1:])})   # with -s
    left = [p for p in processes if p.is_running() and p.status() != "zombie"]
    assert processes and not left, f"left running: {left}"
