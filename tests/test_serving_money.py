"""Money and limits on the online path (a review, 2026-12-06): spend that reaches the Pacer once,
caps the upstream cannot exceed, a cost ceiling that is a ceiling, and spend an upstream may have
billed. Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import math

import httpcore
import httpx
import numpy as np
import pytest

from r2ray.bench.synthetic import synth_backlog
from r2ray.catalog import DEFAULT_BUDGET
from r2ray.predictor import load_predictor
from r2ray.routing import worst_case_usd
from r2ray.serving.api import build_api
from r2ray.serving.config import PacingConfig, serve_config
from r2ray.serving.deployments import INGRESS_MAX_ONGOING
from r2ray.serving.pacer import Pacer, PriceState
from r2ray.serving.router import RouteItem, RouteRejected, RoutingModel, route_items
from r2ray.serving.service import NON_TEXT_PART_TOKENS, RoutingService, SpendBook, sync_spend
from r2ray.serving.upstream import upstream_client

from test_serving import _with_endpoints


@pytest.fixture(scope="module")
def routing_model(small_routing_model):
    return RoutingModel(load_predictor(small_routing_model["path"]), None,
                        small_routing_model["catalog"], "test/1")


@pytest.fixture(scope="module")
def embedding(routing_model):
    return list(synth_backlog(routing_model.catalog, 1, seed=3, embeddings=True)
                .to_pylist()[0]["embedding"])


def _state(lam: float = 0.0) -> PriceState:
    return PriceState(lam=lam, tie_cut=1.0, seed=0, stopped=False, source="test")


def _service(routing_model, client=None, **config) -> RoutingService:
    async def route(item):
        return route_items(routing_model, [item])[0]

    async def describe():
        return {"version": routing_model.version, "models": routing_model.catalog.model_names,
                "encoder": None, "encoder_precision": None}

    return RoutingService(serve_config(config), route, SpendBook(_state()), describe, client)


def _post(service, path: str, body: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=build_api(service, frozenset(), 1_000_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ray") as client:
            return await client.post(path, json=body)
    return asyncio.run(go())


def _forwarding(routing_model, handler) -> RoutingService:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return _service(_with_endpoints(routing_model), client)


def _chat(embedding, **fields) -> dict:
    return {"model": "r2ray", "messages": [{"role": "user", "content": "hi"}],
            "r2ray": {"embedding": embedding}} | fields


# ---- 1. the ingress's spend reaches the Pacer exactly once -----------------------------------------
class _LossyPacer:
    """A Pacer reached over a network: applies a sync, then (when told) loses the reply."""

    def __init__(self):
        self.pacer = Pacer(PacingConfig(), 0.0)
        self.lose_reply = False

    async def sync(self, ingress: str, seq: int, spend_usd: float, queries: int) -> PriceState:
        self.pacer.report(ingress, seq, spend_usd, now=0.0, queries=queries)
        if self.lose_reply:
            raise TimeoutError("reply lost")
        return self.pacer.state()


def test_a_sync_whose_reply_is_lost_is_not_counted_twice():
    remote, book = _LossyPacer(), SpendBook(_state())
    book.add(1.0)
    remote.lose_reply = True
    with pytest.raises(TimeoutError):
        asyncio.run(sync_spend(book, "ingress-1", remote.sync))
    remote.lose_reply = False
    book.add(0.5)
    for _ in range(2):
        asyncio.run(sync_spend(book, "ingress-1", remote.sync))
    # before the fix: 2.5 (the $1 the Pacer had applied was sent again)
    assert remote.pacer.total_spend_usd == pytest.approx(1.5)
    assert book.state.total_spend_usd == pytest.approx(1.5)


def test_a_sync_cancelled_in_flight_keeps_its_spend_for_the_last_flush():
    class Hanging:
        async def sync(self, ingress, seq, spend_usd, queries):
            await asyncio.sleep(3600)

    async def cancelled(book):
        task = asyncio.create_task(sync_spend(book, "ingress-1", Hanging().sync))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    remote, book = _LossyPacer(), SpendBook(_state())
    book.add(2.0)
    asyncio.run(cancelled(book))        # the replica shuts down mid-sync
    asyncio.run(sync_spend(book, "ingress-1", remote.sync))   # its last flush
    assert remote.pacer.total_spend_usd == pytest.approx(2.0)   # before the fix: 0


def test_pacer_applies_each_ingress_sequence_number_once():
    pacer = Pacer(PacingConfig(), 0.0)
    assert pacer.report("a", 1, 1.0, now=0.0) and pacer.report("b", 1, 1.0, now=0.0)
    assert not pacer.report("a", 1, 1.0, now=0.0)      # a resend of one already applied
    assert pacer.report("a", 2, 0.25, now=0.0)
    assert pacer.total_spend_usd == pytest.approx(2.25)



def test_a_free_query_reaches_the_pacer_as_traffic_not_idle():
    """The Pacer holds λ through a window with no query booked; a query on a free arm books 0 USD
    and must still count as one, or λ high enough to send every query to that arm never falls."""
    remote, book = _LossyPacer(), SpendBook(_state())
    remote.pacer = Pacer(PacingConfig(target_usd_per_s=0.01, window_s=10.0, eta=0.5), 5.0)
    book.add(0.0)
    asyncio.run(sync_spend(book, "ingress-1", remote.sync))
    assert remote.pacer.tick(10.0).lam == pytest.approx(5.0 * math.exp(-0.5))

def test_the_spend_limit_stops_routing_before_the_pacer_hears_of_the_spend(routing_model,
                                                                             embedding):
    """The Pacer learns an ingress's spend only at its next sync; the ingress knows it already,
    so a request once the limit is reached goes to the cheapest arm (before the fix: at the
    paced λ until the sync, 3× the limit spent in a burst of 10 requests between two syncs)."""
    service = _service(routing_model, pacing={"spend_limit_usd": 1.0})
    request = {"query": "hi", "embedding": embedding}
    assert _post(service, "/v1/route", request).json()["reason"].startswith("best value")
    service.book.add(1.0)                        # spent since the last sync: the limit reached
    assert _post(service, "/v1/route", request).json()["reason"].startswith("hard stop")
    assert not service.book.state.stopped        # the Pacer's last answer, unchanged

# ---- 3. max_tokens and max_completion_tokens both sent: both capped --------------------------------
def test_both_length_fields_are_capped_in_the_forwarded_body(routing_model, embedding):
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": []})

    r = _post(_forwarding(routing_model, handler), "/v1/chat/completions", _chat(
        embedding, max_tokens=100_000, max_completion_tokens=50))
    assert r.status_code == 200, r.text
    cap = int(r.headers["x-r2ray-max-tokens"])
    assert sent[0]["max_completion_tokens"] <= min(cap, 50)
    assert sent[0]["max_tokens"] <= min(cap, 50)          # before the fix: 100000 went through


# ---- 4. max_cost_usd is a ceiling on what the request can cost -------------------------------------
def test_max_cost_usd_bounds_the_worst_case_at_the_cap(routing_model, embedding):
    catalog = routing_model.catalog
    [free] = route_items(routing_model, [RouteItem("x", 200, 1, 0.0, embedding=embedding)])
    worst = worst_case_usd(catalog, np.array([200]))[0]
    assert worst[free.arm] > free.c_hat_usd                  # the cap allows more than ĉ
    ceiling = (free.c_hat_usd + worst[free.arm]) / 2         # above ĉ, below the worst case
    [capped] = route_items(routing_model, [RouteItem("x", 200, 1, 0.0, embedding=embedding,
                                                     max_cost_usd=ceiling)])
    assert not isinstance(capped, RouteRejected), capped
    # before the fix: the same arm, whose bill at its cap is above the ceiling
    assert worst[capped.arm] <= ceiling, (capped.model, capped.budget, worst[capped.arm], ceiling)


# ---- 5. an upstream that timed out may have billed: its spend is counted ---------------------------
def test_upstream_timeout_counts_the_predicted_spend(routing_model, embedding):
    def handler(request):
        raise httpx.ReadTimeout("no answer", request=request)

    service = _forwarding(routing_model, handler)
    r = _post(service, "/v1/chat/completions", _chat(embedding))
    assert r.status_code == 502
    assert 0 < service.book.pending_usd < 1   # ĉ; before the fix: 0


def test_upstream_never_reached_or_refusing_counts_nothing(routing_model, embedding):
    def unreachable(request):
        raise httpx.ConnectError("refused", request=request)

    def refusing(request):
        return httpx.Response(400, json={"error": {"message": "bad"}})

    for handler, status in ((unreachable, 502), (refusing, 400)):
        service = _forwarding(routing_model, handler)
        assert _post(service, "/v1/chat/completions", _chat(embedding)).status_code == status
        assert service.book.pending_usd == 0.0


def test_the_callers_own_errors_pass_through_and_the_rest_are_502(routing_model, embedding):
    """An upstream 400/413/422 (the caller's request) and 429 (its rate, with Retry-After) reach
    the caller as they are: as 502s, OpenAI's clients sent each again at once, for nothing.
    This router's key (401) or endpoint (404) and the upstream's own 5xx stay 502s."""
    for upstream, headers, status in ((400, {}, 400), (413, {}, 413), (422, {}, 422),
                                      (429, {"Retry-After": "7"}, 429), (401, {}, 502),
                                      (404, {}, 502), (500, {}, 502),
                                      (503, {"Retry-After": "7"}, 502)):
        def answer(request, upstream=upstream, headers=headers):
            return httpx.Response(upstream, headers=headers, json={"error": {"message": "no"}})

        r = _post(_forwarding(routing_model, answer), "/v1/chat/completions", _chat(embedding))
        assert r.status_code == status, (upstream, r.text)
        assert f"answered {upstream}" in r.json()["error"]["message"]
        assert r.headers.get("retry-after") == ("7" if status == 429 else None), upstream


# ---- 6. a client's default max_tokens does not remove the default arms -----------------------------
def test_a_large_client_max_tokens_keeps_the_default_arms(routing_model, embedding):
    catalog = routing_model.catalog
    r = _post(_service(routing_model), "/v1/chat/completions", _chat(embedding, max_tokens=4096))
    assert r.status_code == 200, r.text
    free = _post(_service(routing_model), "/v1/chat/completions", _chat(embedding))
    # λ = 0: the best predicted arm; the 4096 cap is above every default arm's cap (4,000)
    assert int(free.headers["x-r2ray-budget"]) == DEFAULT_BUDGET
    assert r.headers["x-r2ray-budget"] == free.headers["x-r2ray-budget"]   # before the fix: 400
    assert r.headers["x-r2ray-model"] == free.headers["x-r2ray-model"]
    assert catalog  # the caller's cap still binds the forwarded body (upstream_body's min)


# ---- 7. the spend of a forwarded call whose caller left, or whose 2xx body is unusable (2026-12-06) --
def test_a_caller_leaving_while_the_upstream_runs_counts_the_predicted_spend(routing_model,
                                                                              embedding):
    """Serve cancels the request when its client disconnects or times out; the upstream already
    has it and may bill it."""
    from r2ray.serving.schema import ChatCompletionRequest

    async def leave_mid_call():
        sent = asyncio.Event()

        async def slow(request):
            sent.set()
            await asyncio.sleep(3600)

        service = _forwarding(routing_model, slow)
        task = asyncio.create_task(service.chat(ChatCompletionRequest.model_validate(
            _chat(embedding))))
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return service.book.pending_usd

    assert 0 < asyncio.run(leave_mid_call()) < 1   # ĉ; before the fix: 0


def test_a_2xx_answer_that_cannot_be_used_counts_the_predicted_spend(routing_model, embedding):
    for content in (b'{"choices": [{"message": {"content": "4"}}]', b"[]"):   # cut short; a list
        def answer(request, content=content):
            return httpx.Response(200, content=content)

        service = _forwarding(routing_model, answer)
        assert _post(service, "/v1/chat/completions", _chat(embedding)).status_code == 502
        assert 0 < service.book.pending_usd < 1, content   # ĉ; before the fix: 0


# ---- 8. an upstream error that echoes the key sent does not pass it to the caller -------------------
def test_the_upstream_key_echoed_in_an_error_is_masked(routing_model, embedding, monkeypatch):
    key = "sk-live-7f3a9c2e1b"
    monkeypatch.setenv("R2RAY_TEST_UPSTREAM_KEY", key)
    # some gateways quote the key they refused; the second one straddles the 300-character cut
    for padding in ("invalid API key: ", "x" * 290):
        def echo(request, padding=padding):
            return httpx.Response(401, text=padding + request.headers["authorization"][7:])

        client = httpx.AsyncClient(transport=httpx.MockTransport(echo))
        service = _service(_with_endpoints(routing_model), client,
                           upstream_key_envs={"*": "R2RAY_TEST_UPSTREAM_KEY"})
        r = _post(service, "/v1/chat/completions", _chat(embedding))
        assert r.status_code == 502 and "answered 401" in r.text, r.text
        assert "sk-live" not in r.text, r.text   # before the fix: the key, or its first 10 chars


# ---- 9. what a forwarded call may cost (a review, 2026-12-06) -----------------------------------
@pytest.mark.parametrize("n", [2, 8, True, 0])
def test_n_completions_is_a_422_naming_n_and_nothing_is_sent(routing_model, embedding, n):
    sent = []
    service = _forwarding(routing_model, lambda request: sent.append(request) or httpx.Response(
        200, json={"choices": [{}] * 8}))
    r = _post(service, "/v1/chat/completions", _chat(embedding, n=n))
    # before the fix: 200, n=8 billed by the upstream, one call's ĉ priced, reserved and booked
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "n" and "one completion" in r.json()["error"]["message"]
    assert sent == [] and service.book.pending_usd == 0.0


def test_n_of_one_is_forwarded_as_sent(routing_model, embedding):
    sent = []
    service = _forwarding(routing_model, lambda request: sent.append(json.loads(request.content))
                          or httpx.Response(200, json={"choices": []}))
    assert _post(service, "/v1/chat/completions", _chat(embedding, n=1)).status_code == 200
    assert sent[0]["n"] == 1


def test_image_parts_are_priced_as_input_tokens(routing_model, embedding):
    images = 20
    items = []
    service = _forwarding(routing_model, lambda request: httpx.Response(200, json={"choices": []}))
    route = service._route

    async def recording(item):
        items.append(item)
        return await route(item)
    service._route = recording
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    r = _post(service, "/v1/chat/completions", _chat(embedding, messages=[{
        "role": "user", "content": [{"type": "text", "text": "What is in these?"}]
        + [image] * images}]))
    assert r.status_code == 200, r.text
    # before the fix: 4 input tokens, the caption's; the images priced at nothing
    assert items[0].input_tokens >= images * NON_TEXT_PART_TOKENS, items[0].input_tokens
    price_in = routing_model.catalog.model(r.headers["x-r2ray-model"]).input_per_m
    assert float(r.headers["x-r2ray-c-hat-usd"]) >= \
        images * NON_TEXT_PART_TOKENS * price_in * 1e-6 * (1 - 1e-5)   # header: 6 digits


class _HeldUpstream(httpcore.AsyncNetworkBackend):
    """An upstream reached over real pooled connections that answers none until ``n`` are open
    at once: calls the client's pool cannot hold wait for a connection that never frees."""

    def __init__(self, n: int):
        self.n, self.opened, self.all_open = n, 0, asyncio.Event()

    async def connect_tcp(self, host, port, timeout=None, local_address=None,
                          socket_options=None):
        self.opened += 1
        if self.opened == self.n:
            self.all_open.set()
        return _HeldStream(self.all_open)

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)


