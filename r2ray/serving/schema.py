"""Request and response bodies of the online API: ``/v1/route`` and OpenAI-compatible chat.

Validation happens here, once, at the boundary: a bad body is a 422 whose message names the field.
Our own bodies reject unknown fields (a typo like ``max_cost`` must not be silently ignored) and
values of the wrong JSON type (strict: ``"max_cost_usd": true`` is not a 1 USD ceiling, nor
``"100"`` a number); the OpenAI chat body keeps unknown fields and passes them to the upstream
model unchanged, since OpenAI adds parameters faster than any router can list them.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

ROUTER_MODEL = "r2ray"   # `model` value in a chat request that asks r2ray to choose
MAX_INPUT_TOKENS = 1_000_000_000   # far past any context window; keeps token arithmetic in int64
FLOAT32_MAX = 3.4028234663852886e38   # an embedding is float32: a larger value would be inf

FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class RoutingOptions(BaseModel):
    """Per-request knobs; every one optional."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    lam: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                              serialization_alias="lambda",
                              validation_alias=AliasChoices("lambda", "lam"))
    max_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_budget_tokens: Annotated[int, Field(gt=0)] | None = None
    allowed_models: Annotated[list[Annotated[str, Field(min_length=1)]],
                              Field(min_length=1)] | None = None
    tenant: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    query_id: Annotated[str, Field(min_length=1, max_length=500)] | None = None  # tie-hash key
    embedding: Annotated[list[FiniteFloat], Field(min_length=1)] | None = None   # skips encoder


class RouteRequest(RoutingOptions):
    """``POST /v1/route``: one query to route (not answered)."""

    query: Annotated[str, Field(min_length=1)]
    # default: estimated from the text
    input_tokens: Annotated[int, Field(gt=0, le=MAX_INPUT_TOKENS)] | None = None


class Message(BaseModel):
    role: str
    content: str


class Alternative(BaseModel):
    """A runner-up arm, ranked by its value q̂ − λ·ĉ at the price used."""

    model: str
    budget: int                # output tokens; 0 = default (no length instruction)
    q_hat: float
    t_hat_tokens: float
    c_hat_usd: float
    value: float


class RouteResponse(BaseModel):
    """The routing decision: what to call, with which messages and cap, and why."""

    model_config = ConfigDict(populate_by_name=True)

    object: Literal["r2ray.route"] = "r2ray.route"
    model: str
    budget: int                # output tokens; 0 = default
    messages: list[Message]
    max_tokens: int
    q_hat: float               # predicted quality of the chosen arm
    t_hat_tokens: float        # predicted output tokens
    c_hat_usd: float           # predicted cost, USD
    lam: float = Field(serialization_alias="lambda")  # price used, quality per USD
    reason: str
    version: str               # model version that scored the query, e.g. "r2ray/3"
    input_tokens: int
    tenant: str | None = None
    alternatives: list[Alternative] = []


class ChatMessage(BaseModel):
    """An OpenAI chat message; fields beyond role and content pass through."""

    model_config = ConfigDict(extra="allow")

    role: Annotated[str, Field(min_length=1)]
    content: str | list[dict] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value):
        """One error at ``content`` itself: pydantic's own names each member of the union
        (``content.str``, ``content.list[dict[any,any]].0``), paths no OpenAI client sent."""
        if value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(p, dict) for p in value)):
            return value
        raise ValueError("must be a string, a list of content parts (objects), or null")


class ChatCompletionRequest(BaseModel):
    """OpenAI ``POST /v1/chat/completions``; ``model: "r2ray"`` lets r2ray choose the model and
    budget, a catalogue model name restricts the choice to that model's budgets."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    stream: bool = False
    n: int | None = None       # completions per call: 1 only (``_one_completion``)
    r2ray: RoutingOptions | None = None

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _not_a_boolean(cls, value):
        if isinstance(value, bool):   # JSON true read as 1: "no arm has a budget of at most 1"
            raise ValueError("must be a whole number of tokens, not a boolean")
        return value

    @field_validator("n", mode="before")
    @classmethod
    def _one_completion(cls, value):
        """r2ray routes, prices (ĉ, ``max_cost_usd``) and reserves one completion a call, while
        an upstream bills ``n``: ``n: 8`` was billed 8 completions where one was priced and,
        with no ``usage`` in the answer, booked one call's ĉ."""
        if value is None or (value == 1 and not isinstance(value, bool)):
            return value
        raise ValueError("r2ray routes and prices one completion a call: send n: 1 or leave "
                         "it out, and make n calls for n answers")

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("streaming is not supported; send stream: false")
        return value

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and message_text(m) for m in value):
            raise ValueError("needs at least one user message with text content")
        return value

    @property
    def output_cap(self) -> tuple[str, int] | None:
        """(field, tokens) of the tighter output cap the caller sent, ``max_tokens`` or
        ``max_completion_tokens``; None: neither. An upstream may read either field, so the
        smaller is the caller's limit: routing under the larger, and sending it in both, raised
        a caller's ``max_tokens: 30`` to 4,000."""
        sent = [(tokens, name) for name, tokens in (("max_completion_tokens",
                                                     self.max_completion_tokens),
                                                    ("max_tokens", self.max_tokens)) if tokens]
        return None if not sent else min(sent)[::-1]

    @model_validator(mode="after")
    def _finite_numbers(self) -> ChatCompletionRequest:
        """A 422 naming where a NaN or ±Infinity lies in what passes through to the upstream:
        pydantic's JSON parser reads them, but the forwarded body is strict JSON, which cannot
        carry them (a 500 after routing). The declared fields check their own numbers."""
        passed = [((), self.model_extra)] + [
            (("messages", i), m.model_extra | {"content": m.content})
            for i, m in enumerate(self.messages)]
        for loc, value in passed:
            found = non_finite_at(value, loc)
            if found is not None:
                raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                    type=PydanticCustomError("finite_number", "Input should be a finite number"),
                    loc=found, input=None)])
        return self


def non_finite_at(value, loc: tuple = ()) -> tuple | None:
    """Where in a parsed JSON value the first NaN or ±Infinity lies (``loc`` extended by keys
    and indices), or None when every number is finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else loc
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite_at(item, (*loc, key))
        if found is not None:
            return found
    return None


def message_text(message: ChatMessage) -> str:
    """The text of a message: a string, or the ``text`` parts of a content list."""
    if isinstance(message.content, str):
        return message.content
    parts = message.content or []
    return "\n".join(p["text"] for p in parts
                     if p.get("type") == "text" and isinstance(p.get("text"), str))


def non_text_parts(message: ChatMessage) -> int:
    """How many content parts of a message are not text (images, audio, files)."""
    parts = message.content if isinstance(message.content, list) else []
    return sum(p.get("type") != "text" for p in parts)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "r2ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, so OpenAI clients show our messages."""

    error: ErrorDetail
