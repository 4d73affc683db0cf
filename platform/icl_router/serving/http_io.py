"""The HTTP edge of the ingress: reading a request body, and answering every error in the OpenAI shape.

Everything a request carries is checked before anything is called: the media type, the body size,
JSON that parses (no NaN, bounded nesting), and a typed body (``protocol``). A refusal is an
``ApiError`` (``api_errors``), answered with its 4xx status and error body.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from icl_router.serving.api_errors import ApiError, error_body, validation_error
from icl_router.serving.protocol import MAX_JSON_DEPTH

log = logging.getLogger("ray.serve")


def reply(request: Request, e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error_code = e.code
    rid = getattr(request.state, "request_id", None)  # a /v1 generation request's id (v1.V1Handler._start), refused or not
    ids = {"x-icl-router-request-id": rid} if rid else {}
    return JSONResponse(error_body(e.message, code=e.code, param=e.param, type_=e.type), status_code=e.status,
                        headers={**ids, **(headers or {}), **e.headers})


def install_error_handlers(app: Any) -> None:
    """Every error the app can raise answered in the OpenAI shape (a bug: 500 internal_error, logged)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return reply(request, e)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return reply(request, ApiError(400, str(err.get("msg")), code="invalid_value", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return reply(request, ApiError(e.status_code, str(e.detail), code=code), headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return reply(request, ApiError(500, f"internal error: {type(e).__name__}", code="internal_error", type_="server_error"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {media or 'none'}", code="unsupported_media_type")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes (by its Content-Length or while it arrives)."""
    too_big = ApiError(413, f"the request body is over this service's limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


def parse_body(raw: bytes, cls: type[BaseModel]) -> Any:
    """A JSON object of ``cls``: invalid JSON, NaN/Infinity, nesting past MAX_JSON_DEPTH and wrong fields are 400s."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN, over-long integers
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if _too_deep(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


async def read_json(request: Request, cls: type[BaseModel], *, limit: int) -> Any:
    """The request's body as ``cls``: the media type, then the size, then the JSON and its fields."""
    require_json(request)
    return parse_body(await read_body(request, limit), cls)
