"""The execution engine: pure decisions, then the failure paths against the fault-injecting stub."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import threading
import time
from dataclasses import asdict

import httpx
import pyarrow.compute as pc
import pytest

from r2ray.catalog import CatalogError, catalog_from_dict
from r2ray.execution import client, engine
from r2ray.errors import R2RayError
from r2ray.execution.client import (RUN_STOPPED, SPEND_CAP_REASON, CallFailed, RunStopped,
                                    SpendBookError, post_chat, read_usage)
from r2ray.execution.engine import EngineConfig, plan, read_parts, run_requests
from r2ray.execution.policy import (RetryPolicy, SpendBook, parse_retry_after, plan_todo,
                                    retry_decision)
from r2ray.execution.requests import RequestError, arm_request, request_key, requests_table
from r2ray.execution.stub import StubServer
from r2ray.prompting import LENGTH_INSTRUCTION


def stub_catalog(url: str, **extra) -> object:
    return catalog_from_dict({"budgets": [8, 32, "default"], "models": [
        {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
         "endpoint": url, "max_output_tokens": 64, **extra},
        {"name": "large", "input_per_m": 10.0, "output_per_m": 30.0, "context": 4096,
         "endpoint": url, "max_output_tokens": 64, **extra}]})


FAST = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.05, timeout_s=1.0)


# ---- pure ----------------------------------------------------------------------------------------
def test_retry_decisions():
    rng = random.Random(0)
    assert retry_decision(FAST, 1, "HTTP 429", 429, "0.7", rng) .delay_s == 0.7
    assert retry_decision(FAST, 1, "HTTP 503", 503, None, rng).retry
    assert retry_decision(FAST, 1, "timed out", None, None, rng).retry
    assert not retry_decision(FAST, 1, "HTTP 400", 400, None, rng).retry
    assert not retry_decision(FAST, 1, "HTTP 401", 401, None, rng).retry
    last = retry_decision(FAST, 3, "HTTP 500", 500, None, rng)
    assert not last.retry and "gave up after 3 attempts" in last.reason
    delays = [retry_decision(FAST, 2, "x", 500, None, rng).delay_s for _ in range(200)]
    assert 0 <= min(delays) and max(delays) <= 0.02   # full jitter within base·2^(n-1)
    assert retry_decision(RetryPolicy(max_retry_after_s=5), 1, "x", 429, "600", rng).delay_s == 5


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_spend_book_never_passes_the_cap():
    book = SpendBook(cap_usd=1.0)
    assert book.reserve(0.6) and not book.reserve(0.6)   # 0.6 in flight + 0.6 > 1
    book.settle(0.6, 0.1)
    assert book.reserve(0.6) and book.reserve(0.3) and not book.reserve(0.01 + 1e-9)
    assert book.state()["refused"] == 2


def test_an_idle_spend_book_holds_exactly_nothing_in_flight():
    """Reserving $0.05 and $0.15 and releasing both (the calls failed unbilled) left 2.8e-17 USD
    in flight with no call running (0.05 + 0.15 - 0.05 - 0.15 in floats), and a call of worst
    case exactly the $0.20 cap was then refused: the books at rest hold exactly 0."""
    book = SpendBook(cap_usd=0.2)
    assert book.reserve(0.05) and book.reserve(0.15)
    book.settle(0.05, 0.0)
    book.settle(0.15, 0.0)
    assert book.state()["in_flight_usd"] == 0.0
    assert book.reserve(0.2) and book.state()["refused"] == 0


def test_the_progress_line_shows_a_small_spend():
    """``.6f`` printed a spend of $4e-07 (a few calls of a cheap local model) as $0.000000 and one
    of $4.5e-06 as $0.000004; a large one keeps its cents."""
    assert "spend $4e-07," in engine._Progress(10, 4e-7, 60.0, print).line()
    assert "spend $4.5e-06," in engine._Progress(10, 4.5e-6, 60.0, print).line()
    assert "spend $12345.67," in engine._Progress(10, 12345.67, 60.0, print).line()


def test_a_nan_cap_refuses_every_call():
    """Every comparison with NaN is false: the cap tested "over?" with ``>``, so a NaN cap (or
    --max-spend-usd nan, which the CLI took) issued every call with no cap at all."""
    book = SpendBook(cap_usd=float("nan"))
    assert not book.reserve(1e-6) and book.state()["in_flight_usd"] == 0


def test_requests_use_the_routing_template_and_cap():
    catalog = stub_catalog("http://127.0.0.1:1/v1")
    row = arm_request(catalog, "q1", "What is 2+2?", "small", 32)
    assert row["messages"][-1]["content"].endswith(LENGTH_INSTRUCTION.format(budget_tokens=32))
    assert row["max_tokens"] == 40                  # 32 + max(8, 10 %)
    assert arm_request(catalog, "q1", "x", "small", 0)["max_tokens"] == 64
    assert row["worst_usd"] == pytest.approx(row["input_tokens_bound"] * 1e-6 + 40 * 2e-6)
    assert row["key"] == request_key("answer", "q1", "small", 32)
    assert plan_todo(["a", "b", "c"], {"b"}) == ["a", "c"]


def test_usage_estimate_is_flagged_and_clamped():
    request = {"input_tokens_est": 9, "input_tokens_bound": 40, "max_tokens": 3}
    assert read_usage({"prompt_tokens": 5, "completion_tokens": 2}, request, "a b") == (5, 2, False)
    assert read_usage(None, request, "one two three four five") == (9, 3, True)


def test_catalogue_execution_fields_are_validated():
    with pytest.raises(CatalogError, match="api_key_env"):
        stub_catalog("http://x/v1", api_key_env="not a name")
    with pytest.raises(CatalogError, match="requests_per_minute"):
        stub_catalog("http://x/v1", requests_per_minute=0)
    catalog = stub_catalog("http://x/v1", api_key_env="MY_KEY", max_concurrency=2)
    assert "MY_KEY" in catalog.to_yaml()


# ---- against the stub ------------------------------------------------------------------------------
def _requests(catalog, prompts: dict[str, str], model="small", budget=32):
    return requests_table([arm_request(catalog, qid, text, model, budget)
                           for qid, text in prompts.items()])


def test_failure_paths_retry_or_record_a_reason(tmp_path):
    prompts = {"ok": "[say:4]", "r429": "[fault:429] [say:4]", "r500": "[fault:500]",
               "timeout": "[fault:timeout]", "badjson": "[fault:badjson]",
               "nousage": "[fault:nousage] [say:a b c]", "bad400": "[fault:400]",
               "dead": "[fault:always500]", "long": "[say:" + " ".join(["w"] * 50) + "]"}
    with StubServer(retry_after="0.3", timeout_sleep_s=2.5) as stub:
        catalog = stub_catalog(stub.url)
        run = run_requests(_requests(catalog, prompts), str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=16),
                           progress=lambda line: None)
    got = {r["query_id"]: r for r in run.results.to_pylist()}
    failed = {r["query_id"]: r for r in run.failures.to_pylist()}
    assert set(got) == {"ok", "r429", "r500", "timeout", "badjson", "nousage", "long"}
    assert set(failed) == {"bad400", "dead"}
    assert failed["bad400"]["attempts"] == 1 and "HTTP 400" in failed["bad400"]["error"]
    assert failed["dead"]["attempts"] == 3 and "gave up" in failed["dead"]["error"]
    assert all(r["cost_usd"] == 0 and r["response"] is None for r in failed.values())
    r429 = got["r429"]
    assert r429["attempts"] == 2 and r429["ended_s"] - r429["started_s"] >= 0.3  # Retry-After
    assert got["timeout"]["attempts"] == 2 and got["badjson"]["attempts"] == 2
    assert got["nousage"]["usage_estimated"] and got["nousage"]["output_tokens"] == 3
    assert not got["ok"]["usage_estimated"] and got["ok"]["response"] == "4"
    assert got["long"]["truncated"] and got["long"]["output_tokens"] == 40   # the cap
    for r in got.values():
        assert r["cost_usd"] == pytest.approx(r["input_tokens"] * 1e-6 + r["output_tokens"] * 2e-6)
    assert run.throughput and run.summary()["failed"] == 2


def test_spend_cap_is_never_passed_and_a_rerun_finishes(tmp_path):
    prompts = {f"q{i}": f"[say:{'x ' * 30}]" for i in range(12)}
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, prompts, model="large")
        worst = requests.column("worst_usd").to_pylist()[0]
        cap = 4.5 * worst
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=3,
                                        max_spend_usd=cap), progress=lambda line: None)
        assert run.spend["realised_usd"] <= cap
        assert 4 <= run.results.num_rows < 12
        assert set(pc.unique(run.failures["error"]).to_pylist()) == {
            "spend cap: issuing it could pass --max-spend-usd"}
        calls = len(stub.calls)
        rerun = run_requests(requests, str(tmp_path), catalog,
                             EngineConfig(executor="local", retry=FAST, batch_rows=3),
                             progress=lambda line: None)
        assert rerun.results.num_rows == 12 and rerun.failures.num_rows == 0
        assert len(stub.calls) - calls == 12 - run.results.num_rows   # the done ones not resent
        assert rerun.duplicates_dropped == 0


@pytest.mark.slow
def test_ray_executor_runs_the_same_requests(tmp_path):
    prompts = {f"q{i}": f"[say:{i}]" + (" [fault:500]" if i % 3 == 0 else "") for i in range(10)}
    with StubServer() as stub:
        catalog = stub_catalog(stub.url, max_concurrency=2)
        requests = _requests(catalog, prompts)
        cap = 7.5 * requests.column("worst_usd").to_pylist()[0]
        start = time.perf_counter()
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="ray", workers=2, retry=FAST, batch_rows=2,
                                        max_spend_usd=cap), progress=lambda line: None)
        assert time.perf_counter() - start < 120
    assert run.spend["realised_usd"] <= cap
    assert run.results.num_rows + run.failures.num_rows == 10
    assert run.results.num_rows >= 5       # the cap, shared by both workers through the ledger
    assert all(r["response"] == r["query_id"][1:] for r in run.results.to_pylist())


def test_requests_repeating_a_key_are_refused_before_any_call(tmp_path):
    # before the fix: both rows were sent and paid, while the results kept one row for the key
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        repeated = requests_table([arm_request(catalog, "q1", "[say:4]", "small", 32),
                                   arm_request(catalog, "q2", "[say:4]", "small", 32),
                                   arm_request(catalog, "q1", "[say:5]", "small", 32)])
        key = repeated["key"][0].as_py()
        named = (f"request rows 1 and 3 repeat key {key} (answer of query 'q1' by 'small' at "
                 "budget 32)")
        with pytest.raises(RequestError, match=re.escape(named)):
            run_requests(repeated, str(tmp_path / "w"), catalog, EngineConfig(executor="local"),
                         progress=lambda line: None)
        with pytest.raises(RequestError, match=re.escape(named)):   # a dry run's plan too
            plan(repeated, str(tmp_path / "w"))
        assert stub.calls == [] and not (tmp_path / "w").exists()


def test_api_key_is_sent_from_its_variable_and_never_written(tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("STUB_API_KEY", secret)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url, api_key_env="STUB_API_KEY")
        run = run_requests(_requests(catalog, {"a": "[say:1]", "b": "[fault:400]"}),
                           str(tmp_path), catalog, EngineConfig(executor="local", retry=FAST),
                           progress=lambda line: None)
        assert {c["authorization"] for c in stub.calls} == {f"Bearer {secret}"}
        monkeypatch.delenv("STUB_API_KEY")
        missing = run_requests(_requests(catalog, {"c": "[say:1]"}), str(tmp_path / "2"),
                               catalog, EngineConfig(executor="local", retry=FAST),
                               progress=lambda line: None)
    assert run.results.num_rows == 1 and run.failures.num_rows == 1
    assert missing.failures.column("error").to_pylist() == [
        "environment variable STUB_API_KEY (the API key) is not set"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()
    assert secret not in repr(run.summary())


@pytest.mark.parametrize("secret", ["sk-test-0123\u00a0", "sk-test\n0123"])
def test_an_api_key_a_header_cannot_carry_is_a_reason_not_a_crash(tmp_path, monkeypatch, secret):
    """A pasted non-breaking space made httpx raise outside any HTTP error, taking down the batch
    with the answers of other models in it (paid for, then lost); a newline was retried as
    "unreachable". Either is the key's variable named as the reason, nothing sent."""
    monkeypatch.setenv("STUB_API_KEY", secret)
    with StubServer() as stub:
        plain = stub_catalog(stub.url)
        catalog = catalog_from_dict({"budgets": [8, 32, "default"], "models": [
            {**vars(plain.model("small")), "api_key_env": "STUB_API_KEY"},
            vars(plain.model("large"))]})
        requests = requests_table([arm_request(catalog, "q", "[say:1]", model, 32)
                                   for model in ("small", "large")])
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=2),
                           progress=lambda line: None)
        assert len(stub.calls) == 1   # only the unkeyed model's call
    assert run.results.column("model").to_pylist() == ["large"]
    failed = run.failures.to_pylist()[0]
    assert failed["attempts"] == 0 and failed["error"] == (
        "environment variable STUB_API_KEY (the API key) holds a character an HTTP header cannot "
        "carry (non-ASCII or a control character)")


