"""The HTTP API as a FastAPI app over a :class:`RoutingService`: decode → library → encode.

Status codes: 401/403 bad credentials (checked before the body is read), 413 body over
``max_request_bytes``, 422 a body or option that cannot be used (the message and ``param`` name
the field), 502 the chosen model's endpoint failed (with the reason). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from r2ray import __version__
from r2ray.serving.auth import AuthError, check_bearer
from r2ray.serving.router import RouteRejected
from r2ray.serving.schema import ChatCompletionRequest, ErrorBody, ErrorDetail, RouteRequest
from r2ray.serving.service import RoutingService
from r2ray.serving.upstream import UpstreamError

MAX_FIELD_ERRORS = 5   # validation problems listed in one 422 message
Body = TypeVar("Body", bound=BaseModel)


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=str(status)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    listed = "; ".join(f"{_field(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                       for e in problems[:MAX_FIELD_ERRORS])
    more = f" (and {len(problems) - MAX_FIELD_ERRORS} more)" if len(problems) > MAX_FIELD_ERRORS else ""
    return error_response(422, f"invalid request body: {listed}{more}", "invalid_request_error",
                          _field(problems[0]["loc"]) if problems else None)


async def _rejected(_: Request, err: RouteRejected) -> JSONResponse:
    return error_response(422, f"{err.param}: {err}", "invalid_request_error", err.param)


async def _unauthorised(_: Request, err: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error_response(err.status, str(err), "authentication_error", headers=headers)


async def _upstream(_: Request, err: UpstreamError) -> JSONResponse:
    """502, or the upstream's own status where it is the caller's to act on
    (:data:`~r2ray.serving.upstream.PASSED_THROUGH`), with its ``Retry-After``."""
    headers = {"Retry-After": err.retry_after} if err.retry_after else None
    return error_response(err.status, str(err), "upstream_error", headers=headers)


async def _http(_: Request, err: HTTPException) -> JSONResponse:
    return error_response(err.status_code, str(err.detail), "invalid_request_error")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (declared or actually streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, self._message(), "invalid_request_error")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())   # FastAPI re-raises HTTPException
            return message

        return await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"


class InFlight:
    """ASGI middleware: ``count`` is how many HTTP requests the app is serving right now (a
    request counts from its first byte to its last, whatever the path)."""

    def __init__(self, app):
        self.app, self.count = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":   # the lifespan scope lasts as long as the app
            return await self.app(scope, receive, send)
        self.count += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.count -= 1


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters aside): FastAPI's strict rule
    for parsing a body as JSON; anything else, or no content type, is not a JSON body."""
    mime = (content_type or "").partition(";")[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


async def parsed_body(request: Request, model: type[Body]) -> Body:
    """The JSON body validated in one pass by pydantic's own JSON parser. FastAPI's body
    parameter parses with ``json.loads`` and then validates the Python objects (the 384 floats
    of an embedding twice over), plus its dependency solving: ~0.1 ms more CPU a request. Its
    errors are FastAPI's, so the 422 handler names the field as before."""
    if not is_json(request.headers.get("content-type")):
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg":
                                       "send a JSON body with content-type: application/json"}])
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError([e | {"loc": ("body", *e["loc"])} for e in err.errors()]) \
            from None


def build_api(service: RoutingService, key_digests: frozenset[str],
              max_request_bytes: int) -> FastAPI:
    """The FastAPI app: ``POST /v1/route``, ``POST /v1/chat/completions``, ``GET /v1/models``,
    ``GET /healthz`` (the only path without auth)."""
    app = FastAPI(title="r2ray router", version=__version__)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    for kind, handler in ((RequestValidationError, _invalid_body), (RouteRejected, _rejected),
                          (AuthError, _unauthorised), (UpstreamError, _upstream),
                          (HTTPException, _http)):
        app.add_exception_handler(kind, handler)

    def authorise(request: Request) -> None:
        # in the handler, before the body is read: a FastAPI Header dependency cost ~35 µs a
        # request in parameter solving for a check that takes ~2
        check_bearer(request.headers.get("authorization"), key_digests)

    # The bodies are read by parsed_body, not declared as parameters, so /openapi.json does not
    # describe them; the README's endpoint table and r2ray.serving.schema do.
    @app.post("/v1/route")
    async def route(request: Request) -> Response:
        authorise(request)
        response, headers = await service.route(await parsed_body(request, RouteRequest))
        return Response(response.model_dump_json(by_alias=True), headers=headers,
                        media_type="application/json")   # pydantic's encoder, not json.dumps

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorise(request)
        body, headers = await service.chat(await parsed_body(request, ChatCompletionRequest))
        # the upstream's answer as it came: json.loads read its NaN / Infinity (vLLM writes
        # -Infinity logprobs), which JSONResponse (allow_nan=False) refuses to write: a 500 for
        # an answer already paid for
        return Response(json.dumps(body, ensure_ascii=False, allow_nan=True,
                                   separators=(",", ":")).encode(), headers=headers,
                        media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorise(request)
        return JSONResponse((await service.models()).model_dump())

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(await service.health())

    return app
