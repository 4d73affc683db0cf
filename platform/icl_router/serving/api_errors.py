"""The service's refusals (pure: no FastAPI): an :class:`ApiError` carries the HTTP status and the
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the
field (``messages.0.content``, ``routing.min_gain``, ``serving.path``)."""

from __future__ import annotations

import re

from pydantic import ValidationError


class ApiError(Exception):
    """A refusal with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, *, code: str, param: str | None = None, type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers or {}


def error_body(message: str, *, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPE_TAG = re.compile(r"[\[\(]|^(str|int|float|bool|list|dict|none|function-.*|tagged-union.*)$")


def validation_error(e: ValidationError, *, prefix: str = "") -> ApiError:
    """The most specific of pydantic's errors as a 400 naming its field (union branch tags left out)."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    loc = [str(p) for p in err["loc"] if p != "body" and not (isinstance(p, str) and _TYPE_TAG.search(p))]
    param = ".".join([prefix, *loc] if prefix else loc) or prefix or None
    if err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    else:
        msg = err["msg"]
    return ApiError(400, f"{param}: {msg}" if param else msg, code="invalid_value", param=param)