def test_rate_limits_space_the_calls(tmp_path):
    prompts = {f"q{i}": "[say:1]" for i in range(6)}
    with StubServer() as stub:
        catalog = stub_catalog(stub.url, requests_per_minute=600)   # one call every 0.1 s
        start = time.perf_counter()
        run_requests(_requests(catalog, prompts), str(tmp_path), catalog,
                     EngineConfig(executor="local", retry=FAST, batch_rows=6),
                     progress=lambda line: None)
        assert time.perf_counter() - start >= 0.5
        tokens = stub_catalog(stub.url, tokens_per_minute=60 * 400)   # 400 tokens a second
        start = time.perf_counter()
        run_requests(_requests(tokens, prompts), str(tmp_path / "t"), tokens,
                     EngineConfig(executor="local", retry=FAST, batch_rows=6),
                     progress=lambda line: None)   # each call reserves its prompt + 40 tokens
        assert time.perf_counter() - start >= 5 * 40 / 400


def test_usage_counts_are_checked_and_clamped():
    """A server's usage that is no count (negative, NaN, infinite, fractional, boolean, text) is
    estimated, and one above the prompt bound or the max_tokens cap is clamped, both flagged:
    unchecked, -1000 prompt tokens priced a call at minus a dollar and 10^9 completion tokens at
    thousands (under a 1 USD cap), and an infinite count or 2**70 crashed the whole batch."""
    request = {"input_tokens_est": 9, "input_tokens_bound": 40, "max_tokens": 3}
    for prompt, completion in [(-1000, 2), (5.5, 2), (True, 2), ("7", 2), (float("nan"), 2),
                               (5, float("inf"))]:
        assert read_usage({"prompt_tokens": prompt, "completion_tokens": completion}, request,
                          "a b") == (9, 2, True)
    assert read_usage({"prompt_tokens": 5, "completion_tokens": 10 ** 9}, request, "a") == \
        (5, 3, True)
    assert read_usage({"prompt_tokens": 2 ** 70, "completion_tokens": 2}, request, "a") == \
        (40, 2, True)
    assert read_usage({"prompt_tokens": 5.0, "completion_tokens": 2}, request, "a") == (5, 2, False)


