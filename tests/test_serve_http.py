"""Online routing end to end over real HTTP on 127.0.0.1: Ray Serve, on the session's Ray cluster,
running the app that `serve run serve.app:app` builds, models from a throwaway MLflow registry, a
local stand-in for a paid LLM API, and the MiniLM text path."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import mlflow
import pytest
import yaml

from conftest import REPO, UPSTREAM_KEY, connect_driver, free_port, port_listeners

pytestmark = pytest.mark.slow
API_KEY = "test-key-123"


class FakeLLM(BaseHTTPRequestHandler):
    """OpenAI-compatible /v1/chat/completions under /ok/ (answers) and /broken/ (503)."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.received.append({"path": self.path, "body": body,
                                 "authorization": self.headers.get("Authorization")})
        if self.path.startswith("/broken/"):
            self._send(503, {"error": {"message": "overloaded, try later"}})
            return
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "4"}}],
                         "usage": {"prompt_tokens": 20, "completion_tokens": 3,
                                   "total_tokens": 23}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, small_routing_model, mlflow_store):
    """A throwaway SQLite registry holding `r2ray-test` v1 under @champion, and `r2ray-text`
    (per-arm Ridge on MiniLM embeddings of 200 synthetic queries) v1 under @champion."""
    from r2ray.bench.synthetic import synth_bench
    from r2ray.encoders import MINILM, load_encoder
    from r2ray.predictor import load_predictor, make_predictor
    from r2ray.predictor.data import bench_arrays
    from r2ray.registry import register_predictor

    folder = tmp_path_factory.mktemp("mlflow")
    uri = mlflow_store(folder)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "serve-tests", artifact_location=str(folder / "artifacts")))
    catalog = small_routing_model["catalog"]
    register_predictor(load_predictor(small_routing_model["path"]), "r2ray-test",
                       encoder_spec="precomputed", tracking_uri=uri)
    arrays = bench_arrays(synth_bench(catalog, 200, seed=21), catalog)
    encoder = load_encoder(MINILM)
    text_predictor = make_predictor("per_arm_ridge").fit(
        arrays.with_embedding(encoder.encode(list(arrays.query))), catalog)
    register_predictor(text_predictor, "r2ray-text", encoder_spec=MINILM, tracking_uri=uri)
    client = mlflow.MlflowClient()
    for name in ("r2ray-test", "r2ray-text"):
        client.set_registered_model_alias(name, "champion", "1")
    yield {"uri": uri, "catalog": catalog, "text_predictor": text_predictor, "encoder": encoder,
           "small_predictor": small_routing_model["path"]}
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="module")
def serving(registry, upstream, ray_cluster, tmp_path_factory):
    """Serve on the session's Ray cluster (its environment has UPSTREAM_KEY), on a free port, with
    two apps: `/` (precomputed embeddings, endpoints to the fake LLM) and `/text` (MiniLM). Yields
    the base URL and the cluster's Prometheus endpoint."""
    from ray import serve

    catalog = registry["catalog"].to_dict()
    for model in catalog["models"]:
        model["endpoint"] = f"{upstream}/{'broken' if model['name'] == 'GLM-4.6' else 'ok'}/v1"
    catalog_path = tmp_path_factory.mktemp("serve") / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog))
    os.environ["R2RAY_TEST_API_KEYS"] = f"other-key,{API_KEY}"   # read when the app is built
    sys.path.insert(0, str(REPO))
    from serve.app import app

    connect_driver(ray_cluster)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"tracking_uri": registry["uri"], "lambda": 2000.0, "router_cpus": 0.2,
                  "watch_interval_s": 0.5, "price_sync_s": 0.1}
        serve.run_many([  # both apps start together: the text router's MiniLM load overlaps
            serve.RunTarget(app(common | {
                "model": "models:/r2ray-test@champion", "catalog": str(catalog_path),
                "api_key_envs": "R2RAY_TEST_API_KEYS", "max_request_bytes": 50_000,
                "upstream_key_envs": {"*": "R2RAY_TEST_UPSTREAM_KEY"},
                "pacing": {"target_usd_per_s": 1e-3, "window_s": 1.0}}),
                name="r2ray", route_prefix="/"),
            serve.RunTarget(app(common | {"model": "models:/r2ray-text@champion",
                                          "encoder_precision": "bfloat16"}),
                            name="text", route_prefix="/text")])
        yield {"url": f"http://127.0.0.1:{port}", "metrics": ray_cluster["metrics"]}
    finally:
        serve.shutdown()
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def embedding(registry):
    from r2ray.bench.synthetic import synth_backlog

    return synth_backlog(registry["catalog"], 1, seed=31, embeddings=True).to_pylist()[0]["embedding"]


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_route_over_http(serving, embedding):
    base = serving["url"]
    response = httpx.post(f"{base}/v1/route", headers=AUTH, timeout=30, json={
        "query": "What is 2+2?", "embedding": embedding, "tenant": "acme", "lambda": 2000.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "r2ray-test/1" and body["lambda"] == 2000.0
    assert body["messages"][-1]["content"].startswith("What is 2+2?")
    assert body["max_tokens"] >= body["budget"] and len(body["alternatives"]) == 3
    assert response.headers["x-r2ray-model"] == body["model"]
    assert response.headers["x-r2ray-version"] == "r2ray-test/1"
    health = httpx.get(f"{base}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["price_source"] == "config"
    models = httpx.get(f"{base}/v1/models", headers=AUTH, timeout=30).json()
    assert {m["id"] for m in models["data"]} == {"r2ray", "Gemma-3-1B", "Llama-3.1-70B-Instruct",
                                                  "GLM-4.6"}


def test_requests_arrive_through_haproxy(serving):
    """Serve's port is HAProxy's (Ray's high-throughput ingress, as infra/k8s runs it), and both
    apps answer behind it: the cluster started with RAY_SERVE_ENABLE_HA_PROXY=1."""
    assert port_listeners(httpx.URL(serving["url"]).port) == {"haproxy"}
    for path in ("/-/healthz", "/healthz", "/text/healthz"):   # KubeRay's probe, then each app
        response = httpx.get(f"{serving['url']}{path}", timeout=10)
        assert response.status_code == 200, (path, response.text[:200])


def test_chat_completions_forwarded_to_the_chosen_models_endpoint(serving, embedding):
    base = serving["url"]
    FakeLLM.received.clear()
    response = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": "r2ray", "temperature": 0, "r2ray": {"embedding": embedding,
                                                     "allowed_models": ["Gemma-3-1B",
                                                                        "Llama-3.1-70B-Instruct"]},
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2+2?"}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "4"
    chosen = response.headers["x-r2ray-model"]
    assert chosen in ("Gemma-3-1B", "Llama-3.1-70B-Instruct")
    [sent] = FakeLLM.received
    assert sent["path"] == "/ok/v1/chat/completions" and sent["body"]["model"] == chosen
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["body"]["temperature"] == 0 and "r2ray" not in sent["body"]
    assert sent["body"]["max_tokens"] == int(response.headers["x-r2ray-max-tokens"])
    assert sent["body"]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_upstream_failure_is_a_502_with_the_reason(serving, embedding):
    base = serving["url"]
    response = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": "GLM-4.6", "r2ray": {"embedding": embedding},
        "messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "503" in message and "overloaded" in message and UPSTREAM_KEY not in message


def test_auth_size_limit_and_malformed_bodies(serving, embedding):
    base = serving["url"]
    url = f"{base}/v1/route"
    assert httpx.post(url, json={"query": "x"}, timeout=30).status_code == 401
    assert httpx.post(url, json={"query": "x"}, timeout=30,
                      headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    for body, param in (({"query": "x", "embedding": embedding, "lamda": 1}, "lamda"),
                        ({"embedding": embedding}, "query"),
                        ({"query": "x", "embedding": embedding, "max_cost_usd": "cheap"},
                         "max_cost_usd"),
                        ({"query": "x", "embedding": embedding[:10]}, "embedding"),
                        ({"query": "x"}, "embedding")):
        response = httpx.post(url, json=body, headers=AUTH, timeout=30)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param
        assert param in response.json()["error"]["message"]
    broken = httpx.post(url, content=b'{"query": ', headers=AUTH | {
        "content-type": "application/json"}, timeout=30)
    assert broken.status_code == 422
    huge = httpx.post(url, json={"query": "x" * 60_000, "embedding": embedding}, headers=AUTH,
                      timeout=30)
    assert huge.status_code == 413 and "50000 bytes" in huge.json()["error"]["message"]


def test_prometheus_counts_decisions_spend_and_lambda(serving, embedding):
    httpx.post(f"{serving['url']}/v1/route", headers=AUTH, timeout=30,
               json={"query": "metrics?", "embedding": embedding, "tenant": "metered"})
    wanted = ("ray_r2ray_decisions_total{", "ray_r2ray_spend_usd_total{", "ray_r2ray_lambda{")
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline and len(found) < len(wanted):
        lines = httpx.get(f"{serving['metrics']}/metrics", timeout=10).text.splitlines()
        found = {w: line for w in wanted for line in lines
                 if line.startswith(w) and ('tenant="metered"' in line or "lambda" in w)}
        time.sleep(0.5)
    assert len(found) == len(wanted), found
    assert 'deployment="Ingress"' in found["ray_r2ray_decisions_total{"]
    assert float(found["ray_r2ray_spend_usd_total{"].rsplit(" ", 1)[1]) > 0
    assert float(found["ray_r2ray_lambda{"].rsplit(" ", 1)[1]) > 0


def test_text_queries_are_encoded_with_minilm_online(serving, registry):
    from r2ray.prompting import estimate_tokens
    from r2ray.encoders import MINILM, load_encoder
    from r2ray.routing import query_key
    from r2ray.serving.router import RouteItem, RoutingModel, route_items

    health = httpx.get(f"{serving['url']}/text/healthz", timeout=30).json()
    assert (health["encoder"], health["encoder_precision"]) == (MINILM, "bfloat16")
    query = "Prove that the square root of 2 is irrational, step by step."
    response = httpx.post(f"{serving['url']}/text/v1/route", timeout=60,
                          json={"query": query, "lambda": 500.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "r2ray-text/1"
    # the app runs bfloat16 (asked for: any CPU runs it); the same encoder here
    local = RoutingModel(registry["text_predictor"], load_encoder(MINILM, precision="bfloat16"),
                         registry["catalog"], "x")
    [expected] = route_items(local, [RouteItem(query, estimate_tokens(query), query_key(query),
                                               500.0)])
    assert (body["model"], body["budget"]) == (expected.model, expected.budget)
    assert body["q_hat"] == pytest.approx(expected.q_hat, abs=1e-4)


def test_version_swap_under_load_fails_no_request(serving, embedding, registry):
    """Register v2, move @champion while 4 clients keep routing; the watcher swaps, nothing fails."""
    from r2ray.predictor import load_predictor
    from r2ray.registry import register_predictor

    base, versions, failures = serving["url"], [], []

    async def client(stop: asyncio.Event):
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                response = await http.post(f"{base}/v1/route", headers=AUTH,
                                           json={"query": "2+2?", "embedding": embedding})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.append(response.json()["version"])

    async def load():
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(stop)) for _ in range(4)]
        await asyncio.sleep(1.0)
        v2 = await asyncio.to_thread(register_predictor, load_predictor(registry["small_predictor"]),
                                     "r2ray-test", encoder_spec="precomputed",
                                     tracking_uri=registry["uri"])
        mlflow.MlflowClient().set_registered_model_alias("r2ray-test", "champion", v2.version)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and versions[-20:].count("r2ray-test/2") < 20:
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(load())
    assert failures == []
    assert "r2ray-test/1" in versions and versions[-20:] == ["r2ray-test/2"] * 20
    first_new = versions.index("r2ray-test/2")
    assert versions[first_new:].count("r2ray-test/1") <= 4   # at most what was in flight
