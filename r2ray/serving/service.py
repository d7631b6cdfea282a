"""The ingress logic, free of Ray: request bodies → router items → responses, spend books.

:class:`RoutingService` turns a validated request into a :class:`RouteItem` priced with the latest
:class:`PriceState`, awaits the router (a Serve handle in production, a plain coroutine in tests
and benchmarks), renders the answer, forwards chat to the chosen model's endpoint, and counts the
spend that the Pacer will see at the next sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import fields, replace

import httpx

from r2ray.prompting import estimate_tokens, render_messages
from r2ray.serving.config import PacingConfig, ServeConfig
from r2ray.serving.pacer import PriceState
from r2ray.routing import query_key
from r2ray.serving.router import RouteDecision, RouteItem, RouteRejected
from r2ray.serving.schema import (ROUTER_MODEL, ChatCompletionRequest, ModelCard, ModelList,
                                  RouteRequest, RouteResponse, RoutingOptions, message_text,
                                  non_text_parts)
from r2ray.serving.upstream import (UpstreamError, chat_url, forward_chat, realised_cost_usd,
                                    upstream_key)

NON_TEXT_PART_TOKENS = 1_600
"""Input tokens counted for each content part that is not text (an image, audio, a file), whose
bill the text estimate cannot see: about the most one image costs at the common providers
(OpenAI high detail: 85 + 170 per 512-pixel tile, at most 8 tiles, 1,445; Anthropic about
1,600 at its largest size). Counted as 0 before, 20 images priced as their caption alone. An
allowance, not a bound: a long audio clip or a many-page file costs more."""

RouteFn = Callable[[RouteItem], Awaitable["RouteDecision | RouteRejected"]]


class NullMetrics:
    """Metric hooks; the Serve deployment plugs in Prometheus counters."""

    def decision(self, decision: RouteDecision, tenant: str | None) -> None:
        pass

    def spend(self, cost_usd: float, model: str, tenant: str | None) -> None:
        pass


class SpendBook:
    """Spend (USD) not yet reported to the Pacer, and the last price it answered with.

    A sync sent and not acknowledged (the reply lost, or the call cancelled) stays ``unsent``
    under its sequence number and is sent again, unchanged, until the Pacer answers; the Pacer
    applies each (ingress, seq) once, so a lost reply neither drops nor doubles that spend."""

    def __init__(self, state: PriceState):
        self.state = state
        self.pending_usd = 0.0
        self.pending_queries = 0   # queries booked since the last sync, free ones too
        self.seq = 0
        self.unsent: tuple[int, float, int] | None = None   # (seq, USD, queries) sent, not
                                                            # acknowledged
        self.in_flight_usd = 0.0   # ĉ (USD) of forwarded calls not answered yet
        self.in_flight = 0         # how many such calls

    def add(self, cost_usd: float) -> None:
        """Book one query's spend (USD); a free or uncountable one is still a query, which tells
        the Pacer its window was not idle (``Pacer.tick``)."""
        self.pending_queries += 1
        if countable(cost_usd):
            self.pending_usd += float(cost_usd)

    @contextlib.contextmanager
    def reserved(self, cost_usd: float) -> Iterator[None]:
        """Hold ``cost_usd`` (USD, the call's ĉ) against the spend limit while a forwarded call
        runs: it is booked only when the answer comes, and every request routed meanwhile would
        otherwise see the limit as not reached (10 concurrent calls spent 1.8× a limit that
        stopped the same 10 sent one after another at 1.08×)."""
        held = float(cost_usd) if countable(cost_usd) else 0.0
        self.in_flight, self.in_flight_usd = self.in_flight + 1, self.in_flight_usd + held
        try:
            yield
        finally:
            self.in_flight -= 1
            # back to exactly 0 when idle: float sums leave a residue that never cancels
            self.in_flight_usd = self.in_flight_usd - held if self.in_flight else 0.0

    def take(self) -> float:
        pending, self.pending_usd = self.pending_usd, 0.0
        return pending

    def next_sync(self) -> tuple[int, float, int]:
        """(seq, USD, queries) to send: the unacknowledged sync again, else the pending spend as
        a new one."""
        if self.unsent is None:
            self.seq += 1
            queries, self.pending_queries = self.pending_queries, 0
            self.unsent = (self.seq, self.take(), queries)
        return self.unsent

    def acknowledge(self, state: PriceState) -> None:
        self.state, self.unsent = state, None

    @property
    def unreported_usd(self) -> float:
        """USD the Pacer has not acknowledged: pending plus any sync in doubt."""
        return self.pending_usd + (0.0 if self.unsent is None else self.unsent[1])

    def price(self, pacing: PacingConfig) -> PriceState:
        """The price to route at now: the Pacer's last answer, hard-stopped already when its
        total (USD) plus this ingress's unreported and in-flight spend reaches
        ``spend_limit_usd``. The Pacer hears of that spend only at the next sync,
        ``price_sync_s`` later, and every request routed meanwhile would otherwise spend past
        the limit at the paced λ."""
        limit = pacing.spend_limit_usd
        if self.state.stopped or limit is None or self.state.total_spend_usd \
                + self.unreported_usd + self.in_flight_usd < limit:
            return self.state
        return replace(self.state, stopped=True)


def countable(cost_usd: float) -> bool:
    """Whether an amount (USD) may enter the books: a negative one would cancel other requests'
    spend (the Pacer clamps only the sum it is sent); NaN or inf would poison every later sync."""
    return math.isfinite(cost_usd) and cost_usd > 0


async def sync_spend(book: SpendBook, ingress: str,
                     sync: Callable[[str, int, float, int], Awaitable[PriceState]]) -> PriceState:
    """Report the book's spend to the Pacer (``sync(ingress, seq, usd, queries)``) and keep the
    price it answers. On any failure or cancellation the sync stays in the book to be sent
    again."""
    book.acknowledge(await sync(ingress, *book.next_sync()))
    return book.state


class RoutingService:
    """What the HTTP API calls. ``route`` is the router; ``book`` holds the price to use."""

    def __init__(self, config: ServeConfig, route: RouteFn, book: SpendBook,
                 describe: Callable[[], Awaitable[dict]], client: httpx.AsyncClient | None = None,
                 metrics: NullMetrics | None = None):
        self.config, self._route, self.book, self._describe = config, route, book, describe
        self.client = client
        self.metrics = metrics or NullMetrics()

    # ---- /v1/route ------------------------------------------------------------------------------
    async def route(self, request: RouteRequest) -> tuple[RouteResponse, dict[str, str]]:
        """(decision, x-r2ray headers); the predicted cost counts as spent."""
        tokens = request.input_tokens or estimate_tokens(request.query)
        decision = await self._decide(request, request.query, tokens)
        self._spend(decision.c_hat_usd, decision.model, request.tenant)
        return route_response(decision, request.tenant), routing_headers(decision)

    async def _decide(self, options: RoutingOptions, query: str, input_tokens: int,
                      **limits) -> RouteDecision:
        item = route_item(options, query, input_tokens, self.book.price(self.config.pacing),
                          self.config.alternatives, **limits)
        decision = await self._route(item)
        if isinstance(decision, RouteRejected):
            raise decision
        self.metrics.decision(decision, options.tenant)
        return decision

    def _spend(self, cost_usd: float, model: str, tenant: str | None) -> None:
        self.book.add(cost_usd)
        self.metrics.spend(cost_usd, model, tenant)

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest) -> tuple[dict, dict[str, str]]:
        """(body, x-r2ray headers): the upstream's answer, or the routing alone when the chosen
        model has no endpoint in the catalogue."""
        options = request.r2ray or RoutingOptions()
        query = next(message_text(m) for m in reversed(request.messages) if m.role == "user"
                     and message_text(m))
        cap = request.output_cap
        limits = {"max_output_tokens": None if cap is None else cap[1]}
        if request.model != ROUTER_MODEL:
            limits["allowed_models"] = named_model(request.model, options.allowed_models)
        try:
            decision = await self._decide(options, query, chat_input_tokens(request), **limits)
        except RouteRejected as rejected:
            if request.model != ROUTER_MODEL and rejected.param == "allowed_models":
                rejected.param = "model"
            elif rejected.param == "max_output_tokens":   # the caller's own cap
                name, tokens = cap
                raise RouteRejected(name, f"no arm has a length budget of at most {name}="
                                    f"{tokens} tokens; raise {name}") from None
            raise
        headers = routing_headers(decision)
        url = chat_url(decision.spec)
        if url is None:
            self._spend(decision.c_hat_usd, decision.model, options.tenant)
            return route_response(decision, options.tenant).model_dump(by_alias=True), headers
        body = upstream_body(request, decision)
        try:
            with self.book.reserved(decision.c_hat_usd):
                answer = await forward_chat(self.client, url, body,
                                            upstream_key(decision.model,
                                                         self.config.upstream_key_envs),
                                            self.config.upstream_timeout_s)
        except (UpstreamError, asyncio.CancelledError) as err:
            # sent, answer lost, or the caller gone while the upstream runs it (Serve cancels a
            # request whose client disconnects or times out): it may be billed, so count ĉ
            if isinstance(err, asyncio.CancelledError) or err.may_have_billed:
                self._spend(decision.c_hat_usd, decision.model, options.tenant)
            raise
        realised = realised_cost_usd(decision.spec, answer)
        self._spend(decision.c_hat_usd if realised is None else realised, decision.model,
                    options.tenant)
        return answer, headers

    # ---- /v1/models, /healthz ---------------------------------------------------------------------
    async def models(self) -> ModelList:
        described = await self._describe()
        return ModelList(data=[ModelCard(id=ROUTER_MODEL)]
                         + [ModelCard(id=name) for name in described["models"]])

    async def health(self) -> dict:
        described = await self._describe()
        state = self.book.state
        return {"status": "ok", "version": described["version"], "encoder": described["encoder"],
                "encoder_precision": described["encoder_precision"], "lambda": state.lam,
                "stopped": state.stopped, "price_source": state.source,
                "window_spend_usd": state.window_spend_usd,
                "total_spend_usd": state.total_spend_usd, "pacer_updates": state.updates,
                # λ* solved for another model version or catalogue: mispriced until paced/rerun
                "price_mismatch": state.mismatch(described["version"],
                                                 described["catalog_fingerprint"])}


def route_item(options: RoutingOptions, query: str, input_tokens: int, price: PriceState,
               n_alternatives: int, **limits) -> RouteItem:
    """The router's view of one request; ``limits`` override the request's own."""
    fields = {"allowed_models": options.allowed_models,
              "max_budget_tokens": options.max_budget_tokens} | limits
    lam, source = price.request_price(options.lam)
    return RouteItem(
        query=query, input_tokens=input_tokens, key=query_key(query, options.query_id),
        lam=lam, tie_cut=price.tie_cut, seed=price.seed, stopped=price.stopped,
        price_source=source,
        strict_budget=price.solved_for is not None and price.solved_for.strict_budget,
        embedding=options.embedding, max_cost_usd=options.max_cost_usd,
        n_alternatives=n_alternatives, **fields)


def chat_input_tokens(request: ChatCompletionRequest) -> int:
    """Estimated input tokens of a chat: its messages' text, plus ``NON_TEXT_PART_TOKENS`` for
    each image, audio or file part, so ĉ and ``max_cost_usd`` price what the upstream bills."""
    text = "\n".join(message_text(m) for m in request.messages)
    return estimate_tokens(text) + NON_TEXT_PART_TOKENS * sum(
        non_text_parts(m) for m in request.messages)


def named_model(model: str, allowed_models: list[str] | None) -> list[str]:
    """The arms a chat naming ``model`` may use: that model's, which must also be one of the
    request's ``r2ray.allowed_models`` when it lists them (it replaces them as the limit, so a
    model outside them would otherwise be called against the caller's own restriction)."""
    if allowed_models is not None and model not in allowed_models:
        raise RouteRejected("model", f"model {model!r} is not one of r2ray.allowed_models "
                            f"({', '.join(allowed_models)}); name one of them, or r2ray")
    return [model]


_RESPONSE_FIELDS = tuple(f.name for f in fields(RouteDecision) if f.name not in ("arm", "spec"))


def route_response(decision: RouteDecision, tenant: str | None) -> RouteResponse:
    # getattr, not dataclasses.asdict: asdict deep-copies every message and alternative, which
    # cost a quarter of a millisecond a request; RouteResponse validates (copies) them anyway
    return RouteResponse(tenant=tenant, **{name: getattr(decision, name)
                                           for name in _RESPONSE_FIELDS})


def upstream_body(request: ChatCompletionRequest, decision: RouteDecision) -> dict:
    """The caller's body with the chosen model, the length instruction on the last user turn,
    and the hard cap (in each of max_tokens / max_completion_tokens the caller sent)."""
    body = copy.deepcopy(request.model_dump(exclude={"r2ray"}, exclude_unset=True))
    body["model"] = decision.model
    last_user = max(i for i, m in enumerate(request.messages)
                    if m.role == "user" and message_text(m))
    text = message_text(request.messages[last_user])
    instructed = render_messages(text, decision.budget)[-1]["content"]
    message = body["messages"][last_user]
    parts = message.get("content")
    if isinstance(parts, list) and any(p.get("type") != "text" for p in parts):
        # images, audio, files: keep every part, add the instruction as one more text part
        if instructed != text:
            parts.append({"type": "text", "text": instructed[len(text):].lstrip("\n")})
    else:
        message["content"] = instructed
    # an upstream may read either length field: every one sent carries the routed cap, within
    # the tighter of the caller's, so none lets the answer run past either
    cap = request.output_cap
    capped = decision.max_tokens if cap is None else min(decision.max_tokens, cap[1])
    sent = [f for f in ("max_completion_tokens", "max_tokens") if getattr(request, f)]
    for name in sent or ["max_tokens"]:
        body[name] = capped
    return body


def routing_headers(decision: RouteDecision) -> dict[str, str]:
    """``x-r2ray-*`` response headers: what was chosen, at what price, by which version, why."""
    values = {
        "model": decision.model, "budget": decision.budget, "max-tokens": decision.max_tokens,
        "q-hat": f"{decision.q_hat:.6g}", "c-hat-usd": f"{decision.c_hat_usd:.6g}",
        "lambda": f"{decision.lam:.6g}", "version": decision.version, "reason": decision.reason,
        "alternatives": ",".join(f"{a['model']}:{a['budget']}" for a in decision.alternatives),
    }
    # header values must be latin-1; model names and URIs might not be
    return {f"x-r2ray-{k}": str(v).encode("ascii", "replace").decode() for k, v in values.items()}