def test_a_billed_unreadable_answer_is_booked(tmp_path):
    """A 200 with a usage block but no usable choice was billed: its cost counts in the spend
    (and the cap) and in the row's billed_usd, not $0, and the retry is reserved again."""
    prompts = {"once": "[fault:billedbad] pad12 [say:4]",   # as long as the other prompt
               "always": "[fault:alwaysbilledbad] [say:4]"}
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        run = run_requests(_requests(catalog, prompts), str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=4),
                           progress=lambda line: None)
    once = run.results.to_pylist()[0]
    always = run.failures.to_pylist()[0]
    assert once["attempts"] == 2 and once["billed_usd"] == pytest.approx(2 * once["cost_usd"])
    assert always["attempts"] == 2 and always["cost_usd"] == 0   # retried once: each is paid
    assert always["billed_usd"] == pytest.approx(2 * once["cost_usd"])
    assert run.spend["realised_usd"] == pytest.approx(4 * once["cost_usd"])


@pytest.mark.parametrize("fault", ["billednocounts", "badjson"])
def test_a_billed_unreadable_answer_without_counts_is_booked_at_its_worst_case(tmp_path, fault):
    """A 200 with no usable answer was billed, but not what for — its usage block holds no counts
    (``billednocounts``) or its body is no JSON (``badjson``, booked at $0 before): no text to
    estimate from, so the attempt is booked at the worst case it reserved (an estimate from no
    text priced 0 output)."""
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {fault: f"[fault:{fault}] [say:4]"})
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=4),
                           progress=lambda line: None)
    row = run.results.to_pylist()[0]
    worst = requests.column("worst_usd").to_pylist()[0]
    assert row["attempts"] == 2 and row["billed_usd"] == pytest.approx(worst + row["cost_usd"])


