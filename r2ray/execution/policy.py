"""The engine's decisions, pure and testable without a network: retry or not (and how long to
wait), may this call be issued under the spend cap, which requests are still to do."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
"""Statuses worth another try: rate limits, timeouts, and the server's own failures (5xx
above are the transient ones; any other 5xx is retried too, see :func:`retry_decision`)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: try ``n`` waits U(0, min(cap, base·2^n)) seconds,
    or the server's ``Retry-After`` when it gives one (never more than ``max_retry_after_s``)."""

    max_attempts: int = 5
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0
    timeout_s: float = 60.0      # per call, connect to last byte


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float
    reason: str


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_decision(policy: RetryPolicy, attempt: int, reason: str, status: int | None = None,
                   retry_after: str | None = None, rng: random.Random | None = None) -> Decision:
    """After failed attempt number ``attempt`` (1-based): another try, and after how long?

    ``status`` None means no HTTP answer (a timeout, a refused connection, a body that is not the
    JSON asked for): transient, retried. 4xx other than 408/409/425/429 are the request's fault
    and are not retried."""
    transient = status is None or status in RETRY_STATUSES or status >= 500
    if not transient:
        return Decision(False, 0.0, reason)
    if attempt >= policy.max_attempts:
        return Decision(False, 0.0, f"{reason} (gave up after {attempt} attempts)")
    waited = parse_retry_after(retry_after)
    if waited is not None:
        return Decision(True, min(waited, policy.max_retry_after_s), reason)
    rng = rng or random
    return Decision(True, rng.uniform(0.0, min(policy.cap_s, policy.base_s * 2 ** (attempt - 1))),
                    reason)


class BookClosed(Exception):
    """The run is stopping (booking a spend failed): no new call is issued."""


@dataclass
class SpendBook:
    """The spend cap: a call is issued only if realised + in-flight worst cases + its own worst
    case stay within ``cap_usd``; its reservation is swapped for its real cost when it returns.
    Thread-safe; a Ray actor (:class:`r2ray.execution.engine.SpendLedger`) wraps one for many
    workers. ``cap_usd`` None: no cap, the books are still kept. Once closed (:meth:`close`),
    reserving raises :class:`BookClosed` (calls in flight are still settled)."""

    cap_usd: float | None = None
    realised_usd: float = 0.0
    in_flight_usd: float = 0.0
    in_flight: int = 0      # calls reserved and not settled yet
    refused: int = 0
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, worst_usd: float) -> bool:
        """Reserve ``worst_usd`` (USD) if it fits under the cap. Asked as "not within" so a NaN (a
        cap of NaN) refuses the call rather than issuing every one: a comparison with NaN is
        false."""
        with self._lock:
            if self.closed:
                raise BookClosed("the run is stopping: no new call")
            if self.cap_usd is not None and \
                    not self.realised_usd + self.in_flight_usd + worst_usd <= self.cap_usd:
                self.refused += 1
                return False
            self.in_flight, self.in_flight_usd = self.in_flight + 1, self.in_flight_usd + worst_usd
            return True

    def close(self) -> None:
        """No call is reserved any more: the run stops, its calls in flight are waited for."""
        with self._lock:
            self.closed = True

    def settle(self, worst_usd: float, cost_usd: float) -> None:
        """A reserved call came back: ``cost_usd`` (0 for a call that was never billed)."""
        with self._lock:
            self.in_flight -= 1
            # back to exactly 0 when idle: reserving $0.05 and $0.15 then releasing both left
            # 2.8e-17 USD, and a later call of worst case exactly the $0.20 cap was refused
            self.in_flight_usd = max(0.0, self.in_flight_usd - worst_usd) if self.in_flight else 0.0
            self.realised_usd += cost_usd

    def state(self) -> dict:
        with self._lock:
            return {"cap_usd": self.cap_usd, "realised_usd": self.realised_usd,
                    "in_flight_usd": self.in_flight_usd, "refused": self.refused}


def plan_todo(all_keys: list[str], done_keys: set[str]) -> list[str]:
    """Keys still to run, in their given order: everything not done (failures are retried)."""
    return [k for k in all_keys if k not in done_keys]


def cost_usd(input_tokens: int, output_tokens: int, price_in_usd: float,
             price_out_usd: float) -> float:
    """USD of one call, in float64: tokens × USD per token."""
    return float(input_tokens) * price_in_usd + float(output_tokens) * price_out_usd
