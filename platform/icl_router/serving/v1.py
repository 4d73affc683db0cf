"""The /v1 handler: chat, completions and the model list, OpenAI-compatible.

``model: "icl-router"`` (or ``"auto"``) is routed: the router deployment scores the query, the
policy and the decision layer pick a model, and the pool models are tried in order until one
answers (``failover``). A pool model's own name passes straight through (``routing.fallback``
lets another model answer if it fails). Routing travels back in ``x-icl-router-*`` headers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from icl_router.routing.policy import Policy
from icl_router.serving.api_errors import ApiError, validation_error
from icl_router.serving.auth import Keys
from icl_router.serving.decision_log import REQUEST_ID_HEADER, new_request_id
from icl_router.serving.engine_calls import first_output
from icl_router.serving.explain import explanation, header_value
from icl_router.serving.failover import (
    POLICY_FIELDS,
    Exhausted,
    ModelRefused,
    Plan,
    RouterScores,
    candidates,
    failover,
    fallback_header,
    plan,
    resolve,
)
from icl_router.serving.http_io import read_json, reply
from icl_router.serving.pool_view import PoolView
from icl_router.serving.protocol import HEADER, ROUTED, ChatBody, CompletionBody, FeedbackBody, RoutingOptions
from icl_router.serving.registry import PoolSnapshot
from icl_router.serving.sse import relay
from icl_router.serving.tracing import MODEL, REQUEST, ROUTER, Tracing, clean, decision_attrs

log = logging.getLogger("ray.serve")
Kind = Literal["chat", "completions"]


def policy_header(p: Plan) -> str:
    pol, params = p.decision.policy, p.params
    out = pol.kind + "".join(f";{k}={getattr(pol, k)}" for k in POLICY_FIELDS if getattr(pol, k) is not None)
    if params is not None and p.decision.default is not None:
        out += f";min_gain={params.min_gain};prior_weight={params.prior_weight}"
        if p.task_layer:
            out += ";layer=task"
    return out


def plan_headers(p: Plan) -> dict[str, str]:
    d = p.decision
    headers = {
        HEADER + "route": "routed",
        HEADER + "chosen": d.model,
        HEADER + "order": ",".join(d.order),
        HEADER + "p": ",".join(f"{m}={v:.4f}" for m, v in d.p.items()),
        HEADER + "policy": policy_header(p),
        HEADER + "scoring-ms": f"{p.scoring_ms:.2f}",
    }
    if d.default is not None:
        headers[HEADER + "default"] = d.default
    if p.timing:
        headers[HEADER + "timing"] = ";".join(f"{k}={v}" for k, v in p.timing.items())
    return headers


def card(model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": "icl-router"}


@dataclass
class Route:
    """Where one request goes: the order to try, the headers so far, and (a direct request that may
    fall back) where to go next once the order runs out."""

    order: list[str]
    kind: Literal["routed", "direct"]
    headers: dict[str, str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    more: Callable[[], Awaitable[list[str]]] | None = None
    plan: Plan | None = None  # a routed request's decision
    candidates: list[str] = field(default_factory=list)
    plan: Plan | None = None  # the routing decision (a direct request: once it fell back)
    pool: tuple[str, int] = ("", -1)  # the pool version it was routed on


class V1Handler:
    def __init__(self, view: PoolView, *, keys: Keys, tracing: Tracing | None = None, shadow: Any | None = None) -> None:
        """``tracing``: spans (serving/tracing.py; default off); ``shadow``: a ``shadow.Shadow`` deciding beside the live router."""
        self.view, self.cfg, self.keys = view, view.cfg, keys
        self.default_policy: Policy = view.cfg.policy.build()
        self.tracing = tracing or Tracing()
        self.shadow = shadow

    # ---- the endpoints ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        self._start(request)
        body: ChatBody = await self._read(request, ChatBody)
        texts = [m.plain_text() for m in body.messages]
        self._check_length(sum(map(len, texts)), "messages")
        users = [t for m, t in zip(body.messages, texts) if m.role == "user" and t.strip()]
        if not users and not any(t.strip() for t in texts):
            raise ApiError(400, "messages hold no text: give at least one message with content", code="invalid_value", param="messages")
        return await self._answer(request, "chat", body, users[-1] if users else "\n".join(texts))

    async def completions(self, request: Request) -> Response:
        self._start(request)
        body: CompletionBody = await self._read(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check_length(sum(map(len, prompts)), "prompt")
        if not any(p.strip() for p in prompts):
            raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
        return await self._answer(request, "completions", body, prompts[0])

    async def feedback(self, request: Request) -> dict:
        """``POST /v1/feedback``: the outcome of a routed request (serving/traffic.py)."""
        key = self.keys.check(request.headers.get("authorization"))
        body: FeedbackBody = await read_json(request, FeedbackBody, limit=self.cfg.max_body_bytes)
        return await self.view.traffic.feedback(body, key)

    def models(self, request: Request) -> dict:
        self.keys.check(request.headers.get("authorization"))
        self.view.gate()
        return {"object": "list", "data": [card(m) for m in [*ROUTED, *self.view.snap.ready]]}

    def model(self, request: Request, model: str) -> dict:
        self.keys.check(request.headers.get("authorization"))
        self.view.gate()
        if model not in ROUTED and model not in self.view.snap.ready:
            raise self._unknown(model)
        return card(model)

    # ---- reading ------------------------------------------------------------------------------

    @staticmethod
    def _start(request: Request) -> None:
        """The request's id (``x-icl-router-request-id`` on every answer, errors too) and its start time."""
        request.state.request_id = new_request_id()
        request.state.started = time.perf_counter()

    async def _read(self, request: Request, cls: type) -> Any:
        key = self.keys.check(request.headers.get("authorization"))
        self.view.gate()
        self.view.limit(key)  # the key's rate and budget, before the body is read
        request.state.key = key
        return await read_json(request, cls, limit=self.cfg.max_body_bytes)

    def _check_length(self, n: int, param: str) -> None:
        if n > self.cfg.max_prompt_chars:
            raise ApiError(400, f"This prompt has {n} characters, over this service's limit of {self.cfg.max_prompt_chars}. Shorten the prompt.",
                           code="context_length_exceeded", param=param)

    def _unknown(self, model: str) -> ApiError:
        known = [*ROUTED, *self.view.snap.ready]
        return ApiError(404, f"The model `{model}` does not exist. Available: {', '.join(known)}.", code="model_not_found", param="model")

    @staticmethod
    def _engine_request(kind: Kind, body: ChatBody | CompletionBody) -> Any:
        """vLLM's own request type, checked here: a request it cannot take is a 400, not a model failure."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        payload = body.model_dump(exclude={"routing"}, exclude_none=True)
        try:
            return (ChatCompletionRequest if kind == "chat" else CompletionRequest)(**payload)
        except ValidationError as e:
            raise validation_error(e) from None
        except Exception as e:  # vLLM's own checks (VLLMValidationError: e.g. stream_options without stream)
            raise ApiError(400, f"{type(e).__name__}: {e}", code="invalid_value", param=getattr(e, "parameter", None)) from None

    # ---- routing ------------------------------------------------------------------------------

    async def _plan(self, text: str, r: RoutingOptions, snap: PoolSnapshot, *, exclude: str | None = None) -> Plan:
        policy, params = resolve(r, snap, default=self.default_policy)
        cands = candidates(r, snap, exclude=exclude)
        pool = (snap.epoch, snap.version)

        async def score(t: str) -> RouterScores:
            with self.tracing.span(ROUTER, kind="client", attrs={"pool_version": pool[1], "task": r.task}) as span:
                s = await self.view.router.score.remote(t, pool, r.task, r.explain)
                span.set_attributes(clean({f"router.{k}_ms" if k not in ("batch", "cached") else f"router.{k}": v for k, v in s.ms.items()}))
                return s

        return await plan(text, candidates=cands, priors=snap.priors(), costs=snap.costs(), policy=policy, params=params, score=score,
                          circuits=self.view.circuits, timeout_s=self.cfg.router_timeout_s, pinned="min_gain" in r.decision_overrides())

    async def _route(self, body: ChatBody | CompletionBody, text: str) -> Route:
        snap, r = self.view.snap, body.routing or RoutingOptions()
        pool = (snap.epoch, snap.version)
        if body.model in ROUTED:
            p = await self._plan(text, r, snap)
            cands = candidates(r, snap)
            return Route(list(p.decision.order), "routed", plan_headers(p), list(p.skipped), plan=p, candidates=cands)
            return Route(list(p.decision.order), "routed", plan_headers(p), list(p.skipped), plan=p, pool=pool)
        entry = snap.models.get(body.model)
        if entry is None or entry.state != "ready":
            raise self._unknown(body.model)
        route = Route([body.model], "direct", {HEADER + "route": "direct", HEADER + "model": body.model}, pool=pool)
        if r.fallback:
            resolve(r, snap, default=self.default_policy)  # checked now: a bad routing field is a 400 whether or not the model fails
            if r.models:
                candidates(r, snap, exclude=body.model)

            async def more() -> list[str]:
                try:
                    p = await self._plan(text, r, snap, exclude=body.model)
                except ApiError as e:  # nothing else to route to
                    log.warning("no fallback for %s: %s", body.model, e.message)
                    return []
                route.headers.update({k: v for k, v in plan_headers(p).items() if k != HEADER + "route"})
                route.skipped.extend(p.skipped)
                route.plan = p
                return p.decision.order

            route.more = more
        return route

    # ---- answering ----------------------------------------------------------------------------

    async def _answer(self, request: Request, kind: Kind, body: ChatBody | CompletionBody, text: str) -> Response:
        with self.tracing.span(REQUEST, kind="server", attrs={"http.route": request.url.path, "requested_model": body.model, "stream": body.stream},
                               parent_headers=request.headers) as span:
            try:
                response = await self._answer_traced(request, kind, body, text, span)
            except ApiError as e:
                span.set_attributes(clean({"http.status_code": e.status, "error": e.code}))
                raise
            span.set_attribute("http.status_code", response.status_code)
            return response

    async def _answer_traced(self, request: Request, kind: Kind, body: ChatBody | CompletionBody, text: str, span: Any) -> Response:
        t0 = time.perf_counter()
        req = self._engine_request(kind, body)
        r = body.routing or RoutingOptions()
        route = await self._route(body, text)
        headers = route.headers
        request_id = request.state.request_id  # one id: the header, the span, the decision log and the shadow's row
        expl = None
        if route.plan is not None:
            snap = self.view.snap
            if r.explain:
                expl = explanation(route.plan, anchors=snap.anchors, profiles=snap.profiles, priors=snap.priors(), costs=snap.costs())
                headers[HEADER + "explain"] = header_value(expl)
            span.set_attributes(clean({**decision_attrs(route.plan, explain=expl), "route": "routed", "request_id": request_id}))
        else:
            span.set_attributes(clean({"route": route.kind, "request_id": request_id}))
        headers[REQUEST_ID_HEADER] = request.state.request_id

        def logged(model: str | None, status: str, skipped: list[tuple[str, str]], usage: Any = None) -> None:
            if route.plan is None:  # a direct request that did not fall back: no decision to log
                return
            entry = self.view.snap.models.get(model) if model else None
            self.view.traffic.record(
                request_id=request.state.request_id, started=request.state.started, text=text, task=(body.routing or RoutingOptions()).task,
                plan=route.plan, route=route.kind, kind=kind, stream=body.stream, model=model, status=status,
                skipped=[s for s in skipped if s not in route.plan.skipped], usage=usage, cost=None if entry is None else entry.cost,
                key=getattr(request.state, "key", None), pool=route.pool, policy=headers.get(HEADER + "policy", route.plan.decision.policy.kind),
                embedding=None if route.plan.embedding is None else list(route.plan.embedding),
            )

        async def call(model: str) -> tuple[Any, Any]:
            with self.tracing.span(MODEL, kind="client", attrs={"model": model}) as mspan:
                try:
                    gen = getattr(self.view.handle(model).options(stream=True), kind).remote(req.model_copy(update={"model": model}))
                    out = await first_output(gen, model=model), gen
                except BaseException as e:
                    mspan.set_attribute("icl_router.outcome", type(e).__name__)
                    raise
                mspan.set_attribute("icl_router.outcome", "ok")
                return out

        try:
            served = await failover(route.order, call=call, circuits=self.view.circuits, timeout_s=self.cfg.first_output_timeout_s,
                                    more=route.more, skipped=route.skipped)
        except ModelRefused as e:
            logged(None, "refused", list(route.skipped))
            return reply(request, ApiError(e.status, e.message, code=e.code or "invalid_request_error", param=e.param), headers)
        except Exhausted as e:
            logged(None, "unavailable", e.skipped)
            return self._unavailable(request, route, e.skipped)
        headers[HEADER + "model"] = served.model
        if served.skipped:
            headers[HEADER + "fallback"] = fallback_header(served.skipped)
            self._count_fallbacks(served.skipped)
        self._count(served.model, route, "ok")
        self.view.metrics["latency"].observe((time.perf_counter() - t0) * 1e3, tags={"route": route.kind})
        self.view.spent(request.state.key, served.model)
        span.set_attributes(clean({"model": served.model, "fallback": fallback_header(served.skipped) or None}))
        if self.shadow is not None and route.plan is not None and self.shadow.sampled():
            self.shadow.submit(text=text, task=r.task, live=route.plan, snap=self.view.snap, candidates=route.candidates,
                               request_id=request_id, served_model=served.model)
        logged(served.model, "ok", served.skipped, None if body.stream else getattr(served.first, "usage", None))
        if not body.stream:
            payload = served.first.model_dump_json()
            if expl is not None:
                payload = json.dumps({**json.loads(payload), "routing_explanation": expl})
            return Response(payload, media_type="application/json", headers=headers)

        def broken(reason: str) -> None:  # from here on the answer cannot move to another model
            self.view.circuits.trip(served.model, reason)
            self._count(served.model, route, "stream_broken")

        stream = relay(served.first, served.rest, stall_s=self.cfg.first_output_timeout_s, cancel=served.rest.cancel, on_broken=broken)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    def _unavailable(self, request: Request, route: Route, skipped: list[tuple[str, str]]) -> Response:
        self._count_fallbacks(skipped)
        self._count(route.order[0], route, "unavailable")
        route.headers[HEADER + "fallback"] = fallback_header(skipped)
        why = ", ".join(f"{m} ({why})" for m, why in skipped)
        return reply(request, ApiError(503, f"no pool model could answer: {why}", code="model_unavailable", type_="server_error",
                                       headers={"Retry-After": self.view.retry_after}), route.headers)

    def _count(self, model: str, route: Route, status: str) -> None:
        self.view.metrics["answers"].inc(tags={"model": model, "route": route.kind, "status": status})

    def _count_fallbacks(self, skipped: list[tuple[str, str]]) -> None:
        for m, why in skipped:
            self.view.metrics["fallbacks"].inc(tags={"from_model": m, "reason": why})