def test_the_timeout_bounds_the_whole_call(tmp_path):
    """httpx's timeout is per read: a body dripped a byte every 0.05 s never tripped 0.5 s."""
    policy = RetryPolicy(max_attempts=1, timeout_s=0.5)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        start = time.perf_counter()
        run = run_requests(_requests(catalog, {"drip": "[drip:0.05] [say:4]"}), str(tmp_path),
                           catalog, EngineConfig(executor="local", retry=policy),
                           progress=lambda line: None)
        assert time.perf_counter() - start < 3
    assert run.failures.column("error").to_pylist()[0].startswith("timed out after 0.5 s")


def test_billed_failures_stay_in_the_spend_of_later_runs(tmp_path):
    """A rerun clears failures/ to retry them; what the provider billed for them moves to billed/
    first, so the next run's realised spend (and cap) still counts it (it dropped out)."""
    from r2ray.execution.engine import keep_billed_failures, read_parts

    prompts = {"always": "[fault:alwaysbilledbad] [say:4]"}
    runs = []
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        for _ in range(2):
            runs.append(run_requests(_requests(catalog, prompts), str(tmp_path), catalog,
                                     EngineConfig(executor="local", retry=FAST, batch_rows=4),
                                     progress=lambda line: None))
    first = runs[0].failures.to_pylist()[0]["billed_usd"]
    assert first > 0 and runs[0].spend["realised_before_usd"] == 0
    assert runs[1].spend["realised_before_usd"] == pytest.approx(first)
    assert runs[1].spend["realised_usd"] == pytest.approx(2 * first)
    keep_billed_failures(str(tmp_path))       # run again (a crash before failures/ was cleared)
    keep_billed_failures(str(tmp_path))
    billed = read_parts(str(tmp_path / "billed"))
    assert billed.num_rows == 2 and sum(billed["billed_usd"].to_pylist()) == pytest.approx(2 * first)


def test_a_crash_clearing_failures_does_not_count_a_billed_failure_twice(tmp_path):
    """A run moves last run's billed failures to billed/, then clears failures/ a part at a time;
    killed in between, the rerun moved the parts left again, under another name (that of the
    rows left), and counted them twice in its spend and cap (1.5 × what was billed here)."""
    from r2ray.execution.engine import keep_billed_failures

    prompts = {"a": "[fault:alwaysbilledbad] [say:4]", "b": "[fault:alwaysbilledbad] [say:5]"}
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, prompts)
        first = run_requests(requests, str(tmp_path), catalog,
                             EngineConfig(executor="local", retry=FAST, batch_rows=1),
                             progress=lambda line: None)
        keep_billed_failures(str(tmp_path))   # the next run's start, killed clearing failures/
        sorted((tmp_path / "failures").iterdir())[0].unlink()
        rerun = run_requests(requests, str(tmp_path), catalog,
                             EngineConfig(executor="local", retry=FAST, max_spend_usd=0.0),
                             progress=lambda line: None)
    billed = sum(first.failures["billed_usd"].to_pylist())
    assert billed > 0 and rerun.spend["refused_calls"] == 2
    assert rerun.spend["realised_before_usd"] == pytest.approx(billed)


def test_a_timeout_after_the_request_went_out_is_booked_at_its_worst_case(tmp_path):
    """The server had the whole request when the call timed out, so it may have answered and
    billed it (the stub did, a second later): the attempt is booked at the worst case it reserved,
    not $0, and stays in the next runs' spend and cap (it was $0, and the cap let the retry run)."""
    policy = RetryPolicy(max_attempts=1, timeout_s=0.5)
    with StubServer(timeout_sleep_s=1.0) as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {"late": "[fault:timeout] [say:4]"})
        worst = requests.column("worst_usd").to_pylist()[0]
        runs = [run_requests(requests, str(tmp_path), catalog,
                             EngineConfig(executor="local", retry=policy, max_spend_usd=cap),
                             progress=lambda line: None) for cap in (1.5 * worst, 1.5 * worst,
                                                                     None)]
    timed_out = runs[0].failures.to_pylist()[0]
    assert timed_out["error"].startswith("timed out") and timed_out["billed_usd"] == worst
    assert runs[0].spend["realised_usd"] == worst
    assert runs[1].spend["realised_before_usd"] == worst   # kept in billed/ for the rerun
    assert runs[1].failures.column("error").to_pylist() == [SPEND_CAP_REASON]
    answered = runs[2].results.to_pylist()[0]
    assert runs[2].spend["realised_usd"] == pytest.approx(worst + answered["cost_usd"])


