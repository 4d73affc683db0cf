"""The service's wire format: request bodies, response shapes, OpenAI-style errors, the limits.

Everything a request carries is checked here before anything is called: the media type,
the body size, JSON that parses (no NaN, bounded nesting), and a typed body (text-only
content parts, bounded lists and numbers). A refusal is an :class:`ApiError`, which the
ingress turns into ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status;
``param`` names the field (``messages.0.content``, ``routing.min_gain``, ``serving.path``).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from icl_router.kinds import PolicyKind
from icl_router.routing.decision import DecisionError, DecisionParams
from icl_router.routing.policy import Policy, PolicyError

log = logging.getLogger("ray.serve")
ROUTED = ("icl-router", "auto")  # model names that ask for routing
H = "x-icl-router-"  # prefix of the routing headers

# Limits of one request (docs/service.md, "Limits and errors"). The body size and the prompt length are configurable.
MAX_JSON_DEPTH = 32  # nesting of arrays/objects; a chat body needs 5
MAX_MESSAGES = 1024
MAX_PROMPTS = 128  # prompts in one completions request (routed on the first)
MAX_N = 16  # choices per request
MAX_STOP = 4
MAX_TOKENS = 1_000_000  # an upper bound on max_tokens; each model's own context length still applies
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # names a registration may give a model


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


# ---- request bodies -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Strict):
    """A chat message. Content is text: a string or a list of text parts (the pool serves text models)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None  # an assistant message sent back as the openai client returned it


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


class RoutingOptions(_Strict):
    """The extra body field ``routing``: this request's policy, decision-layer overrides and candidates."""

    policy: PolicyKind | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    margin: float | None = Field(default=None, ge=0, le=1)
    budget: float | None = Field(default=None, ge=0)
    cost_weight: float | None = Field(default=None, ge=0)
    # decision-layer overrides (routing.decision.OVERRIDABLE); need a router directory with a decision layer
    min_gain: float | None = Field(default=None, ge=0, le=1)
    prior_weight: float | None = Field(default=None, ge=0)
    default_model: str | None = None
    models: list[str] | None = Field(default=None, min_length=1, max_length=256)
    # the query's task (a task name of the router's anchors, anchors.parquet): routed by the decision
    # layer's task layer if some anchor has it; any other name routes as a query naming none
    task: str | None = Field(default=None, min_length=1, max_length=256)
    fallback: StrictBool = False  # a request naming a pool model: may another model answer if it fails?

    def decision_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("prior_weight", "min_gain", "default_model") if getattr(self, k) is not None}


class _Generation(BaseModel):
    """What chat and completions share. Other fields pass to vLLM, which checks them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=256)
    routing: RoutingOptions | None = None


class ChatBody(_Generation):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "icl-router", "messages": [{"role": "user", "content": "What is 17 + 25?"}], "max_tokens": 4},
        {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True, "routing": {"policy": "cost", "cost_weight": 10}},
    ]})
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionBody(_Generation):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "icl-router", "prompt": "What is 17 + 25?", "max_tokens": 4}]})
    prompt: str | list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    echo: StrictBool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


class RegisterBody(_Strict):
    """A model's profile (given, or a dataset's anchor outcomes); or ``serving`` alone: the service deploys
    the model, profiles it on the router's anchors and registers it (``GET /admin/models/{model}`` follows it)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "m-new", "serving": {"path": "/models/m-new", "engine_kwargs": {"max_model_len": 2048}}, "cost": 0.001},
    ]})
    model: str = Field(pattern=MODEL_NAME)
    profile: list[StrictBool] | dict[str, StrictBool] | None = None  # outcomes on the K anchors (list: in anchor order)
    dataset: str | None = Field(default=None, min_length=1)  # or: a dataset directory holding the model's anchor outcomes
    cost: float | None = Field(default=None, ge=0)
    serving: dict[str, Any] | None = None  # a pool-model config (path, engine_kwargs, ...): deploy the model (and profile it)
    replace: StrictBool = False


# ---- response shapes (the OpenAPI schema; responses are built as plain dicts) ---------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Progress(BaseModel):
    graded: int  # anchors whose graded outcome is written
    k: int  # of the router's K anchors
    resumed: int  # of the graded, those found written when this profiling run started (a restarted registry)


ModelState = Literal["deploying", "profiling", "ready", "failed"]


class AdminModel(BaseModel):
    id: str
    state: ModelState
    cost: float
    app: str | None  # the Serve app the registry deployed it in; None: the serve config's pool
    deployment: str
    accuracy: float | None  # the profile's accuracy on the anchors (the model's prior); None: no profile
    routable: bool
    circuit: Literal["closed", "open"]  # as this ingress replica sees it
    error: str | None = None
    progress: Progress | None = None  # profiling on the anchors (models the service profiled); None: not profiled here