class _HeldStream(httpcore.AsyncNetworkStream):
    ANSWER = b'{"choices": []}'

    def __init__(self, all_open: asyncio.Event):
        self.all_open, self.pending = all_open, b""

    async def write(self, buffer, timeout=None):
        self.pending = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                        + str(len(self.ANSWER)).encode() + b"\r\n\r\n" + self.ANSWER)

    async def read(self, max_bytes, timeout=None):
        try:   # the timeout a socket read has
            await asyncio.wait_for(self.all_open.wait(), timeout)
        except TimeoutError:
            raise httpcore.ReadTimeout("no answer") from None
        chunk, self.pending = self.pending[:max_bytes], self.pending[max_bytes:]
        return chunk

    async def aclose(self):
        pass


def test_as_many_calls_as_the_ingress_admits_reach_the_upstream_at_once(routing_model,
                                                                         embedding):
    client = upstream_client(INGRESS_MAX_ONGOING)
    client._transport._pool._network_backend = _HeldUpstream(INGRESS_MAX_ONGOING)
    service = _service(_with_endpoints(routing_model), client, upstream_timeout_s=10.0)

    async def go():
        transport = httpx.ASGITransport(app=build_api(service, frozenset(), 1_000_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ray") as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=_chat(embedding))
                                          for _ in range(INGRESS_MAX_ONGOING)))
    failed = [r.json()["error"]["message"] for r in asyncio.run(go()) if r.status_code != 200]
    # httpx's default pool (100 connections): every call a 502, the 156 past the pool with
    # PoolTimeout after upstream_timeout_s, and the 100 sent with it waiting on them
    assert failed == [], (len(failed), sorted(set(failed)))