def test_a_timeout_before_the_request_went_out_is_not_booked(tmp_path):
    """A call that timed out still connecting (a listener whose backlog is full: the kernel drops
    its SYN) was never received, so nothing is booked for it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        waiting = [socket.socket() for _ in range(3)]   # fill the backlog, never accepted
        for sock in waiting:
            sock.setblocking(False)
            sock.connect_ex(listener.getsockname())
        try:
            catalog = stub_catalog(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
            run = run_requests(_requests(catalog, {"unsent": "[say:4]"}), str(tmp_path), catalog,
                               EngineConfig(executor="local",
                                            retry=RetryPolicy(max_attempts=1, timeout_s=0.5)),
                               progress=lambda line: None)
        finally:
            for sock in waiting:
                sock.close()
    failed = run.failures.to_pylist()[0]
    assert failed["error"].startswith("timed out") and failed["billed_usd"] == 0
    assert run.spend["realised_usd"] == 0


def _read_request_then_close(listener: socket.socket, bodies: list[int]) -> None:
    """A provider that reads each whole request (headers, then Content-Length bytes of body) and
    drops the connection without answering: it may have run and billed it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:   # the test closed the listener
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            bodies.append(len(body))


def test_a_connection_dropped_after_the_request_went_out_is_booked_at_its_worst_case(tmp_path):
    """The server read the whole request and closed the connection (RemoteProtocolError, which a
    stale keep-alive connection also gives): it may have answered and billed it, so each attempt
    is booked at the worst case it reserved, not $0 (it was $0)."""
    bodies = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        threading.Thread(target=_read_request_then_close, args=(listener, bodies),
                         daemon=True).start()
        catalog = stub_catalog(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
        requests = _requests(catalog, {"dropped": "[say:4]"})
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST), progress=lambda line: None)
    worst = requests.column("worst_usd").to_pylist()[0]
    failed = run.failures.to_pylist()[0]
    assert len(bodies) == failed["attempts"] == 3 and bodies[0] > 0   # each request read whole
    assert failed["billed_usd"] == pytest.approx(3 * worst) and failed["cost_usd"] == 0
    assert failed["error"].startswith("connection lost: RemoteProtocolError")
    assert run.spend["realised_usd"] == pytest.approx(3 * worst)


def test_a_refused_connection_is_not_booked(tmp_path):
    """A connection refused (a port bound but not listening) never sent a byte: nothing is
    booked for any attempt."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        catalog = stub_catalog(f"http://127.0.0.1:{closed.getsockname()[1]}/v1")
        run = run_requests(_requests(catalog, {"refused": "[say:4]"}), str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST), progress=lambda line: None)
    failed = run.failures.to_pylist()[0]
    assert failed["attempts"] == 3 and failed["error"].startswith("unreachable: ConnectError")
    assert failed["billed_usd"] == 0 and run.spend["realised_usd"] == 0


def test_a_request_h11_refuses_to_write_is_not_booked():
    """httpx's LocalProtocolError (here a header with a trailing space) is raised before the
    request could leave: the server got nothing, so the attempt is not booked as billed."""
    async def attempt(url: str) -> CallFailed:
        async with httpx.AsyncClient() as client:
            with pytest.raises(CallFailed) as failed:
                await post_chat(client, f"{url}/chat/completions", {"model": "small"},
                                "sk-test ", timeout_s=2.0)
        return failed.value

    with StubServer() as stub:
        failed = asyncio.run(attempt(stub.url))
        assert stub.calls == []
    assert failed.reason == "unreachable: LocalProtocolError" and not failed.billed


# ---- one row's surprise is its own failure; replies that are no answer (a review, 2026-12-06) ---
def test_an_unexpected_exception_fails_its_row_alone(tmp_path, monkeypatch):
    """An exception no check foresaw in one request took its whole batch down (asyncio.gather),
    the answers already paid with it. Now it is that row's failure, naming the type, booked at its
    worst case if raised once the call was made (here reading the answer: it was billed), $0 if
    before (here the rate limiter); the batch's other answer is written and in the spend."""
    import r2ray.execution.client as client

    read_usage_as_written, admit_as_written = client.read_usage, client.EndpointLimiter.admit

    def read_usage_raising(usage, request, text):
        if text == "after":
            raise RuntimeError("a parse step no check foresaw")
        return read_usage_as_written(usage, request, text)

    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {"ok": "[say:ok]", "after": "[say:after]",
                                       "before": "[say:before] " + "pad " * 40})
        before_tokens = max(requests["input_tokens_est"].to_pylist()) + 40   # + max_tokens

        async def admit_raising(self, tokens):
            if tokens == before_tokens:
                raise KeyError("a limiter step no check foresaw")
            await admit_as_written(self, tokens)

        monkeypatch.setattr(client, "read_usage", read_usage_raising)
        monkeypatch.setattr(client.EndpointLimiter, "admit", admit_raising)
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=8),
                           progress=lambda line: None)
        assert len(stub.answered()) == 2   # "before" never went out
    worst = dict(zip(requests["query_id"].to_pylist(), requests["worst_usd"].to_pylist()))
    failed = {r["query_id"]: r for r in run.failures.to_pylist()}
    assert run.results["query_id"].to_pylist() == ["ok"]
    assert failed["after"]["error"] == ("unexpected RuntimeError once its call was made (booked "
                                        "at its worst case)")
    assert failed["after"]["billed_usd"] == worst["after"] and failed["after"]["attempts"] == 1
    assert failed["before"]["error"] == "unexpected KeyError before its call was made"
    assert failed["before"]["billed_usd"] == 0
    ok_cost = run.results["cost_usd"][0].as_py()
    assert run.spend["realised_usd"] == pytest.approx(ok_cost + worst["after"])


