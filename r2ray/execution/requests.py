"""Chat requests as the engine sends them: one row per call, keyed, priced at its cap.

A request row (``REQUEST_SCHEMA``) carries everything a worker needs, so workers never see the
catalogue beyond the endpoint settings: the model, its endpoint, the chat messages (rendered with
the one length-instruction template), the hard ``max_tokens`` cap, the prices and the worst-case
cost at the cap, which the spend cap reserves before the call is issued.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.prompting import estimate_tokens
from r2ray.routing import routed_request

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
REQUEST_SCHEMA = pa.schema([
    pa.field("key", pa.string()),               # stable id of the call: parts are keyed by it
    pa.field("prompt_sha", pa.string()),        # what is sent: a part answers it only if equal
    pa.field("purpose", pa.string()),           # "answer" or "judge"
    pa.field("query_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),             # output tokens, 0 = default
    pa.field("messages", MESSAGES_TYPE),
    pa.field("max_tokens", pa.int64()),
    pa.field("input_tokens_est", pa.int64()),   # estimate of the prompt (tokens)
    pa.field("input_tokens_bound", pa.int64()), # upper bound of the prompt (tokens): for the cap
    pa.field("price_in_usd", pa.float64()),     # USD per token
    pa.field("price_out_usd", pa.float64()),
    pa.field("worst_usd", pa.float64()),        # bound × price in + max_tokens × price out
])

TEMPLATE_TOKENS_PER_MESSAGE = 16
"""Chat-template tokens a server may add per message (role markers, turn separators): the bound
adds them to the prompt's UTF-8 byte count (no tokenizer yields more tokens than bytes)."""


class RequestError(R2RayError, ValueError):
    """A request that cannot be built (an unknown model or budget, a model with no endpoint)."""


def request_key(purpose: str, query_id: str, model: str, budget: int) -> str:
    """Stable hex id of one call: the same request gets the same key in every run."""
    text = json.dumps([purpose, query_id, model, int(budget)], ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def prompt_sha(messages: list[dict], max_tokens: int) -> str:
    """Hex hash of what a call sends besides its key (the messages and the ``max_tokens`` cap): a
    part answers a request only if it was sent the same, so an edited prompt is sent again."""
    text = json.dumps([[[m["role"], m["content"]] for m in messages], int(max_tokens)],
                      ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def input_tokens_bound(messages: list[dict]) -> int:
    """Upper bound on the prompt's tokens: UTF-8 bytes plus the template's per message."""
    return sum(len(m["content"].encode("utf-8")) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)


def input_tokens_estimate(messages: list[dict]) -> int:
    return sum(estimate_tokens(m["content"]) for m in messages)


def request_row(catalog: Catalog, purpose: str, query_id: str, model: str, budget: int,
                messages: list[dict], max_tokens: int) -> dict:
    """One request row (REQUEST_SCHEMA) of already rendered messages and cap."""
    spec = catalog.model(model)
    if not spec.endpoint:
        raise RequestError(f"model {model!r} has no endpoint in the catalogue: give it "
                           "`endpoint: http://host:port/v1` to execute requests against it")
    bound = input_tokens_bound(messages)
    price_in, price_out = spec.input_per_m * 1e-6, spec.output_per_m * 1e-6
    return {"key": request_key(purpose, query_id, model, budget),
            "prompt_sha": prompt_sha(messages, max_tokens), "purpose": purpose,
            "query_id": query_id, "model": model, "budget": int(budget), "messages": messages,
            "max_tokens": int(max_tokens), "input_tokens_est": input_tokens_estimate(messages),
            "input_tokens_bound": bound, "price_in_usd": price_in, "price_out_usd": price_out,
            "worst_usd": float(bound * price_in + int(max_tokens) * price_out)}


def arm_request(catalog: Catalog, query_id: str, query: str, model: str, budget: int) -> dict:
    """The request of one (query, arm): routing's template and ``max_tokens`` rule."""
    arm = catalog.arm_of(model, budget)
    routed = routed_request(query, arm, catalog, estimate_tokens(query))
    return request_row(catalog, "answer", query_id, model, budget, routed["messages"],
                       routed["max_tokens"])


def requests_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA) if rows else \
        REQUEST_SCHEMA.empty_table()


def worst_case_usd(requests: pa.Table) -> float:
    return float(np.sum(requests.column("worst_usd").to_numpy())) if requests.num_rows else 0.0
