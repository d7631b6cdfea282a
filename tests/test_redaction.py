"""Credentials never leave in a URI: the helper on every kind of URI, and where r2ray prints, logs
or stores them (registry errors, MLflow's output, the S3 endpoint, catalogue endpoints)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import warnings

import httpx
import mlflow
import pytest
from conftest import free_port, wait_for_port

from r2ray import storage
from r2ray.catalog import ModelSpec
from r2ray.execution.client import CallFailed, post_chat
from r2ray.errors import R2RayError
from r2ray.redaction import (SENSITIVE_PARAMS, redact_text, redact_uri, redact_values,
                             redacted_output)
from r2ray.registry import RegistryError, load_registered
from r2ray.batch.report import STATS_SCHEMA, log_to_mlflow, report_markdown
from r2ray.serving.upstream import UpstreamError, chat_url, forward_chat

SECRET = "s3cr3t-Pa55"


# ---- the helper -----------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, expected", [
    (f"http://u:{SECRET}@mlflow.example.com:5000/", "http://u:***@mlflow.example.com:5000/"),
    (f"postgresql+psycopg2://mlflow:{SECRET}@db/mlflow", "postgresql+psycopg2://mlflow:***@db/mlflow"),
    (f"https://u:{SECRET}@x@host/path", "https://u:***@host/path"),          # raw "@" in it
    (f"http://:{SECRET}@host", "http://:***@host"),
    # a "/" in it (an AWS secret key often has one) ended urlsplit's netloc before the "@"
    (f"s3://AKIAKEY:wJalr/{SECRET}+bPx@bucket/k", "s3://AKIAKEY:***@bucket/k"),
    (f"memory://AKIAKEY:{SECRET}/a/b@bucket/k", "memory://AKIAKEY:***@bucket/k"),
    # a raw "#" or "?" in it (generated passwords often have one) ended the netloc too
    (f"postgresql://mlflow:{SECRET}#1@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
    (f"https://u:{SECRET}?x@host/v1", "https://u:***@host/v1"),
])
def test_userinfo_password_is_masked_and_the_user_kept(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_text(f"input {uri} does not exist") == f"input {expected} does not exist"


@pytest.mark.parametrize("name", SENSITIVE_PARAMS + ("TOKEN", "x-amz-signature"))
def test_credential_query_values_are_masked_case_insensitively(name):
    uri = f"https://h/p?keyword=1&{name}={SECRET}&monkey=2#frag"
    assert redact_uri(uri) == f"https://h/p?keyword=1&{name}=***&monkey=2#frag"


def test_a_presigned_s3_url_and_an_oauth_fragment():
    presigned = (f"https://s3.example.com/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                 f"AKIA{SECRET}%2F20250101&X-Amz-Security-Token={SECRET}&X-Amz-Signature={SECRET}")
    assert SECRET not in redact_uri(presigned)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in redact_uri(presigned)
    assert redact_uri(f"https://h/cb#access_token={SECRET}&state=1") == \
        "https://h/cb#access_token=***&state=1"


@pytest.mark.parametrize("text", [
    "models:/r2ray@champion", "models:/r2ray/3", "s3://bucket/backlog/part-0.jsonl",
    "sqlite:///mlflow.db", "/data/run-1/manifest.json", "user@example.com", "token=abc",
    "https://api.example.com/v1?keyword=x", "http://[::1/", "", "plain words, no URI",
    "http://host:8080/users/@me", "https://example.com/a:b@c",   # a port, a path: no password
    "https://host:8080?to=me@example.com", "https://host:443#user@example.com",
])
def test_strings_without_credentials_are_untouched(text):
    assert redact_uri(text) == text
    assert redact_text(text) == text


def test_every_uri_in_a_message_is_redacted():
    message = (f"API request to http://u:{SECRET}@127.0.0.1:9/api/2.0/x failed; retried "
               f"'https://a:{SECRET}@b.example.com/v1' and (s3://bucket/k), "
               f"url: /api?name=m&token={SECRET}")
    assert redact_text(message) == (
        "API request to http://u:***@127.0.0.1:9/api/2.0/x failed; retried "
        "'https://a:***@b.example.com/v1' and (s3://bucket/k), url: /api?name=m&token=***")


def test_uris_joined_or_nested_in_a_message_are_each_redacted():
    """One match ran from the first scheme to the next white space, so only the first URI's
    password was masked: a comma-joined list leaked the second, a redirect URL the inner one."""
    assert redact_text(f"tried http://a:{SECRET}@h1,http://b:{SECRET}@h2 and "
                       f"https://proxy/login?next=https://c:{SECRET}@h3/x") == (
        "tried http://a:***@h1,http://b:***@h2 and https://proxy/login?next=https://c:***@h3/x")


def test_params_and_manifests_are_redacted_all_the_way_down():
    manifest = {"config": {"tracking_uri": f"http://u:{SECRET}@h", "reserve": 0.02},
                "inputs": [f"https://h/a.jsonl?sig={SECRET}", 3], "pair": ("x", 1.5)}
    assert redact_values(manifest) == {
        "config": {"tracking_uri": "http://u:***@h", "reserve": 0.02},
        "inputs": ["https://h/a.jsonl?sig=***", 3], "pair": ("x", 1.5)}
    assert SECRET in manifest["config"]["tracking_uri"]  # a copy; the caller's dict is kept


def test_redacted_output_covers_prints_log_records_and_warnings(capsys, caplog):
    uri = f"http://u:{SECRET}@host/#/experiments/1"
    with warnings.catch_warnings(record=True) as caught, redacted_output():
        warnings.simplefilter("always")
        print(f"View run at: {uri}")
        print(f"to stderr: {uri}", file=sys.stderr)
        logging.getLogger("mlflow.test").warning("tracking at %s", uri)
        try:
            raise ConnectionError(f"cannot reach {uri}")
        except ConnectionError:
            logging.getLogger("mlflow.test").exception("request failed")
        warnings.warn(f"cannot reach {uri}", UserWarning)
    out, err = capsys.readouterr()
    assert "http://u:***@host" in out and "http://u:***@host" in err
    assert SECRET not in out + err + caplog.text
    assert "ConnectionError: cannot reach http://u:***@host" in caplog.text
    assert [str(w.message) for w in caught] == ["cannot reach http://u:***@host/#/experiments/1"]
    print(uri)  # and only while inside
    assert SECRET in capsys.readouterr().out


# ---- where r2ray uses it ------------------------------------------------------------------------------
@pytest.fixture
def unreachable_tracking(monkeypatch):
    """A tracking URI with a password that nothing answers; MLflow's URIs restored afterwards."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield f"http://u:{SECRET}@127.0.0.1:9/"
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def test_loading_from_an_unreachable_registry_never_shows_the_password(unreachable_tracking,
                                                                       capsys, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RegistryError) as raised:
        load_registered("models:/r2ray@champion", tracking_uri=unreachable_tracking)
    assert "http://u:***@127.0.0.1:9/" in str(raised.value)
    out, err = capsys.readouterr()
    assert SECRET not in str(raised.value) + out + err + caplog.text