def test_an_answer_utf8_cannot_carry_is_a_billed_failure_not_a_crash(tmp_path):
    """A chat completion whose text ends in a lone surrogate escape (half an emoji) passed every
    check, and writing its batch raised UnicodeEncodeError: the batch's answers were lost, paid.
    Now that attempt is no chat completion: billed at its usage, retried, the batch written."""
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        run = run_requests(_requests(catalog, {"half": "[fault:surrogate] [say:4]",
                                               "whole": "[say:4 pad]"}),
                           str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=8),
                           progress=lambda line: None)
    got = {r["query_id"]: r for r in run.results.to_pylist()}
    assert set(got) == {"half", "whole"} and got["half"]["response"] == "4"
    assert got["half"]["attempts"] == 2
    assert got["half"]["billed_usd"] == pytest.approx(2 * got["half"]["cost_usd"])


@pytest.mark.parametrize("fault", ["alwayssurrogate", "alwaysnull", "alwaysbilledbad"])
def test_a_paid_answer_with_no_text_to_keep_is_paid_for_twice_at_most(tmp_path, fault):
    """A model that answers every time (temperature 0: the same answer) with a lone surrogate,
    with ``content: null`` (a content filter, reasoning that spent ``max_tokens``) or with no
    choices, each billed, was retried to the last attempt: 5 payments for one failure. Now it is
    retried once (a sampling server may answer whole), then given up, both booked in the spend."""
    policy = RetryPolicy(max_attempts=5, base_s=0.01, cap_s=0.05, timeout_s=1.0)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {"half": f"[fault:{fault}] [say:4]"})
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=policy, max_spend_usd=1.0),
                           progress=lambda line: None)
        assert len(stub.answered()) == 2
    [failed] = run.failures.to_pylist()
    prompt_tokens = sum(-(-len(m["content"].encode()) // 4) + 4   # as the stub counts them
                        for m in requests["messages"][0].as_py())
    once = prompt_tokens * 1e-6 + 1 * 2e-6   # "4" counted (the half emoji added after), $1/$2 per M
    assert failed["attempts"] == 2 and failed["error"].endswith(
        "(again on its retry: not retried more, each is paid)")
    assert failed["billed_usd"] == pytest.approx(2 * once)
    assert run.spend["realised_usd"] == failed["billed_usd"]


def broken_book(reserve_raises_on: int = 0, settle_raises_on: int = 0) -> type:
    """A SpendBook whose n-th reserve / settle raises (0: never), as a lost ledger would."""
    class BrokenBook(engine.SpendBook):
        reserves = settles = 0

        def reserve(self, worst_usd):
            BrokenBook.reserves += 1
            if BrokenBook.reserves == reserve_raises_on:
                raise OSError("the ledger went away")
            return super().reserve(worst_usd)

        def settle(self, worst_usd, cost_usd):
            BrokenBook.settles += 1
            if BrokenBook.settles == settle_raises_on:
                raise OSError("the ledger went away")
            super().settle(worst_usd, cost_usd)
    return BrokenBook


def test_a_spend_book_that_raises_stops_the_run_after_writing_its_batch(tmp_path, monkeypatch):
    """Booking a call's spend raising (a Ray ledger actor lost, a bug) escaped the row and took
    its batch down unwritten: answers paid for and lost, paid again on the rerun. Now the batch is
    written, the row that could not book says so, and the run stops; the rerun sends only what
    was not answered, the answers paid before in its spend."""
    BrokenBook = broken_book(reserve_raises_on=3, settle_raises_on=2)
    config = EngineConfig(executor="local", retry=FAST, batch_rows=8)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {f"q{i}": "[say:4]" for i in range(3)})
        monkeypatch.setattr(engine, "SpendBook", BrokenBook)
        with pytest.raises(SpendBookError, match=re.escape(
                "stopped: spend book failed: OSError")) as stopped:
            run_requests(requests, str(tmp_path), catalog, config, progress=lambda line: None)
        assert isinstance(stopped.value, R2RayError)   # the CLI's one line, not a traceback
        assert len(stub.answered()) == 2   # the third was never sent
        answered = read_parts(str(tmp_path / "parts")).to_pylist()
        [unsent] = read_parts(str(tmp_path / "failures")).to_pylist()
        assert len(answered) == 2 and all(r["ok"] and r["error"] is None for r in answered)
        assert unsent["error"] == "spend book failed: OSError before its call was made"
        monkeypatch.undo()
        rerun = run_requests(requests, str(tmp_path), catalog, config, progress=lambda line: None)
        assert len(stub.answered()) == 3 and rerun.calls_done_before == 2
    assert rerun.spend["realised_before_usd"] == sum(r["billed_usd"] for r in answered)
    assert rerun.results.num_rows == 3 and rerun.failures.num_rows == 0


