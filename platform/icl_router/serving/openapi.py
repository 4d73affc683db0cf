"""The service's OpenAPI document: FastAPI's schema of the routes, plus the request bodies the
handlers read themselves (``http_io.read_json``) and the error codes each route can answer."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from icl_router.config import PoolModelConfig
from icl_router.serving.protocol import ChatBody, CompletionBody, ErrorResponse, FeedbackBody, RegisterBody

BODY_MODELS = (ChatBody, CompletionBody, FeedbackBody, RegisterBody)

ERROR_DESCRIPTIONS = {
    400: "invalid request (the error's param names the field)",
    401: "missing or wrong key",
    404: "no such model, path or request",
    405: "method not allowed",
    409: "conflicts with the pool's state",
    410: "gone: the request is older than the feedback window",
    413: "request body too large",
    415: "Content-Type is not application/json",
    503: "not ready, or no model can answer now (see Retry-After)",
}


def body_spec(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose body the handler reads itself (checked by ``http_io.parse_body``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def responses(*codes: int, ok: type[BaseModel] | None = None, ok_code: int = 200, stream: bool = False, extra_ok: dict | None = None) -> dict:
    """The ``responses`` of a route: its success shape and the error codes it can answer."""
    out: dict[Any, Any] = {}
    if ok is not None:
        out[ok_code] = {"model": ok, "description": "success"}
        if stream:
            event = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}, "required": ["data"]}
            out[ok_code]["content"] = {"text/event-stream": {"schema": event}}  # each event: vLLM's chunks, then [DONE]
    for c, m in (extra_ok or {}).items():
        out[c] = {"model": m, "description": "success"}
    for c in codes:
        out[c] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[c]}
        if c == 503:
            out[c]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
    return out


def add_body_schemas(schema: dict) -> dict:
    """FastAPI's schema plus the request bodies the handlers read themselves, and ``serving`` as a
    pool-model config (what the registry validates it against) instead of a free object."""
    _, defs = models_json_schema([(m, "validation") for m in (*BODY_MODELS, PoolModelConfig)], ref_template="#/components/schemas/{model}")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update(defs["$defs"])
    serving = json.loads(json.dumps(comps.pop("PoolModelConfig")))
    serving["properties"].pop("name")
    serving["required"] = [r for r in serving.get("required", []) if r != "name"]
    serving["title"] = "ServingConfig"
    comps["ServingConfig"] = serving
    comps["RegisterBody"]["properties"]["serving"] = {"anyOf": [{"$ref": "#/components/schemas/ServingConfig"}, {"type": "null"}], "default": None}
    # FastAPI documents a 422 for routes with path parameters; this service answers 400 instead
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    return schema


def service_schema(routes: list[Any]) -> dict:
    """The whole document of the app whose routes these are."""
    from fastapi.openapi.utils import get_openapi

    base = get_openapi(title="icl-router", version="1", routes=routes,
                       description="OpenAI-compatible routing service: POST /v1/chat/completions with model icl-router.")
    return add_body_schemas(base)