def _manifest(tracking_uri: str) -> dict:
    return {"run_id": "nightly", "committed_at": "2025-01-01T00:00:00Z",
            "model": {"uri": "models:/r2ray@champion", "version": "3"},
            "input": {"uri": f"https://h/backlog.jsonl?X-Amz-Signature={SECRET}"},
            "config": {"reserve": 0.02, "tracking_uri": tracking_uri},
            "catalog_fingerprint": "0" * 64,
            "counts": {"rows_in": 1, "routed": 1, "quarantined": 0, "duplicates": 0, "deferred": 0,
                       "unreadable_files": 0},
            "spend": {"budget_usd": 1.0, "usable_usd": 0.98, "predicted_usd": 0.5},
            "solve": {"lambda": 1.0, "theta": 0.5, "gap": 0.0, "objective": 0.7},
            "timings": {"solve": 0.1}}


def test_the_batch_report_and_its_mlflow_failure_never_show_the_password(unreachable_tracking,
                                                                         capsys):
    manifest, stats = _manifest(unreachable_tracking), STATS_SCHEMA.empty_table()
    assert SECRET not in report_markdown(manifest, stats)
    with pytest.raises(RegistryError) as raised:
        log_to_mlflow(manifest, stats, unreachable_tracking)
    out, err = capsys.readouterr()
    assert SECRET not in str(raised.value) + out + err