def test_booking_a_billed_failure_that_raises_keeps_what_it_billed(tmp_path, monkeypatch):
    """The book raising as a billed, unreadable attempt is booked: the row records the attempt it
    came on and what that attempt billed, is written to failures/, and the run stops."""
    monkeypatch.setattr(engine, "SpendBook", broken_book(settle_raises_on=1))
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        with pytest.raises(SpendBookError, match="0 answer.s. and 1 failure.s. are written"):
            run_requests(_requests(catalog, {"bad": "[fault:billedbad] [say:4]"}), str(tmp_path),
                         catalog, EngineConfig(executor="local", retry=FAST),
                         progress=lambda line: None)
        assert len(stub.answered()) == 1   # not retried: the book can no longer keep the cap
    [failed] = read_parts(str(tmp_path / "failures")).to_pylist()
    assert failed["error"] == "spend book failed: OSError on attempt 1"
    assert failed["billed_usd"] > 0 and failed["attempts"] == 1


def test_a_redirect_is_reported_not_retried_nor_booked(tmp_path):
    """httpx follows no redirect, and a 301 (an http:// endpoint served at https://) was read as a
    200 that is no chat completion: retried to the last attempt, each booked at its worst case,
    the reason a JSONDecodeError. Now it says where it points, once, unbooked (never run). A 204
    the server took: booked at its worst case, not retried (the server's way, not a blip)."""
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {"moved": "[fault:redirect]", "empty": "[fault:204]"})
        run = run_requests(requests, str(tmp_path), catalog,
                           EngineConfig(executor="local", retry=FAST, batch_rows=8),
                           progress=lambda line: None)
        assert len(stub.calls) == 2
    https = stub.url.replace("http://", "https://")
    failed = {r["query_id"]: r for r in run.failures.to_pylist()}
    assert failed["moved"]["error"] == (
        f"HTTP 301 redirect to {https}/chat/completions, not followed: set the model's endpoint "
        f"in the catalogue to {https}")
    assert failed["moved"]["attempts"] == 1 and failed["moved"]["billed_usd"] == 0
    assert failed["empty"]["error"].startswith("HTTP 204: answer is not a chat completion")
    worst = requests.filter(pc.equal(requests["query_id"], "empty"))["worst_usd"][0].as_py()
    assert failed["empty"]["attempts"] == 1 and failed["empty"]["billed_usd"] == worst
    assert run.spend["realised_usd"] == worst


def _run_on_ray_until_the_book_fails(requests, tmp_path, catalog, match: str) -> None:
    """The Ray path, two workers, one row a batch, no retries: it must stop with a SpendBookError
    matching ``match``."""
    with pytest.raises(SpendBookError, match=match):
        run_requests(requests, str(tmp_path), catalog,
                     EngineConfig(executor="ray", workers=2, batch_rows=1,
                                  retry=RetryPolicy(max_attempts=1, timeout_s=30.0)),
                     progress=lambda line: None)



@pytest.mark.slow
def test_a_ray_run_stopped_by_its_spend_book_writes_the_batches_in_flight(tmp_path, monkeypatch):
    """On the Ray path, one batch's SpendBookError stopped the run while another worker's batch
    was still in flight: its answer was paid, then neither written nor counted (paid again on the
    rerun). Now the book is closed to new calls, the batches in flight are written, then the run
    stops."""
    class LedgerLostOnLarge(SpendBook):   # local, on SpendBook: Ray ships it by value
        """A ledger whose reserve raises for the large model's calls (as a lost actor would)."""

        def __init__(self, cap_usd, realised_usd):
            SpendBook.__init__(self, cap_usd=cap_usd, realised_usd=realised_usd)

        def reserve(self, worst_usd):
            if worst_usd > 1e-3:   # the large model's worst case at budget 32, not the small's
                raise OSError("the ledger went away")
            return SpendBook.reserve(self, worst_usd)

    monkeypatch.setattr(engine, "SpendLedger", LedgerLostOnLarge)
    # both actors up before the first batch is dealt, so the least busy gets each: one actor
    # taking both would run the lost batch first and the slow one never in flight
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = requests_table([arm_request(catalog, "lost", "[say:4]", "large", 32),
                                   arm_request(catalog, "slow", "[slow:3] [say:4]", "small", 32)])
        assert requests["worst_usd"][1].as_py() < 1e-3 < requests["worst_usd"][0].as_py()
        _run_on_ray_until_the_book_fails(requests, tmp_path, catalog,
                                         r"spend book failed: \w*\(?OSError")
        time.sleep(5)   # the stub logs a call once it has answered it
        [paid] = stub.answered()
    answered = read_parts(str(tmp_path / "parts")).to_pylist()
    assert paid["content"].startswith("[slow:3] [say:4]")
    assert [r["query_id"] for r in answered] == ["slow"] and answered[0]["billed_usd"] > 0


def test_a_closed_spend_book_reserves_nothing_and_still_settles():
    """The run stopping closes the book: no new call, the calls in flight still booked."""
    from r2ray.execution.policy import BookClosed

    book = SpendBook(cap_usd=1.0)
    assert book.reserve(0.25)
    book.close()
    with pytest.raises(BookClosed):
        book.reserve(0.25)
    book.settle(0.25, 0.125)
    assert book.state() == {"cap_usd": 1.0, "realised_usd": 0.125, "in_flight_usd": 0.0,
                            "refused": 0}


