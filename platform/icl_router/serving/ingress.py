"""The OpenAI-compatible ingress: /v1 (chat, completions, models) and /admin/models.

``model: "icl-router"`` (or ``"auto"``) is routed: the router deployment scores the
query against every routable model, the policy picks one, and the pool models are
tried in the router's order until one answers (failover). A pool model's own name
passes straight through. Routing travels back in ``x-icl-router-*`` headers; an
extra body field ``routing`` picks the policy (and may restrict the candidates) per
request. Every bad input is a 4xx with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from icl_router.kinds import PolicyKind
from icl_router.routing.policy import Policy, PolicyError, choose, restrict

log = logging.getLogger("ray.serve")
ROUTED = ("icl-router", "auto")
H = "x-icl-router-"  # header prefix


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def error_response(status: int, message: str, *, code: str, param: str | None = None, type_: str = "invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request bodies ---------------------------------------------------------


class RoutingOptions(BaseModel):
    """The extra body field ``routing``: a policy for this request and/or a subset of candidates."""

    model_config = ConfigDict(extra="forbid")
    policy: PolicyKind | None = None
    threshold: float | None = None
    margin: float | None = None
    budget: float | None = None
    cost_weight: float | None = None  # policy "cost": points of p one dollar per query is worth
    models: list[str] | None = Field(default=None, min_length=1)
    fallback: StrictBool = False  # a request naming a pool model: may another model answer if it fails?


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest is checked by vLLM's ChatCompletionRequest
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    routing: RoutingOptions | None = None


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str] = Field(min_length=1)
    stream: StrictBool = False
    routing: RoutingOptions | None = None


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    profile: list[StrictBool] | dict[str, StrictBool] | None = None  # outcomes on the K anchors (list: in anchor order)
    dataset: str | None = None  # or: a dataset directory holding the model's outcomes on the anchors
    cost: float | None = Field(default=None, ge=0)
    serving: dict[str, Any] | None = None  # a pool model config (path, engine_kwargs, ...): deploy it too
    replace: StrictBool = False


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("body",)) or None
    msg = err["msg"] if err["type"] != "missing" else "required field is missing"
    return ApiError(400, f"{loc}: {msg}" if loc else msg, code="invalid_value", param=loc)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content or [] if p.get("type") == "text")


def _flat(item: Any) -> list[Any]:
    return item if isinstance(item, list) else [item]


def _keys(listed: list[str], env: str | None) -> list[str]:
    return [*listed, *(k.strip() for k in os.environ.get(env or "", "").split(",") if k.strip())]


# ---- the deployment ---------------------------------------------------------

app = FastAPI(title="icl-router", docs_url=None, redoc_url=None)


METRICS: dict = {}  # this replica's metrics, set by Ingress.__init__


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    if "errors" in METRICS:
        METRICS["errors"].inc(tags={"code": e.code})
    return error_response(e.status, e.message, code=e.code, param=e.param, type_=e.type)


@app.exception_handler(RequestValidationError)
async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(400, str(e.errors()[0].get("msg")), code="invalid_value")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(e.status_code, str(e.detail), code=code)


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(500, f"internal error: {type(e).__name__}", code="internal_error", type_="server_error")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    def __init__(self, router: Any, registry: Any, pools: dict[str, Any], *, settings: dict) -> None:
        from icl_router.serving.metrics import ingress_metrics

        self.router, self.registry, self.handles = router, registry, dict(pools)
        self.s = settings
        auth = settings["auth"]
        self.api_keys = _keys(auth["api_keys"], auth["api_keys_env"])
        self.admin_keys = _keys(auth["admin_keys"], auth["admin_keys_env"])
        self.default_policy = Policy(**{k: v for k, v in settings["policy"].items()})
        self.metrics = METRICS
        METRICS.update(ingress_metrics())
        self.snap: dict = {"version": -1, "routable": {}, "models": {}}
        self.down: dict[str, float] = {}  # model -> monotonic time until which it goes last
        self._poller: asyncio.Task | None = None

    # ---- plumbing -----------------------------------------------------------

    async def _refresh(self, force: bool = False) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        if force or self.snap["version"] < 0:
            self.snap = await self.registry.snapshot.remote()

    async def _poll(self) -> None:
        """Other ingress replicas' registrations arrive within a second."""
        while True:
            await asyncio.sleep(1.0)
            try:
                if await self.registry.get_version.remote() != self.snap["version"]:
                    self.snap = await self.registry.snapshot.remote()
            except Exception as e:  # the registry restarting: keep the last pool
                log.warning("registry poll failed: %s", e)

    def _auth(self, request: Request, *, admin: bool) -> None:
        keys = self.admin_keys if admin else self.api_keys
        if not keys:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            what = "an admin key" if admin else "an API key"
            raise ApiError(401, f"Incorrect or missing API key: this endpoint needs {what} as 'Authorization: Bearer <key>'.", code="invalid_api_key")

    async def _body(self, request: Request, cls: type[BaseModel]) -> BaseModel:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def _handle(self, model: str) -> Any:
        if model not in self.handles:
            entry = self.snap["models"][model]
            self.handles[model] = serve.get_deployment_handle(entry["deployment"], app_name=entry["app"])
        return self.handles[model]

    # ---- routing and failover -----------------------------------------------

    def _policy(self, r: RoutingOptions) -> Policy:
        try:
            return self.default_policy if r.policy is None else Policy(r.policy, threshold=r.threshold, margin=r.margin, budget=r.budget, cost_weight=r.cost_weight)
        except PolicyError as e:
            raise ApiError(400, f"routing: {e}", code="invalid_value", param="routing") from None

    async def _order(self, body: ChatBody | CompletionBody, text: str) -> tuple[list[str], dict[str, str]]:
        """The models to try, in order, and the routing headers."""
        await self._refresh()
        model = body.model
        if model in ROUTED:
            return await self._routed(body, text)
        entry = self.snap["models"].get(model)
        if entry is None or entry["state"] != "ready":
            known = [*ROUTED, *(m for m, v in self.snap["models"].items() if v["state"] == "ready")]
            raise ApiError(404, f"The model `{model}` does not exist. Available: {', '.join(known)}.", code="model_not_found", param="model")
        if body.routing is not None and body.routing.fallback:  # checked now: the routing runs only if the model fails
            self._policy(body.routing)
            unknown = [m for m in body.routing.models or [] if m not in self.snap["models"]]
            if unknown:
                raise ApiError(400, f"routing: unknown models {unknown}", code="invalid_value", param="routing.models")
        return [model], {H + "route": "direct", H + "model": model}

    async def _routed(self, body: ChatBody | CompletionBody, text: str) -> tuple[list[str], dict[str, str]]:
        """Score the query, apply the policy: the failover order and the routing headers."""
        r = body.routing or RoutingOptions()
        policy = self._policy(r)
        if not self.snap["routable"]:
            raise ApiError(503, "no routable model: register one with POST /admin/models", code="no_routable_model", type_="server_error")
        t0 = time.perf_counter()
        timing = ""
        try:
            out = await asyncio.wait_for(self.router.score.remote(text, self.snap["version"]), self.s["first_output_timeout_s"])
            p = {m: v for m, v in out["p"].items() if m in self.snap["routable"]}
            timing = ";".join(f"{k}={v}" for k, v in out["ms"].items())
        except Exception as e:  # the router is down: serve unscored (every p 0.5, the policy still applies)
            log.warning("router failed (%s: %s); routing unscored", type(e).__name__, str(e)[:200])
            p = {m: 0.5 for m in self.snap["routable"]}
            self.metrics["fallbacks"].inc(tags={"from_model": "router", "to_model": "unscored"})
        scoring_ms = (time.perf_counter() - t0) * 1e3
        try:
            if r.models:
                p = restrict(p, r.models)
            costs = {m: float(v.get("cost", 0.0)) for m, v in self.snap["models"].items()}
            decision = choose(p, policy=policy, costs=costs)
        except PolicyError as e:
            raise ApiError(400, f"routing: {e}", code="invalid_value", param="routing") from None
        now = time.monotonic()
        order = sorted(decision.order, key=lambda m: self.down.get(m, 0.0) > now)  # stable: known-down models go last
        pol = policy.kind + "".join(f";{k}={getattr(policy, k)}" for k in ("threshold", "margin", "budget", "cost_weight") if getattr(policy, k) is not None)
        headers = {
            H + "route": "routed",
            H + "chosen": decision.model,
            H + "order": ",".join(decision.order),
            H + "p": ",".join(f"{m}={v:.4f}" for m, v in decision.p.items()),
            H + "policy": pol,
            H + "scoring-ms": f"{scoring_ms:.2f}",
        }
        if timing:
            headers[H + "timing"] = timing
        return order, headers

    async def _rest(self, body: ChatBody | CompletionBody, text: str, order: list[str], headers: dict[str, str]) -> list[str]:
        """A direct request's fallback: the router's order over the other models (its headers added)."""
        try:
            rest, routed = await self._routed(body, text)
        except ApiError as e:  # no routable model, or none left after routing.models
            log.warning("no fallback for %s: %s", order[0], e.message)
            return []
        headers.update({k: v for k, v in routed.items() if k != H + "route"})
        return [m for m in rest if m not in order]

    async def _dispatch(self, kind: Literal["chat", "completions"], body: ChatBody | CompletionBody, text: str) -> Response:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        order, headers = await self._order(body, text)
        route = headers[H + "route"]
        # a request naming a model fails over only if it opted in (routing.fallback): then the rest is routed
        extend = route == "direct" and body.routing is not None and body.routing.fallback
        payload = body.model_dump(exclude={"routing"}, exclude_unset=True)
        failed: list[str] = []
        for model in order:  # grows while iterating when a direct request's model fails and it opted in
            try:
                req = (ChatCompletionRequest if kind == "chat" else CompletionRequest)(**{**payload, "model": model})
            except ValidationError as e:
                raise _validation_error(e) from None
            gen = getattr(self._handle(model).options(stream=True), kind).remote(req)
            try:
                first = await asyncio.wait_for(gen.__anext__(), self.s["first_output_timeout_s"])
            except Exception as e:  # died, timed out, unreachable: the next model in the order
                gen.cancel()
                reason = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
                log.warning("pool model %s failed (%s: %s)", model, reason, str(e)[:200])
                self.down[model] = time.monotonic() + self.s["down_for_s"]
                failed.append(f"{model}:{reason}")
                order += await self._rest(body, text, order, headers) if extend and len(order) == 1 else []
                continue
            # ray.serve.llm yields its engine's ErrorResponse (not the public subclass): match by shape
            err = next((x for x in _flat(first) if hasattr(x, "error") and not hasattr(x, "choices")), None)
            if err is not None:
                code = int(err.error.code or 500)
                if code < 500:  # the request's fault: no other model would do better
                    METRICS["errors"].inc(tags={"code": str(code)})
                    return error_response(code, err.error.message, code=str(err.error.type or "invalid_request_error"), param=err.error.param, headers=headers)
                self.down[model] = time.monotonic() + self.s["down_for_s"]
                failed.append(f"{model}:error{code}")
                order += await self._rest(body, text, order, headers) if extend and len(order) == 1 else []
                continue
            self.down.pop(model, None)
            headers[H + "model"] = model
            if failed:
                headers[H + "fallback"] = ";".join(failed)
                for f in failed:
                    self.metrics["fallbacks"].inc(tags={"from_model": f.split(":")[0], "to_model": model})
            self.metrics["requests"].inc(tags={"model": model, "route": route, "status": "ok"})
            if body.stream:  # from here on the answer cannot move to another model
                return StreamingResponse(self._sse(first, gen, tags={"model": model, "route": route}), media_type="text/event-stream", headers=headers)
            return Response(first.model_dump_json(), media_type="application/json", headers=headers)
        self.metrics["requests"].inc(tags={"model": order[0], "route": route, "status": "unavailable"})
        headers[H + "fallback"] = ";".join(failed)
        return error_response(503, f"no pool model could answer: {', '.join(failed)}", code="model_unavailable", type_="server_error", headers=headers)

    async def _sse(self, first: Any, gen: Any, *, tags: dict[str, str]):
        """vLLM's SSE chunks; a stream that breaks or stalls for ``first_output_timeout_s`` ends with an
        OpenAI-style error event (the openai client raises APIError on it), never a hung connection."""
        for s in _flat(first):
            yield s
        while True:
            try:
                item = await asyncio.wait_for(gen.__anext__(), self.s["first_output_timeout_s"])
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:  # the client went away: stop the generation
                gen.cancel()
                raise
            except Exception as e:
                gen.cancel()
                reason = "stalled" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
                log.warning("stream broke (%s: %s)", reason, str(e)[:200])
                self.metrics["requests"].inc(tags={**tags, "status": "stream_broken"})
                err = {"message": f"the model failed mid-stream ({reason}); the answer is incomplete", "type": "server_error", "code": "stream_broken"}
                yield f"data: {json.dumps({'error': err})}\n\n"
                yield "data: [DONE]\n\n"
                return
            for s in _flat(item):
                yield s if isinstance(s, str) else f"data: {s.model_dump_json()}\n\n"

    def _check_length(self, text_len: int) -> None:
        if text_len > self.s["max_prompt_chars"]:
            raise ApiError(
                400,
                f"This prompt has {text_len} characters, over this service's limit of {self.s['max_prompt_chars']}. Shorten the prompt.",
                code="context_length_exceeded",
                param="messages",
            )

    # ---- /v1 ------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        self._auth(request, admin=False)
        body = await self._body(request, ChatBody)
        texts = [_text(m.content) for m in body.messages]
        self._check_length(sum(map(len, texts)))
        users = [t for m, t in zip(body.messages, texts) if m.role == "user" and t.strip()]
        if not users and not any(t.strip() for t in texts):
            raise ApiError(400, "messages hold no text: give at least one message with content", code="invalid_value", param="messages")
        return await self._dispatch("chat", body, users[-1] if users else "\n".join(texts))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._auth(request, admin=False)
        body = await self._body(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check_length(sum(map(len, prompts)))
        if not any(p.strip() for p in prompts):
            raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
        return await self._dispatch("completions", body, prompts[0])

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request, admin=False)
        await self._refresh()
        ready = [m for m, v in self.snap["models"].items() if v["state"] == "ready"]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "icl-router"} for m in [*ROUTED, *ready]]}

    # ---- /admin ---------------------------------------------------------------

    @app.get("/admin/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request, admin=True)
        await self._refresh(force=True)
        snap = self.snap
        data = [{"id": m, **v, "routable": m in snap["routable"]} for m, v in snap["models"].items()]
        return {"object": "list", "version": snap["version"], "k": snap["k"], "anchors": await self.registry.anchors.remote(), "data": data}

    @app.post("/admin/models")
    async def register(self, request: Request) -> JSONResponse:
        self._auth(request, admin=True)
        body = await self._body(request, RegisterBody)
        try:
            out = await self.registry.register.remote(body.model, body.profile, dataset=body.dataset, cost=body.cost, serving=body.serving, replace=body.replace)
        except (FileExistsError, KeyError, ValueError) as e:
            cause = getattr(e, "cause", e)  # the registry's own exception inside Ray's RayTaskError
            msg = cause.args[0] if isinstance(cause, KeyError) else str(cause)
            if isinstance(cause, FileExistsError):
                raise ApiError(409, msg, code="model_exists", param="model") from None
            if isinstance(cause, KeyError):
                raise ApiError(404, msg, code="model_not_found", param="model") from None
            raise ApiError(400, msg, code="invalid_value", param="profile") from None
        await self._refresh(force=True)
        # warm the router replica this ingress talks to, so the next routed query pays no prefix forward
        await self.router.score.remote("warm up", self.snap["version"])
        return JSONResponse(out, status_code=201 if out["state"] == "ready" else 202)
