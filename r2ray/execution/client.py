"""One worker's async HTTP side: per-endpoint limits, retries, and reading an OpenAI-compatible
chat completion into a result row (RESULT_SCHEMA). Keys come from the environment variable the
catalogue names; they go into the Authorization header and nowhere else."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from dataclasses import dataclass

import httpx
import pyarrow as pa

from r2ray.errors import R2RayError
from r2ray.execution.policy import BookClosed, Decision, RetryPolicy, cost_usd, retry_decision
from r2ray.prompting import estimate_tokens, lone_surrogate_at
from r2ray.redaction import quoted_error, redact_uri

ERROR_TEXT_LIMIT = 200   # characters of an error body kept in a failure's reason
SPEND_CAP_REASON = "spend cap: issuing it could pass --max-spend-usd"
SPEND_BOOK_FAILED = "spend book failed"
"""Where a row's ``error`` holds this, booking its spend raised (a Ray ledger actor lost, a bug):
the row is returned as it stands, an answer it paid for included, and the engine writes its batch,
then stops the run, since the cap can no longer be kept (a rerun reads the spend back from the
parts)."""
RUN_STOPPED = "not called: the run was stopping (no new call once it stops); a rerun sends it"
"""A row's ``error`` where its call was never made because the book was closed (:class:`BookClosed`:
another batch's booking failed) or the run was stopped (a Ctrl-C or SIGTERM: its limiter closed):
told apart from :data:`SPEND_BOOK_FAILED`; nothing was paid."""

CUT_OFF = ("in flight when the run was stopped (Ctrl-C, SIGTERM) and unanswered within the wait "
           "for it: booked at its worst case, since the provider may bill it; a rerun sends it")
"""A row's ``error`` where its call was in flight when the run stopped and did not come back within
the wait (the calls' timeout): what it may be billed is kept in the spend and the cap, not lost."""

RESULT_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("purpose", pa.string()),
    pa.field("query_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),
    pa.field("ok", pa.bool_()),
    pa.field("response", pa.string()),
    pa.field("input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("usage_estimated", pa.bool_()),   # the server gave no usage: tokens estimated
    pa.field("finish_reason", pa.string()),
    pa.field("truncated", pa.bool_()),         # finish_reason == "length": stopped at max_tokens
    pa.field("max_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),       # the successful attempt, request to answer
    pa.field("cost_usd", pa.float64()),        # catalogue prices × tokens; 0 when not answered
    pa.field("billed_usd", pa.float64()),      # every attempt the provider billed: cost_usd plus
                                               # 2xx that were no chat completion, timeouts
                                               # after the request went out and connections
                                               # lost after connecting or raising unforeseen
                                               # errors once made (USD; at the worst case
                                               # where no usage says what for)
    pa.field("attempts", pa.int32()),
    pa.field("error", pa.string()),            # why it failed (null when ok)
    pa.field("endpoint", pa.string()),         # host:port, for throughput per endpoint
    pa.field("started_s", pa.float64()),       # unix time of the first attempt
    pa.field("ended_s", pa.float64()),
    pa.field("prompt_sha", pa.string()),       # the request's (requests.prompt_sha); null in
                                               # parts written before it was recorded
])


@dataclass(frozen=True)
class EndpointSettings:
    """What a worker needs of one model: where, with which key variable, at what limits (the
    limits already divided by the number of workers)."""

    url: str                         # .../v1/chat/completions
    api_key_env: str | None = None
    max_concurrency: int = 4
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


def chat_url(endpoint: str) -> str:
    return endpoint.rstrip("/") + "/chat/completions"


class Pacer:
    """Spaces admissions so ``rate_per_min`` units a minute are not exceeded (one call's worth of
    burst). Single event loop; no lock needed between awaits."""

    def __init__(self, rate_per_min: float | None):
        self.interval_s = None if rate_per_min is None else 60.0 / rate_per_min
        self._next_s = 0.0

    async def take(self, units: float = 1.0) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        start = max(now, self._next_s)
        self._next_s = start + units * self.interval_s
        if start > now:
            await asyncio.sleep(start - now)


class EndpointLimiter:
    """Concurrency, requests per minute and tokens per minute (prompt estimate + ``max_tokens``)
    of one endpoint within one worker. Once ``closed`` (the run is stopping: a Ctrl-C or SIGTERM),
    it admits no call: one waiting for a slot raises :class:`RunStopped` instead of being sent."""

    def __init__(self, settings: EndpointSettings):
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._requests = Pacer(settings.requests_per_minute)
        self._tokens = Pacer(settings.tokens_per_minute)
        self.closed = False   # set from a signal handler: a plain flag, no lock

    async def __aenter__(self):
        await self._slots.acquire()
        return self

    async def admit(self, tokens: int) -> None:
        await self._requests.take(1)
        await self._tokens.take(tokens)
        if self.closed:
            raise RunStopped()

    async def __aexit__(self, *exc):
        self._slots.release()


NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
              httpx.UnsupportedProtocol, httpx.LocalProtocolError)
"""httpx failures raised before the whole request could leave (no connection, no proxy tunnel, no
pooled slot, a scheme httpx cannot send, a request h11 refuses to write, such as a header ending
in a space): never billed. Every other transport failure (a connection the server dropped or reset,
a malformed reply) may come after the server had the whole request: a stale keep-alive connection
and a server that read the request then died give the same error, so it is booked as billed (at
its worst case), the safe side of a budget."""


class CallFailed(Exception):
    """One failed attempt. ``billed``: the provider may have billed it though it gave no usable
    answer — it answered 2xx with a body that is no chat completion, the call timed out after the
    whole request had gone out, or the connection failed other than before sending
    (:data:`NEVER_SENT`); ``usage``: that body's usage block, if it had one (what the attempt was
    billed for; without it, that is unknown)."""

    def __init__(self, reason: str, status: int | None = None, retry_after: str | None = None,
                 billed: bool = False, usage: dict | None = None, non_answer: bool = False):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after
        self.billed, self.usage = billed, usage
        self.non_answer = non_answer   # a whole, billed answer with no text a row can hold


class SpendBookError(R2RayError):
    """Booking a call's spend raised (or the run stopped for it, its batch written). An
    :class:`~r2ray.errors.R2RayError`: the message says what stopped and where the paid answers
    are, and the cause is the operator's to fix (a full disk, a lost store), so the CLI prints
    that one line, not a traceback."""

    @classmethod
    def raised(cls, err: BaseException) -> SpendBookError:
        """:data:`SPEND_BOOK_FAILED` and the type of what was raised (not its text, which could
        quote anything)."""
        return cls(f"{SPEND_BOOK_FAILED}: {type(err).__name__}")


class RunStopped(SpendBookError):
    """The book is closed (:class:`BookClosed`, on Ray raised inside the ledger actor): the run is
    stopping and the call is not made; the row says :data:`RUN_STOPPED`, not that a book failed."""

    def __init__(self):
        super().__init__(RUN_STOPPED)

    @staticmethod
    def closed(err: BaseException) -> bool:
        """Whether ``err`` is the book refusing as closed, here or as a Ray actor's task error."""
        return isinstance(err, BookClosed) or isinstance(getattr(err, "cause", None), BookClosed)


class _SendTrace:
    """httpcore's ``trace`` extension for one request: whether its body went out whole."""

    def __init__(self):
        self.body_sent = False

    async def __call__(self, event: str, info: dict) -> None:
        if event.endswith("send_request_body.complete"):   # http11. or http2.
            self.body_sent = True


async def post_chat(client: httpx.AsyncClient, url: str, body: dict, api_key: str | None,
                    timeout_s: float) -> dict:
    """One attempt: the parsed answer, or :class:`CallFailed` with the status and Retry-After.
    ``timeout_s`` bounds the whole call, connect to last byte: httpx's own timeout applies to
    each phase and each read, so a server dripping its body a byte at a time never trips it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    trace = _SendTrace()
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, json=body, headers=headers, timeout=timeout_s,
                                         extensions={"trace": trace})
    except (httpx.TimeoutException, TimeoutError):
        raise CallFailed(f"timed out after {timeout_s:g} s", billed=trace.body_sent) from None
    except NEVER_SENT as err:
        raise CallFailed(f"unreachable: {type(err).__name__}") from None
    except httpx.HTTPError as err:   # the server may have had it all: a dropped connection
        raise CallFailed(f"connection lost: {type(err).__name__}", billed=True) from None
    if response.status_code >= 400:
        text = quoted_error(response.text, api_key, ERROR_TEXT_LIMIT).replace("\n", " ")
        raise CallFailed(f"HTTP {response.status_code}: {text}", response.status_code,
                         response.headers.get("retry-after"))
    if response.status_code >= 300:   # not followed, not retried, not run: never billed
        raise CallFailed(redirect_reason(response), response.status_code)
    return _chat_completion(response)


def redirect_reason(response: httpx.Response) -> str:
    """Why a 3xx is the call's failure, and what to do: httpx follows no redirect (it would send
    the POST, key and all, wherever the server points), so every attempt would get the same 3xx;
    the catalogue's endpoint should be the address it points to (an http:// endpoint served at
    https://, a moved path)."""
    head = f"HTTP {response.status_code} redirect"
    location = response.headers.get("location")
    if not location:
        return f"{head} with no Location: the model's endpoint in the catalogue is not the API's"
    target = redact_uri(location)[:ERROR_TEXT_LIMIT]
    endpoint = (target.removesuffix("/chat/completions") if target.endswith("/chat/completions")
                else "where it points")
    return (f"{head} to {target}, not followed: set the model's endpoint in the catalogue to "
            f"{endpoint}")


