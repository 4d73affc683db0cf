"""The OpenAI-compatible ingress: /v1 (chat, completions, models), /admin/models, /health, /ready.

``model: "icl-router"`` (or ``"auto"``) is routed: the router deployment scores the query,
the policy and the decision layer pick a model, and the pool models are tried in order
until one answers (``failover.failover``). A pool model's own name passes straight through.
Routing travels back in ``x-icl-router-*`` headers; the extra body field ``routing`` picks
the policy, the decision layer's overrides and the candidates per request.

Parts known to be down (a pool model, the router) are skipped at once; a background task
probes them and closes their circuits again (``circuits``). Until the router and one pool
model have answered, /v1 answers 503 with Retry-After at once. Every bad input is a 4xx with
an OpenAI-style error body (``protocol``); every response is counted by status and error code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from icl_router.config import ServeConfig
from icl_router.routing.policy import Policy
from icl_router.serving.auth import Keys
from icl_router.serving.circuits import Circuits, probe_open
from icl_router.serving.failover import ROUTER, Exhausted, ModelRefused, Plan, Scores, failover, fallback_header, plan
from icl_router.serving.metrics import CountResponses
from icl_router.serving.protocol import (
    POLICY_FIELDS,
    ROUTED,
    AdminModel,
    AdminModelList,
    ApiError,
    ChatBody,
    Completion,
    CompletionBody,
    Deleted,
    Health,
    ModelCard,
    ModelList,
    Ready,
    RegisterBody,
    Registered,
    RoutingOptions,
    add_body_schemas,
    body_spec,
    candidates,
    install_error_handlers,
    parse_body,
    read_body,
    reply,
    require_json,
    resolve,
    responses,
    text_of,
    validation_error,
)
from icl_router.serving.protocol import H as HDR
from icl_router.serving.registry import EMPTY, PoolSnapshot, Refusal
from icl_router.serving.sse import relay

log = logging.getLogger("ray.serve")

app = FastAPI(title="icl-router", version="1", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(CountResponses)
install_error_handlers(app)


def _error_of(first: Any) -> Any:
    """ray.serve.llm yields its engine's ErrorResponse (not the public subclass): matched by shape."""
    items = first if isinstance(first, list) else [first]
    return next((x for x in items if hasattr(x, "error") and not hasattr(x, "choices")), None)