def test_rows_not_called_as_the_run_stops_say_so_and_are_sent_on_the_rerun(tmp_path):
    """A closed book (the run stopping: another batch's booking failed) refused each call left,
    and the row said "spend book failed", as a book that raised does: "not called, the run
    stopped" could not be told from "the ledger broke". Now it says it was not called; written to
    failures/ it does not stop the run again, and the rerun sends it (nothing was paid)."""
    book = SpendBook()
    book.close()
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {"left": "[say:4]", "also": "[say:4]"})
        settings = {m: asdict(s) for m, s in
                    engine.endpoint_settings(catalog, ["small"], 1).items()}
        worker = engine.RequestWorker(settings, asdict(FAST), book=book)
        try:
            batch = worker(requests)
        finally:
            worker.close()
        assert stub.calls == []
        assert batch["error"].to_pylist() == [RUN_STOPPED] * 2
        assert batch["billed_usd"].to_pylist() == [0.0, 0.0]
        engine.write_batch(batch, str(tmp_path))   # not a book that raised: no SpendBookError
        assert engine.failure_reasons(read_parts(str(tmp_path / "failures"))) == {RUN_STOPPED: 2}
        rerun = run_requests(requests, str(tmp_path), catalog,
                             EngineConfig(executor="local", retry=FAST),
                             progress=lambda line: None)
        assert len(stub.answered()) == 2
    assert rerun.calls_planned == 2 and rerun.calls_done_before == 0
    assert rerun.results.num_rows == 2 and rerun.failures.num_rows == 0


def test_a_retry_the_stopping_run_does_not_make_says_so():
    """A row whose retry the closed book refused said "spend book failed ... on attempt 1"."""
    row = {"attempts": 1, "billed_usd": 0.5}
    assert client._unexpected(row, RunStopped(), None) == 0.0
    assert row["error"] == "the run was stopping after attempt 1: not retried"
    assert row["billed_usd"] == 0.5 and not row["ok"]


def _wait_until_dead(actor, tries: int = 200) -> None:
    """Return once ``actor`` answers with Ray's actor error (bounded: 200 × 50 ms)."""
    import ray

    for _ in range(tries):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{actor} still alive after ray.kill")


@pytest.mark.slow
def test_a_ray_ledger_closed_is_told_from_one_lost():
    """Through the ledger actor, a closed book's refusal is RunStopped (Ray wraps BookClosed in
    its task error), and a lost actor a SpendBookError naming the book failed."""
    import ray

    from r2ray.batch.job import _init_ray

    _init_ray()
    ledger = ray.remote(num_cpus=0)(engine.SpendLedger).remote(None, 0.0)
    book = engine._ActorBook(ledger)
    assert asyncio.run(book.reserve(0.25))
    ray.get(ledger.close.remote())
    with pytest.raises(RunStopped):
        asyncio.run(book.reserve(0.25))
    ray.kill(ledger)
    _wait_until_dead(ledger)   # the kill is asynchronous: a call before it lands finds the book
    with pytest.raises(SpendBookError, match=r"^spend book failed: \w*Actor\w*Error") as lost:
        asyncio.run(book.reserve(0.25))
    assert not isinstance(lost.value, RunStopped)


@pytest.mark.slow
def test_a_ray_run_whose_ledger_actor_dies_writes_every_answer_it_paid(tmp_path, monkeypatch):
    """The ledger actor dying mid-run: reading the spend raised Ray's ActorDiedError out of the
    run (a traceback, not the CLI's one line), and the batches in flight were dropped unwritten,
    answers paid with them (2 calls paid, 1 row written, the other 6 not recorded). Now every
    answered row is written with its cost, the rest are failures not called, and the run stops
    with a SpendBookError."""
    class LedgerKilledOnThirdReserve(SpendBook):   # local, on SpendBook: Ray ships it by value
        def __init__(self, cap_usd, realised_usd):
            SpendBook.__init__(self, cap_usd=cap_usd, realised_usd=realised_usd)
            self.reserves = 0

        def reserve(self, worst_usd):
            self.reserves += 1
            if self.reserves == 3:
                import ray
                ray.kill(ray.get_runtime_context().current_actor)
            return SpendBook.reserve(self, worst_usd)

    monkeypatch.setattr(engine, "SpendLedger", LedgerKilledOnThirdReserve)
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    with StubServer() as stub:
        catalog = stub_catalog(stub.url)
        requests = _requests(catalog, {f"q{i}": "[say:4]" if i % 2 else "[slow:1] [say:4]"
                                       for i in range(8)})
        _run_on_ray_until_the_book_fails(requests, tmp_path, catalog,
                                         r"stopped: spend book failed: \w*Error")
        time.sleep(3)   # the stub logs a call once it has answered it
        paid = stub.answered()
    answered = read_parts(str(tmp_path / "parts")).to_pylist()
    failed = read_parts(str(tmp_path / "failures")).to_pylist()
    assert len(answered) == len(paid) >= 2
    assert all(r["ok"] and r["cost_usd"] > 0 and r["billed_usd"] == r["cost_usd"]
               for r in answered)
    assert sorted(r["key"] for r in answered + failed) == sorted(requests["key"].to_pylist())
    assert all(r["attempts"] == 0 and r["billed_usd"] == 0 and (
        r["error"] == RUN_STOPPED or r["error"].endswith("before its call was made"))
        for r in failed)