class AdminModelList(BaseModel):
    object: Literal["list"]
    version: int
    k: int
    anchors: list[str]
    router: Literal["closed", "open"]
    data: list[AdminModel]


class Registered(BaseModel):
    model: str
    state: ModelState
    version: int
    accuracy: float | None  # the given profile's; None: profiled on the anchors once deployed


class Deleted(BaseModel):
    model: str
    deleted: Literal["model", "profile"]  # profile: a model of the serve config's pool stays served by name
    torn_down: str | None  # the Serve app removed, if the registry had deployed one


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    router: Literal["up", "down"]
    models_up: int


class Completion(BaseModel):
    """vLLM's answer (chat.completion or text_completion), passed through as it is."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    model: str
    choices: list[dict[str, Any]]


def reply(request: Request, e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error_code = e.code
    return JSONResponse(error_body(e.message, code=e.code, param=e.param, type_=e.type), status_code=e.status, headers={**(headers or {}), **e.headers})


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


# ---- reading a request ------------------------------------------------------------------


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


# ---- the routing field against the pool -------------------------------------------------------

POLICY_FIELDS = ("threshold", "margin", "budget", "cost_weight")
POLICY_OF = {"threshold": "threshold", "margin": "margin", "budget": "budget", "cost_weight": "cost"}  # the policy each value is for


def resolve(r: RoutingOptions, snap: Any, *, default: Policy) -> tuple[Policy, DecisionParams | None]:
    """This request's policy and decision parameters: the service's default policy and the router
    directory's decision layer (``snap.decision``), with the request's ``routing`` overrides."""
    given = {k: getattr(r, k) for k in POLICY_FIELDS if getattr(r, k) is not None}
    kind = r.policy or default.kind
    stray = [k for k in given if POLICY_OF[k] != kind]
    if stray:
        raise ApiError(400, f"routing.{stray[0]} belongs to policy {POLICY_OF[stray[0]]!r}, and this request's policy is {kind!r}; "
                       "set routing.policy", code="invalid_value", param=f"routing.{stray[0]}")
    values = {k: getattr(default, k) for k in POLICY_FIELDS} if r.policy is None else {}
    try:
        policy = Policy(kind, **{**values, **given})
    except PolicyError as e:
        raise ApiError(400, f"routing: {e}", code="invalid_value", param="routing.policy") from None
    params = snap.decision
    for name, value in r.decision_overrides().items():
        if params is None:
            raise ApiError(400, f"routing.{name}: this router has no decision layer (its icl_router.json has no 'decision'); remove {name}",
                           code="invalid_value", param=f"routing.{name}")
        try:
            params = params.replace(**{name: value})
        except DecisionError as e:
            raise ApiError(400, f"routing.{name}: {e}", code="invalid_value", param=f"routing.{name}") from None
    return policy, params


def candidates(r: RoutingOptions, snap: Any, *, exclude: str | None = None) -> list[str]:
    """The models this request may be routed to: the routable pool (``snap.routable``), or the part
    of it that ``routing.models`` names; unknown names are a 400, nothing routable a 503."""
    routable = [m for m in snap.routable if m != exclude]
    if r.models:
        unknown = sorted({m for m in r.models if m not in snap.models})
        if unknown:
            raise ApiError(400, f"routing.models: unknown models {unknown}; the pool has {sorted(snap.models)}", code="invalid_value",
                           param="routing.models")
        cands = [m for m in dict.fromkeys(r.models) if m in routable]
        if not cands:
            raise ApiError(400, f"routing.models: none of {r.models} is routable (ready, with a profile); routable: {routable}",
                           code="invalid_value", param="routing.models")
    else:
        cands = routable
    if not cands:
        raise ApiError(503, "no routable model: register one with POST /admin/models", code="no_routable_model", type_="server_error")
    if r.default_model is not None and r.default_model not in cands:
        raise ApiError(400, f"routing.default_model: {r.default_model!r} is not among the candidates {cands}", code="invalid_value",
                       param="routing.default_model")
    return cands


def text_of(content: str | list[TextPart] | None) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content or [])


# ---- the OpenAPI schema ---------------------------------------------------------------------

BODY_MODELS = (ChatBody, CompletionBody, RegisterBody)


def body_spec(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose body the handler reads itself (checked by ``parse_body``)."""
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


ERROR_DESCRIPTIONS = {
    400: "invalid request (the error's param names the field)",
    401: "missing or wrong key",
    404: "no such model or path",
    405: "method not allowed",
    409: "conflicts with the pool's state",
    413: "request body too large",
    415: "Content-Type is not application/json",
    503: "not ready, or no model can answer now (see Retry-After)",
}


def add_body_schemas(schema: dict) -> dict:
    """FastAPI's schema plus the request bodies the handlers read themselves, and ``serving`` as a
    pool-model config (what the registry validates it against) instead of a free object."""
    from icl_router.config import PoolModelConfig

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