def _policy_header(d: Plan) -> str:
    pol, params = d.decision.policy, d.params
    out = pol.kind + "".join(f";{k}={getattr(pol, k)}" for k in POLICY_FIELDS if getattr(pol, k) is not None)
    if params is not None and d.decision.default is not None:
        out += f";min_gain={params.min_gain};prior_weight={params.prior_weight}"
        if d.task_layer:
            out += ";layer=task"
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    async def __init__(self, router: Any, registry: Any, pools: dict[str, Any], *, cfg: ServeConfig, local: dict | None = None) -> None:
        """``router``: the Router deployment's handle, or None with ``local``: InProcessRouter's
        arguments (``router.placement: ingress``), the router in this replica, called without a hop."""
        from icl_router.serving.metrics import ingress_metrics

        self.cfg = cfg
        if router is None:
            from icl_router.serving.deployments import InProcessRouter

            router = await InProcessRouter.create(registry=registry, **(local or {}))
        self.router, self.registry, self.handles = router, registry, dict(pools)
        self.keys = Keys.from_config(cfg.auth)
        self.default_policy = Policy(**cfg.policy.model_dump())
        self.metrics = ingress_metrics()
        self.snap: PoolSnapshot = EMPTY
        self.circuits = Circuits()
        self.started = False  # the router and one pool model have answered once
        self.retry_after = str(max(1, math.ceil(cfg.probe_interval_s)))
        self.schema: dict | None = None
        # probe rounds before taking traffic: a replica added to a running service (the registry lists
        # ready models) repeats them, bounded, until the router and a model answer; under load one
        # probe can be slow, and a replica taking traffic unstarted would answer 503 to every request
        deadline = time.monotonic() + 10 * cfg.probe_timeout_s
        while True:
            try:
                await asyncio.wait_for(self._tick(), 2 * cfg.probe_timeout_s)
            except Exception as e:  # the pool is still starting: the watcher goes on
                log.info("probe round before traffic: %s", type(e).__name__)
            if self.started or not self.snap.ready or time.monotonic() > deadline:
                break
            await asyncio.sleep(cfg.probe_interval_s)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # ---- the background task: the pool's version, the probes, the gauges ------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception as e:  # never let the watcher die
                log.warning("watcher: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.cfg.probe_interval_s)

    async def _tick(self) -> None:
        try:
            pool = await asyncio.wait_for(self._await(self.registry.get_version.remote()), self.cfg.probe_timeout_s)
            if pool != (self.snap.epoch, self.snap.version):
                await self._refresh()
        except Exception as e:  # the registry restarting: keep the last pool
            log.warning("registry poll failed: %s: %s", type(e).__name__, str(e)[:200])
        self.circuits.forget([ROUTER, *self.snap.models])
        ready = self.snap.ready
        await asyncio.gather(
            probe_open(self.circuits, [ROUTER], lambda _: self._await(self.router.health.remote()), timeout_s=self.cfg.probe_timeout_s),
            probe_open(self.circuits, ready, self._probe_model, timeout_s=self.cfg.probe_timeout_s),
        )
        up = [m for m in ready if not self.circuits.is_open(m)]
        if not self.started and up and not self.circuits.is_open(ROUTER):
            self.started = True
            log.info("ready: the router and %s answer", up)
        self.metrics["open_circuits"].set(len(self.circuits.open_names([ROUTER, *ready])))
        self.metrics["ready"].set(1 if self._ready() else 0)

    @staticmethod
    async def _await(response: Any) -> Any:
        return await response

    async def _refresh(self) -> PoolSnapshot:
        self.snap = await asyncio.wait_for(self._await(self.registry.snapshot.remote()), self.cfg.registry_timeout_s)
        return self.snap

    async def _probe_model(self, model: str) -> None:
        """A 1-token completion: the model's replica is up and its engine answers."""
        from ray.serve.llm.openai_api_models import CompletionRequest

        gen = self._handle(model).options(stream=True).completions.remote(CompletionRequest(model=model, prompt="ping", max_tokens=1))
        try:
            first = await gen.__anext__()
        finally:
            gen.cancel()
        err = _error_of(first)
        if err is not None and int(err.error.code or 500) >= 500:
            raise RuntimeError(f"{model} answered {err.error.code}")

    def _ready(self) -> bool:
        return self.started and any(not self.circuits.is_open(m) for m in self.snap.ready)

    def _handle(self, model: str) -> Any:
        if model not in self.handles:
            entry = self.snap.models[model]
            self.handles[model] = serve.get_deployment_handle(entry.deployment, app_name=entry.app)
        return self.handles[model]

    # ---- reading requests ---------------------------------------------------------------

    def _gate(self) -> None:
        if not self.started:
            raise ApiError(503, "the service is starting: the router and the pool are not ready yet; retry after Retry-After seconds",
                           code="not_ready", type_="server_error", headers={"Retry-After": self.retry_after})

    async def _read(self, request: Request, cls: type, *, admin: bool) -> Any:
        self.keys.check(request.headers.get("authorization"), admin=admin)
        if not admin:
            self._gate()
        require_json(request)
        return parse_body(await read_body(request, self.cfg.max_body_bytes), cls)

    def _check_length(self, n: int, param: str) -> None:
        if n > self.cfg.max_prompt_chars:
            raise ApiError(400, f"This prompt has {n} characters, over this service's limit of {self.cfg.max_prompt_chars}. Shorten the prompt.",
                           code="context_length_exceeded", param=param)

    # ---- routing ----------------------------------------------------------------------------

    async def _plan(self, text: str, r: RoutingOptions, snap: PoolSnapshot, *, exclude: str | None = None) -> tuple[Plan, dict[str, str]]:
        policy, params = resolve(r, snap, default=self.default_policy)
        cands = candidates(r, snap, exclude=exclude)
        pool = (snap.epoch, snap.version)

        async def score(t: str) -> Scores:
            return await self.router.score.remote(t, pool, r.task)

        p = await plan(text, candidates=cands, priors=snap.priors(), costs=snap.costs(), policy=policy, params=params, score=score,
                       circuits=self.circuits, timeout_s=self.cfg.router_timeout_s, pinned="min_gain" in r.decision_overrides())
        d = p.decision
        headers = {
            HDR + "route": "routed",
            HDR + "chosen": d.model,
            HDR + "order": ",".join(d.order),
            HDR + "p": ",".join(f"{m}={v:.4f}" for m, v in d.p.items()),
            HDR + "policy": _policy_header(p),
            HDR + "scoring-ms": f"{p.scoring_ms:.2f}",
        }
        if d.default is not None:
            headers[HDR + "default"] = d.default
        if p.timing:
            headers[HDR + "timing"] = ";".join(f"{k}={v}" for k, v in p.timing.items())
        return p, headers

    async def _dispatch(self, request: Request, kind: Literal["chat", "completions"], body: ChatBody | CompletionBody, text: str) -> Response:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        snap, r = self.snap, body.routing or RoutingOptions()
        payload = body.model_dump(exclude={"routing"}, exclude_none=True)
        try:  # vLLM's own request type, checked here: a request it cannot take is a 400, not a model failure
            req = (ChatCompletionRequest if kind == "chat" else CompletionRequest)(**payload)
        except ValidationError as e:
            raise validation_error(e) from None
        except Exception as e:  # vLLM's own checks (VLLMValidationError: e.g. stream_options without stream)
            raise ApiError(400, f"{type(e).__name__}: {e}", code="invalid_value", param=getattr(e, "parameter", None)) from None
        skipped: list[tuple[str, str]] = []
        more = None
        if body.model in ROUTED:
            p, headers = await self._plan(text, r, snap)
            order, skipped, route = p.decision.order, list(p.skipped), "routed"
        else:
            entry = snap.models.get(body.model)
            if entry is None or entry.state != "ready":
                known = [*ROUTED, *snap.ready]
                raise ApiError(404, f"The model `{body.model}` does not exist. Available: {', '.join(known)}.", code="model_not_found", param="model")
            order, route = [body.model], "direct"
            headers = {HDR + "route": "direct", HDR + "model": body.model}
            if r.fallback:  # checked now (a bad routing field is a 400 whether or not the model fails)
                resolve(r, snap, default=self.default_policy)
                if r.models:
                    candidates(r, snap, exclude=body.model)

                async def more() -> list[str]:
                    try:
                        p, routed = await self._plan(text, r, snap, exclude=body.model)
                    except ApiError as e:  # nothing else to route to
                        log.warning("no fallback for %s: %s", body.model, e.message)
                        return []
                    headers.update({k: v for k, v in routed.items() if k != HDR + "route"})
                    skipped.extend(p.skipped)
                    return p.decision.order

        async def call(model: str) -> tuple[Any, Any]:
            gen = getattr(self._handle(model).options(stream=True), kind).remote(req.model_copy(update={"model": model}))
            try:
                first = await gen.__anext__()
            except BaseException:  # failed, or given up on (timeout): stop the generation
                gen.cancel()
                raise
            err = _error_of(first)
            if err is not None:
                gen.cancel()
                code = int(err.error.code or 500)
                if code < 500:
                    raise ModelRefused(code, err.error.message, code=str(err.error.type or "invalid_request_error"), param=err.error.param)
                raise RuntimeError(f"{model} answered {code}: {err.error.message}")
            return first, gen

        try:
            served = await failover(order, call=call, circuits=self.circuits, timeout_s=self.cfg.first_output_timeout_s, more=more, skipped=skipped)
        except ModelRefused as e:
            return reply(request, ApiError(e.status, e.message, code=e.code or "invalid_request_error", param=e.param), headers)
        except Exhausted as e:
            self._count_fallbacks(e.skipped)
            self.metrics["answers"].inc(tags={"model": order[0], "route": route, "status": "unavailable"})
            headers[HDR + "fallback"] = fallback_header(e.skipped)
            why = ", ".join(f"{m} ({why})" for m, why in e.skipped)
            return reply(request, ApiError(503, f"no pool model could answer: {why}", code="model_unavailable", type_="server_error",
                                           headers={"Retry-After": self.retry_after}), headers)
        headers[HDR + "model"] = served.model
        if served.skipped:
            headers[HDR + "fallback"] = fallback_header(served.skipped)
            self._count_fallbacks(served.skipped)
        self.metrics["answers"].inc(tags={"model": served.model, "route": route, "status": "ok"})
        if body.stream:  # from here on the answer cannot move to another model
            def broken(reason: str) -> None:
                self.circuits.trip(served.model, reason)
                self.metrics["answers"].inc(tags={"model": served.model, "route": route, "status": "stream_broken"})

            stream = relay(served.first, served.rest, stall_s=self.cfg.first_output_timeout_s, cancel=served.rest.cancel, on_broken=broken)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return Response(served.first.model_dump_json(), media_type="application/json", headers=headers)

    def _count_fallbacks(self, skipped: list[tuple[str, str]]) -> None:
        for m, why in skipped:
            self.metrics["fallbacks"].inc(tags={"from_model": m, "reason": why})

    # ---- /v1 ----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=body_spec(ChatBody), responses=responses(400, 401, 404, 413, 415, 503, ok=Completion, stream=True))
    async def chat(self, request: Request) -> Response:
        body: ChatBody = await self._read(request, ChatBody, admin=False)
        texts = [text_of(m.content) for m in body.messages]
        self._check_length(sum(map(len, texts)), "messages")
        users = [t for m, t in zip(body.messages, texts) if m.role == "user" and t.strip()]
        if not users and not any(t.strip() for t in texts):
            raise ApiError(400, "messages hold no text: give at least one message with content", code="invalid_value", param="messages")
        return await self._dispatch(request, "chat", body, users[-1] if users else "\n".join(texts))

    @app.post("/v1/completions", response_model=None, openapi_extra=body_spec(CompletionBody), responses=responses(400, 401, 404, 413, 415, 503, ok=Completion, stream=True))
    async def completions(self, request: Request) -> Response:
        body: CompletionBody = await self._read(request, CompletionBody, admin=False)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check_length(sum(map(len, prompts)), "prompt")
        if not any(p.strip() for p in prompts):
            raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
        return await self._dispatch(request, "completions", body, prompts[0])

    def _card(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": 0, "owned_by": "icl-router"}

    @app.get("/v1/models", response_model=None, responses=responses(401, 503, ok=ModelList))
    async def models(self, request: Request) -> dict:
        self.keys.check(request.headers.get("authorization"))
        self._gate()
        return {"object": "list", "data": [self._card(m) for m in [*ROUTED, *self.snap.ready]]}

    @app.get("/v1/models/{model:path}", response_model=None, responses=responses(401, 404, 503, ok=ModelCard))
    async def get_v1_model(self, request: Request, model: str) -> dict:
        self.keys.check(request.headers.get("authorization"))
        self._gate()
        if model not in ROUTED and model not in self.snap.ready:
            raise ApiError(404, f"The model `{model}` does not exist. Available: {', '.join([*ROUTED, *self.snap.ready])}.", code="model_not_found", param="model")
        return self._card(model)

    # ---- probes and the schema ------------------------------------------------------------------

    @app.get("/health", response_model=None, responses=responses(ok=Health))
    async def health(self) -> dict:
        """Live: the ingress answers (no key)."""
        return {"status": "ok"}

    @app.get("/ready", response_model=None, responses=responses(503, ok=Ready))
    async def ready(self, request: Request) -> Response:
        """Ready: the router answered once and a pool model answers now (no key). A router that fails
        later does not make the service unready: requests then route by the priors."""
        body = {"ready": self._ready(), "router": "down" if self.circuits.is_open(ROUTER) else "up",
                "models_up": sum(not self.circuits.is_open(m) for m in self.snap.ready)}
        if body["ready"]:
            return JSONResponse(body)
        request.state.error_code = "not_ready"
        return JSONResponse(body, status_code=503, headers={"Retry-After": self.retry_after})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        self.keys.check(request.headers.get("authorization"), either=True)
        if self.schema is None:
            base = get_openapi(title="icl-router", version="1", routes=request.app.routes,
                               description="OpenAI-compatible routing service: POST /v1/chat/completions with model icl-router.")
            self.schema = add_body_schemas(base)
        return self.schema

    # ---- /admin -------------------------------------------------------------------------------

    async def _registry(self, method: str, *args: Any, **kw: Any) -> Any:
        try:
            out = await asyncio.wait_for(self._await(getattr(self.registry, method).remote(*args, **kw)), self.cfg.registry_timeout_s)
        except Exception as e:
            log.warning("registry.%s failed: %s: %s", method, type(e).__name__, str(e)[:200])
            raise ApiError(503, "the pool registry is not answering (restarting?); retry", code="registry_unavailable", type_="server_error",
                           headers={"Retry-After": self.retry_after}) from None
        if isinstance(out, Refusal):
            raise ApiError(out.status, out.message, code=out.code, param=out.param)
        return out

    async def _fresh(self) -> PoolSnapshot:
        try:
            return await self._refresh()
        except Exception:
            raise ApiError(503, "the pool registry is not answering (restarting?); retry", code="registry_unavailable", type_="server_error",
                           headers={"Retry-After": self.retry_after}) from None

    def _row(self, snap: PoolSnapshot, name: str) -> dict:
        e = snap.models[name]
        progress = None if e.graded is None else {"graded": e.graded, "k": snap.k, "resumed": e.resumed}
        return {"id": name, "state": e.state, "cost": e.cost, "app": e.app, "deployment": e.deployment, "accuracy": e.accuracy,
                "routable": name in snap.profiles, "circuit": self.circuits.state(name), "error": e.error, "progress": progress}

    @app.get("/admin/models", response_model=None, responses=responses(401, 503, ok=AdminModelList))
    async def list_models(self, request: Request) -> dict:
        self.keys.check(request.headers.get("authorization"), admin=True)
        snap = await self._fresh()
        return {"object": "list", "version": snap.version, "k": snap.k, "anchors": list(snap.anchors),
                "router": self.circuits.state(ROUTER), "data": [self._row(snap, m) for m in snap.models]}

    @app.get("/admin/models/{name:path}", response_model=None, responses=responses(401, 404, 503, ok=AdminModel))
    async def get_model(self, request: Request, name: str) -> dict:
        self.keys.check(request.headers.get("authorization"), admin=True)
        snap = await self._fresh()
        if name not in snap.models:
            raise ApiError(404, f"model {name!r} is not in the pool; GET /admin/models lists it", code="model_not_found", param="name")
        return self._row(snap, name)

    @app.post("/admin/models", response_model=None, status_code=201, openapi_extra=body_spec(RegisterBody),
              responses=responses(400, 401, 404, 409, 413, 415, 503, ok=Registered, ok_code=201, extra_ok={202: Registered}))
    async def register(self, request: Request) -> JSONResponse:
        body: RegisterBody = await self._read(request, RegisterBody, admin=True)
        out = await self._registry("register", body.model, body.profile, dataset=body.dataset, cost=body.cost, serving=body.serving, replace=body.replace)
        snap = await self._fresh()
        if body.model in snap.profiles and not self.circuits.is_open(ROUTER):
            # warm the router replica this ingress talks to, so the next routed query pays no prefix forward
            try:
                await asyncio.wait_for(self._await(self.router.score.remote("warm up", (snap.epoch, snap.version))), self.cfg.probe_timeout_s)
            except Exception as e:
                log.warning("warming the router after registering %s: %s", body.model, e)
        return JSONResponse(out, status_code=201 if out["state"] == "ready" else 202)

    @app.delete("/admin/models/{name:path}", response_model=None, responses=responses(401, 404, 409, 503, ok=Deleted))
    async def delete_model(self, request: Request, name: str) -> dict:
        self.keys.check(request.headers.get("authorization"), admin=True)
        out = await self._registry("delete", name)
        if out["deleted"] == "model":
            self.handles.pop(name, None)
        await self._fresh()
        return out