def _chat_completion(response: httpx.Response) -> dict:
    """A 2xx's answer: its text, finish reason and usage, or :class:`CallFailed` (billed: the
    server took the call) when the body is no chat completion — not JSON, no text, or text UTF-8
    cannot carry (an unpaired surrogate escape, which no result row can hold). Retried after a 200
    (a body cut short may come whole), not after another 2xx (201, 204: the server's way). A body
    that came whole with a choice or a usage block but no text (``content`` null: a content
    filter, a reasoning model that spent ``max_tokens`` thinking; no choices) is ``non_answer``:
    billed, and the model at temperature 0 answers so again (see :func:`next_try`)."""
    answer = choice = None
    try:
        answer = response.json()
        choice = answer["choices"][0]
        text = choice["message"]["content"]
        if not _is_text(text):
            raise TypeError("content is not UTF-8 text" if isinstance(text, str) else
                            f"content is {'null' if text is None else type(text).__name__}")
    except (ValueError, KeyError, IndexError, TypeError) as err:
        usage = answer.get("usage") if isinstance(answer, dict) else None
        status = None if response.status_code == 200 else response.status_code
        raise CallFailed(("" if status is None else f"HTTP {status}: ")
                         + f"answer is not a chat completion ({type(err).__name__}: {err})", status,
                         billed=True, usage=usage if isinstance(usage, dict) else None,
                         non_answer=choice is not None or isinstance(usage, dict)) from None
    finish = choice.get("finish_reason")
    return {"text": text, "finish_reason": finish if _is_text(finish) else None,
            "usage": answer.get("usage")}