@pytest.mark.slow
def test_a_batch_run_logged_to_a_live_server_stores_and_prints_no_password(tmp_path, capsys,
                                                                          mlflow_store):
    """Against a real ``mlflow server``: MLflow's printed run link, the params and the stored
    manifest.json all lack the password the tracking URI carried."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", mlflow_store(tmp_path),
         "--artifacts-destination", str(tmp_path / "artifacts")],
        # the tracking server alone: no job runner (its Huey consumers are for MLflow's own jobs)
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        wait_for_port(port, 90, server)
        uri = f"http://u:{SECRET}@127.0.0.1:{port}"
        run_id = log_to_mlflow(_manifest(uri), STATS_SCHEMA.empty_table(), uri)
        out, err = capsys.readouterr()
        assert f"http://u:***@127.0.0.1:{port}" in out  # MLflow's "View run" link, redacted
        assert SECRET not in out + err
        run = mlflow.MlflowClient().get_run(run_id)
        stored = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/manifest.json")
        assert SECRET not in stored + str(run.data.params)
        assert "http://u:***@127.0.0.1" in stored
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.parametrize("variable, endpoint", [
    ("R2RAY_S3_ENDPOINT", f"http://key:{SECRET}@127.0.0.1:8333"),
    ("AWS_ENDPOINT_URL", f"http://127.0.0.1:8333/?X-Amz-Security-Token={SECRET}"),
])
def test_an_s3_endpoint_with_credentials_is_refused_without_quoting_them(monkeypatch, variable,
                                                                         endpoint):
    monkeypatch.delenv("R2RAY_S3_ENDPOINT", raising=False)
    monkeypatch.setenv(variable, endpoint)
    with pytest.raises(R2RayError, match=r"carries credentials") as raised:
        storage.exists("s3://bucket/backlog")
    assert SECRET not in str(raised.value) and "***" in str(raised.value)


@pytest.mark.parametrize("uri", [f"s3://AKIAKEY:{SECRET}@bucket/bench.parquet",
                                 f"s3a://AKIAKEY:wJalr/{SECRET}@bucket/bench.parquet",
                                 f"s3://bucket/bench.parquet?X-Amz-Signature={SECRET}"])
def test_an_s3_uri_with_credentials_is_refused_without_quoting_them(capsys, uri):
    """s3fs reads ``KEY:SECRET@bucket`` as the bucket's name and botocore's validation error,
    a traceback out of the CLI, quoted it whole (a review, 2026-12-06)."""
    from r2ray.cli import main

    assert main(["bench", "stats", uri]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "carries credentials" in err and "***" in err


def test_an_s3_endpoint_without_credentials_is_used_as_given(monkeypatch):
    monkeypatch.setenv("R2RAY_S3_ENDPOINT", "http://127.0.0.1:8333")
    assert storage.s3_options()["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:8333"}


def test_a_catalogue_endpoint_is_redacted_and_an_upstream_echo_of_it_too():
    spec = ModelSpec(name="m", input_per_m=1, output_per_m=2, context=4096,
                     endpoint=f"https://u:{SECRET}@api.example.com/v1?api_key={SECRET}")
    assert redact_uri(spec.endpoint) == "https://u:***@api.example.com/v1?api_key=***"
    url = chat_url(spec)

    def echo(request: httpx.Request) -> httpx.Response:  # a proxy quoting the URL it was sent
        return httpx.Response(502, text=f"bad gateway for {url}")

    async def forward() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as client:
            await forward_chat(client, url, {"model": "m"}, None, 5.0)

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(forward())
    assert SECRET not in str(raised.value)
    assert "https://u:***@api.example.com" in str(raised.value)


def test_the_batch_executor_never_stores_the_api_key_an_upstream_echoes():
    """An upstream quoting back the key it was sent ("Incorrect API key provided: sk-…"): the
    serving path masked it, the executor's failure reason (a result row's ``error``, stored and
    summarised) kept it whole (a review, 2026-12-06)."""
    key = f"sk-live-{SECRET}"

    def echo_key(request: httpx.Request) -> httpx.Response:
        sent = request.headers["authorization"].removeprefix("Bearer ")
        return httpx.Response(401, json={"error": f"Incorrect API key provided: {sent}"})

    async def attempt() -> CallFailed:
        async with httpx.AsyncClient(transport=httpx.MockTransport(echo_key)) as client:
            with pytest.raises(CallFailed) as failed:
                await post_chat(client, "https://api.example.com/v1/chat/completions",
                                {"model": "m"}, key, 5.0)
        return failed.value

    assert asyncio.run(attempt()).reason == 'HTTP 401: {"error":"Incorrect API key provided: ***"}'
