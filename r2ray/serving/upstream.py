"""Forwarding a routed chat request to the chosen model's OpenAI-compatible endpoint.

The endpoint is the model's ``endpoint`` in the catalogue (a base URL such as
``https://api.example.com/v1``; ``/chat/completions`` is appended). Its key, if any, comes from
the environment variable named for that model (or ``"*"``) in ``upstream_key_envs``. Every
failure (unreachable, timeout, non-2xx, not JSON) becomes an :class:`UpstreamError`, which the
API answers with 502 and the reason — never with the key.
"""

from __future__ import annotations

import os

import httpx

from r2ray.catalog import ModelSpec
from r2ray.errors import R2RayError
from r2ray.execution.client import redirect_reason
from r2ray.redaction import quoted_error

ERROR_TEXT_LIMIT = 300   # characters of an upstream error body quoted back to the caller


class UpstreamError(R2RayError):
    """The chosen model's endpoint did not answer usefully; the message says why.

    ``may_have_billed``: the request was sent and its answer lost (a timeout or a connection
    dropped after connecting), or it answered 2xx with a body that cannot be used, so the
    upstream may have run and billed it. Not for a connection never made, nor an error status
    (providers do not bill a refused request)."""

    def __init__(self, message: str, may_have_billed: bool = False, status: int = 502,
                 retry_after: str | None = None):
        super().__init__(message)
        self.may_have_billed = may_have_billed
        self.status, self.retry_after = status, retry_after   # what the caller is answered


PASSED_THROUGH = (400, 413, 422, 429)
"""Upstream statuses the caller gets as they are: its own request (400, 413, 422), which a retry
cannot fix, or its rate (429, with the upstream's ``Retry-After``), which a retry should wait
out. As a 502 (what OpenAI's clients retry at once) each was sent again for nothing. Every other
failure is a 502: a 401/403 or 404 is this router's key or endpoint, a 5xx the upstream's own."""


def chat_url(spec: ModelSpec) -> str | None:
    """``<endpoint>/chat/completions`` of a catalogue model, or None when it has no endpoint."""
    return None if not spec.endpoint else spec.endpoint.rstrip("/") + "/chat/completions"


def upstream_client(max_connections: int) -> httpx.AsyncClient:
    """The client that forwards calls, pooling as many connections as the ingress admits
    requests (``max_connections``): httpx's default pool of 100 held the rest of 256 concurrent
    calls waiting for a connection, each a 502 (``PoolTimeout``) after ``upstream_timeout_s``."""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections))


def upstream_key(model: str, key_envs: dict[str, str]) -> str | None:
    """The API key for ``model``'s endpoint from its named environment variable, if one is named."""
    name = key_envs.get(model, key_envs.get("*"))
    return os.environ.get(name) if name else None


async def forward_chat(client: httpx.AsyncClient, url: str, body: dict, api_key: str | None,
                       timeout_s: float) -> dict:
    """POST ``body`` to ``url``; the parsed JSON of a 2xx answer that is a chat completion (has
    a ``choices`` list), else :class:`UpstreamError` (one a 2xx accepted may have been billed)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    upstream = f"upstream {body.get('model')} at {httpx.URL(url).host}"   # who answered
    try:
        response = await client.post(url, json=body, headers=headers, timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
        raise UpstreamError(f"{upstream} is unreachable: {type(err).__name__}") from None
    except httpx.TimeoutException:
        raise UpstreamError(f"{upstream} timed out after {timeout_s:g} s",
                            may_have_billed=True) from None
    except httpx.HTTPError as err:
        raise UpstreamError(f"{upstream} failed: {type(err).__name__}",
                            may_have_billed=True) from None
    if response.status_code >= 400:
        status = response.status_code if response.status_code in PASSED_THROUGH else 502
        said = quoted_error(response.text, api_key, ERROR_TEXT_LIMIT)
        raise UpstreamError(f"{upstream} answered {response.status_code}: {said}",
                            status=status, retry_after=response.headers.get("retry-after")
                            if status == 429 else None)
    if response.status_code >= 300:   # a redirect, not followed: the request never ran
        raise UpstreamError(f"{upstream} answered {redirect_reason(response)}")
    # a 2xx whose body is unusable was accepted, and so may be billed
    try:
        answer = response.json()
    except (ValueError, RecursionError):   # RecursionError: nested past json's depth limit
        raise UpstreamError(f"{upstream} answered {response.status_code} with a body that "
                            "is not JSON",
                            may_have_billed=True) from None
    if not isinstance(answer, dict):
        raise UpstreamError(f"{upstream} answered a JSON {type(answer).__name__}, not an "
                            "object", may_have_billed=True)
    if not isinstance(answer.get("choices"), list):   # e.g. {"error": ...} under a 200
        said = quoted_error(response.text, api_key, ERROR_TEXT_LIMIT)
        raise UpstreamError(f"{upstream} answered {response.status_code} with no chat "
                            f"completion (no choices): {said}", may_have_billed=True)
    return answer


def realised_cost_usd(spec: ModelSpec, answer: dict) -> float | None:
    """USD from the answer's ``usage`` (prompt and completion tokens), when it reports one."""
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    tokens_in = _count(usage.get("prompt_tokens"))
    tokens_out = _count(usage.get("completion_tokens"))
    if tokens_in is None or tokens_out is None:
        return None   # absent or implausible: the caller counts the predicted cost instead
    return (tokens_in * spec.input_per_m + tokens_out * spec.output_per_m) * 1e-6


MAX_USAGE_TOKENS = 1_000_000_000   # far past any context window


def _count(value) -> int | None:
    """A token count from ``usage``: a whole number in [0, MAX_USAGE_TOKENS], else None (a
    negative count would cancel other requests' spend in the book; 1e999 or 10**400 overflows)."""
    if isinstance(value, bool):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return count if 0 <= count <= MAX_USAGE_TOKENS else None
