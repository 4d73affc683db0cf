"""The service's wire format: request bodies and response shapes (pydantic models only), the names
that ask for routing, the routing headers' prefix and the limits of one request.

Reading a body is ``http_io``; refusals are ``api_errors``; the OpenAPI schema is ``openapi``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from icl_router.kinds import PolicyKind

ROUTED = ("icl-router", "auto")  # model names that ask for routing
HEADER = "x-icl-router-"  # prefix of the routing headers

# Limits of one request (docs/service.md, "Limits and errors"). The body size and the prompt length are configurable.
MAX_JSON_DEPTH = 32  # nesting of arrays/objects; a chat body needs 5
MAX_MESSAGES = 1024
MAX_PROMPTS = 128  # prompts in one completions request (routed on the first)
MAX_N = 16  # choices per request
MAX_STOP = 4
MAX_TOKENS = 1_000_000  # an upper bound on max_tokens; each model's own context length still applies
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # names a registration may give a model


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

    def plain_text(self) -> str:
        """The content's text (its text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or [])


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
    explain: StrictBool = False  # why this model: x-icl-router-explain (and routing_explanation in a non-streaming body)

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


class FeedbackBody(_Strict):
    """``POST /v1/feedback``: the outcome of a routed request, by its ``x-icl-router-request-id``: whether its
    answer was right (``correct``), how good it was (``score`` in [0, 1]), or the right answer (``reference``,
    graded with the grader of the request's task). ``correct`` and ``score`` exclude each other."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"request_id": "9f2c41d0...", "correct": True},
                                                              {"request_id": "9f2c41d0...", "reference": "42"}]})
    request_id: str = Field(min_length=1, max_length=128)
    correct: StrictBool | None = None
    score: float | None = Field(default=None, ge=0, le=1)
    reference: str | None = Field(default=None, min_length=1, max_length=100_000)


class FeedbackStored(BaseModel):
    request_id: str
    model: str | None
    task: str | None
    stored: list[str]


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