def _is_text(value: object) -> bool:
    """A string UTF-8 can encode (JSON's ``\\ud83d`` escape alone decodes to a lone surrogate,
    which it cannot)."""
    return isinstance(value, str) and lone_surrogate_at(value) is None


def _count(value: object) -> int | None:
    """A token count from a usage block: a non-negative whole number (an int, or a float with no
    fraction), else None — a negative, NaN, infinite, fractional, boolean or text count is not
    one, and pricing it would put a made-up figure in the money."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 0 else None


def _counted(usage: object, request: dict) -> tuple[int, int, bool] | None:
    """(input tokens, output tokens, clamped?) from the server's usage block, each clamped to the
    request's prompt bound (UTF-8 bytes + template: no tokenizer counts more) and ``max_tokens``
    cap (the server was told to stop there), so no count prices above the reserved worst case;
    None where the block holds no counts (see :func:`_count`)."""
    given = usage if isinstance(usage, dict) else {}
    tokens_in = _count(given.get("prompt_tokens"))
    tokens_out = _count(given.get("completion_tokens"))
    if tokens_in is None or tokens_out is None:
        return None
    bound, cap = int(request["input_tokens_bound"]), int(request["max_tokens"])
    return min(tokens_in, bound), min(tokens_out, cap), tokens_in > bound or tokens_out > cap


def read_usage(usage: object, request: dict, text: str) -> tuple[int, int, bool]:
    """(input tokens, output tokens, estimated?): the server's counts (:func:`_counted`), else
    estimates from the prompt and ``text``, clamped alike. A count that is not a count, or one
    clamped, is flagged estimated."""
    counted = _counted(usage, request)
    if counted is None:
        return (min(int(request["input_tokens_est"]), int(request["input_tokens_bound"])),
                min(estimate_tokens(text), int(request["max_tokens"])), True)
    return counted


async def execute_one(client: httpx.AsyncClient, request: dict, settings: EndpointSettings,
                      limiter: EndpointLimiter, policy: RetryPolicy, book,
                      rng: random.Random) -> dict:
    """Send one request row with retries under the spend cap; a RESULT_SCHEMA row. Every attempt
    is reserved at its worst case first; one the provider billed without a usable answer (or may
    have: :class:`CallFailed`) is booked at its cost, or its worst case where that is unknown,
    before the next is reserved, so the cap counts what was paid. Any other exception (a bug, a
    reply no check foresaw) is this row's failure, not its batch's: see :func:`_unexpected`."""
    row = {name: request[name] for name in ("key", "purpose", "query_id", "model", "budget",
                                             "max_tokens", "prompt_sha")}
    row.update(ok=False, response=None, input_tokens=None, output_tokens=None,
               usage_estimated=None, finish_reason=None, truncated=None, latency_s=None,
               cost_usd=0.0, billed_usd=0.0, attempts=0, error=None,
               endpoint=httpx.URL(settings.url).netloc.decode(), started_s=time.time(),
               ended_s=None)
    worst = float(request["worst_usd"])
    try:
        if not await book.reserve(worst):
            row.update(error=SPEND_CAP_REASON, ended_s=time.time())
            return row
    except SpendBookError as err:
        row.update(error=str(err) if isinstance(err, RunStopped) else
                   f"{err} before its call was made", ended_s=time.time())
        return row
    reserved = True
    body = {"model": request["model"], "messages": list(request["messages"]),
            "max_tokens": int(request["max_tokens"]), "temperature": 0}
    api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    cost = 0.0
    calling = False   # an attempt's request may have reached the server and is not booked yet
    non_answers = 0   # attempts answered whole and billed, with no text a row can hold
    try:
        key_problem = api_key_problem(api_key) if settings.api_key_env else None
        if key_problem:
            row["error"] = (f"environment variable {settings.api_key_env} (the API key) "
                            + key_problem)
            return row
        while True:
            row["attempts"] += 1
            async with limiter:
                await limiter.admit(int(request["input_tokens_est"]) + int(request["max_tokens"]))
                sent = time.perf_counter()
                calling = True
                try:
                    answer = await post_chat(client, settings.url, body, api_key, policy.timeout_s)
                except CallFailed as fail:
                    failure = fail
                else:
                    failure = None
                    latency = time.perf_counter() - sent
            if failure is None:
                break
            calling = False   # booked here as the failure says
            if failure.billed:   # (maybe) billed, unusable: booked now, not at $0
                spent = _priced(failure.usage, request)
                row["billed_usd"] += spent
                reserved = False
                await book.settle(worst, spent)
            non_answers += failure.non_answer
            decision = next_try(policy, row["attempts"], failure, non_answers, rng)
            if not decision.retry:
                row["error"] = decision.reason
                return row
            await asyncio.sleep(decision.delay_s)
            if not reserved:
                if not await book.reserve(worst):
                    row["error"] = f"{SPEND_CAP_REASON} (after {failure.reason})"
                    return row
                reserved = True
        tokens_in, tokens_out, estimated = read_usage(answer["usage"], request, answer["text"])
        cost = cost_usd(tokens_in, tokens_out, request["price_in_usd"], request["price_out_usd"])
        row.update(ok=True, response=answer["text"], input_tokens=tokens_in,
                   output_tokens=tokens_out, usage_estimated=estimated,
                   finish_reason=answer["finish_reason"],
                   truncated=answer["finish_reason"] == "length", latency_s=latency,
                   cost_usd=cost, billed_usd=row["billed_usd"] + cost)
        return row
    except Exception as err:   # an answer already paid in this batch must still be written
        cost = _unexpected(row, err, worst if calling else None)
        return row
    except asyncio.CancelledError:   # the run stopped and its wait ran out: recorded, not lost
        cost = worst if calling else 0.0
        row.update(ok=False, response=None, cost_usd=0.0, billed_usd=row["billed_usd"] + cost,
                   error=CUT_OFF if calling else RUN_STOPPED)
        return row
    finally:
        row["ended_s"] = time.time()
        if reserved:
            await _settle_last(book, row, worst, cost)


def next_try(policy: RetryPolicy, attempt: int, failure: CallFailed, non_answers: int,
             rng: random.Random) -> Decision:
    """:func:`retry_decision` for ``failure``, but a whole, billed answer with no text a row can
    hold (null content, no choices, a lone surrogate) is retried once at most (``non_answers``:
    such answers so far): a model at temperature 0 sends the same again, each time paid, up to
    the last attempt."""
    if failure.non_answer and non_answers > 1:
        return Decision(False, 0.0, f"{failure.reason} (again on its retry: not retried more, "
                        "each is paid)")
    return retry_decision(policy, attempt, failure.reason, failure.status, failure.retry_after,
                          rng)


async def _settle_last(book, row: dict, worst_usd: float, cost: float) -> None:
    """Settle the row's last reservation; where the book raises, the row says so (its outcome,
    a paid answer included, kept) rather than the exception taking its batch down unwritten."""
    try:
        await book.settle(worst_usd, cost)
    except SpendBookError as err:
        row["error"] = f"{row['error']}; {err}" if row["error"] else f"{err} booking its cost"


def _unexpected(row: dict, err: Exception, called_worst_usd: float | None) -> float:
    """Record an exception no check foresaw as ``row``'s failure; returns the USD to book for it.
    ``called_worst_usd``: the attempt's worst case if it was raised once its call was made (the
    server may have run and billed it; from where it was raised there is no telling), booked at
    that; None if before, booked at $0. The reason names the type only: a message could quote the
    key. A :class:`SpendBookError` (booking a billed attempt, reserving a retry) is named as such,
    with the attempt it came on."""
    booked = called_worst_usd or 0.0
    what = f"unexpected {type(err).__name__}"
    when = "before its call was made" if called_worst_usd is None else \
        "once its call was made (booked at its worst case)"
    if isinstance(err, RunStopped):   # its retry not reserved: a rerun sends it again
        what, when = "the run was stopping", f"after attempt {row['attempts']}: not retried"
    elif isinstance(err, SpendBookError):
        what, when = str(err), f"on attempt {row['attempts']}"
    row.update(ok=False, response=None, cost_usd=0.0, billed_usd=row["billed_usd"] + booked,
               error=f"{what} {when}")
    return booked


def api_key_problem(api_key: str | None) -> str | None:
    """Why ``api_key`` cannot go in an Authorization header, else None: unset, or holding a
    character a header cannot carry (a pasted non-breaking space, which httpx raises on outside
    any HTTP error and which took the whole batch down, its paid answers with it; a newline). The
    key itself is never quoted."""
    if not api_key:
        return "is not set"
    if not (api_key.isascii() and api_key.isprintable()):
        return "holds a character an HTTP header cannot carry (non-ASCII or a control character)"
    return None


def _priced(usage: dict | None, request: dict) -> float:
    """USD of a (maybe) billed attempt with no usable answer, from its usage block (counts checked
    and clamped as an answer's); its worst case at the cap where there is no block (a timeout, a
    body that is no JSON) or it holds no counts, since what it wrote is unknown (no text to
    estimate from)."""
    counted = _counted(usage, request)
    if counted is None:
        return float(request["worst_usd"])
    return cost_usd(counted[0], counted[1], request["price_in_usd"], request["price_out_usd"])
