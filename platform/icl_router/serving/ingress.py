"""The OpenAI-compatible ingress: the FastAPI app and the Serve deployment that maps its routes
to the handlers, one per endpoint group.

    /v1/chat/completions, /v1/completions, /v1/models   v1.V1Handler
    /admin/models                                       admin_api.AdminHandler
    /health, /ready, /openapi.json                      health.HealthHandler
    /dashboard                                          dashboard (admin key): the status page

The handlers share the replica's view of the pool (``pool_view.PoolView``: the registry's
snapshot, the circuits, the pool models' handles). Every bad input is a 4xx with an
OpenAI-style error body (``http_io``); every response is counted by status and error code.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from icl_router.config import ServeConfig
from icl_router.serving.admin_api import AdminHandler
from icl_router.serving.auth import Keys
from icl_router.serving.health import HealthHandler
from icl_router.serving.http_io import install_error_handlers
from icl_router.serving.metrics import CountResponses
from icl_router.serving.openapi import body_spec, responses
from icl_router.serving.pool_view import PoolView
from icl_router.serving.protocol import (
    AdminModel,
    AdminModelList,
    ChatBody,
    Completion,
    CompletionBody,
    Deleted,
    FeedbackBody,
    FeedbackStored,
    Health,
    ModelCard,
    ModelList,
    Ready,
    RegisterBody,
    Registered,
)
from icl_router.serving.v1 import V1Handler

app = FastAPI(title="icl-router", version="1", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(CountResponses)
install_error_handlers(app)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    async def __init__(self, router: Any, registry: Any, pools: dict[str, Any], *, cfg: ServeConfig, local: dict | None = None,
                       shadow: dict | None = None) -> None:
        """``router``: the RouterDeployment's handle, or None with ``local``: InProcessRouter's
        arguments (``router.placement: ingress``), the router in this replica, called without a hop.
        ``shadow``: ``shadow.Shadow``'s arguments beside the config (the ShadowRouter's handle or None, its
        decision layer, the shadow pool's profiles and costs)."""
        if router is None:
            from icl_router.serving.router_deployment import InProcessRouter

            router = await InProcessRouter.create(registry=registry, **(local or {}))
        from icl_router.serving.tracing import Tracing

        keys = Keys.from_config(cfg.auth)
        self.keys = keys
        self.view = PoolView(cfg, router=router, registry=registry, handles=pools)
        self.tracing = Tracing.from_config(cfg.tracing)
        self.shadow = None
        if cfg.shadow is not None and shadow is not None:
            from icl_router.serving.shadow import Shadow

            self.shadow = Shadow(cfg.shadow, live_policy=cfg.policy.build(), router_timeout_s=cfg.router_timeout_s, metrics=self.view.metrics, **shadow)
        self.v1 = V1Handler(self.view, keys=keys, tracing=self.tracing, shadow=self.shadow)
        self.admin, self.probes = AdminHandler(self.view, keys=keys), HealthHandler(self.view, keys=keys)
        await self.view.start()

    def __del__(self) -> None:
        """Serve's graceful shutdown: the decision-log rows still buffered are written (a write never raises)."""
        view = getattr(self, "view", None)
        for lg in getattr(getattr(view, "traffic", None), "logs", {}).values():
            lg.flush()

    # ---- /v1 ------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=body_spec(ChatBody), responses=responses(400, 401, 404, 413, 415, 503, ok=Completion, stream=True))
    async def chat(self, request: Request) -> Response:
        return await self.v1.chat(request)

    @app.post("/v1/completions", response_model=None, openapi_extra=body_spec(CompletionBody), responses=responses(400, 401, 404, 413, 415, 503, ok=Completion, stream=True))
    async def completions(self, request: Request) -> Response:
        return await self.v1.completions(request)

    @app.post("/v1/feedback", response_model=None, openapi_extra=body_spec(FeedbackBody), responses=responses(400, 401, 404, 409, 410, 413, 415, ok=FeedbackStored))
    async def feedback(self, request: Request) -> dict:
        return await self.v1.feedback(request)

    @app.get("/v1/models", response_model=None, responses=responses(401, 503, ok=ModelList))
    async def models(self, request: Request) -> dict:
        return self.v1.models(request)

    @app.get("/v1/models/{model:path}", response_model=None, responses=responses(401, 404, 503, ok=ModelCard))
    async def get_v1_model(self, request: Request, model: str) -> dict:
        return self.v1.model(request, model)

    # ---- probes and the schema --------------------------------------------------------------------

    @app.get("/health", response_model=None, responses=responses(ok=Health))
    async def health(self) -> dict:
        """Live: the ingress answers (no key)."""
        return self.probes.health()

    @app.get("/ready", response_model=None, responses=responses(503, ok=Ready))
    async def ready(self, request: Request) -> Response:
        """Ready: the router answered once and a pool model answers now (no key)."""
        return self.probes.ready(request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        return self.probes.openapi(request)

    # ---- /admin -----------------------------------------------------------------------------------

    @app.get("/admin/models", response_model=None, responses=responses(401, 503, ok=AdminModelList))
    async def list_models(self, request: Request) -> dict:
        return await self.admin.list_models(request)

    @app.get("/admin/models/{name:path}", response_model=None, responses=responses(401, 404, 503, ok=AdminModel))
    async def get_model(self, request: Request, name: str) -> dict:
        return await self.admin.get_model(request, name)

    @app.post("/admin/models", response_model=None, status_code=201, openapi_extra=body_spec(RegisterBody),
              responses=responses(400, 401, 404, 409, 413, 415, 503, ok=Registered, ok_code=201, extra_ok={202: Registered}))
    async def register(self, request: Request) -> JSONResponse:
        return await self.admin.register(request)

    @app.delete("/admin/models/{name:path}", response_model=None, responses=responses(401, 404, 409, 503, ok=Deleted))
    async def delete_model(self, request: Request, name: str) -> dict:
        return await self.admin.delete_model(request, name)

    @app.get("/dashboard", response_model=None, include_in_schema=False)
    async def dashboard(self, request: Request) -> HTMLResponse:
        """The status page (admin key): the Grafana dashboard's panels from the same exported metrics."""
        import asyncio

        from icl_router.serving import dashboard

        self.keys.check(request.headers.get("authorization"), admin=True)
        text = await asyncio.to_thread(dashboard.scrape)
        return HTMLResponse(dashboard.render(dashboard.panel_values(dashboard.parse(text))))

    @app.post("/admin/shadow/flush", response_model=None, include_in_schema=False)
    async def shadow_flush(self, request: Request) -> dict:
        """Write this replica's buffered shadow rows now (admin key): ``{"written": n}``."""
        self.keys.check(request.headers.get("authorization"), admin=True)
        if self.shadow is None:
            from icl_router.serving.api_errors import ApiError

            raise ApiError(404, "no shadow router is configured (serve config: shadow)", code="not_found", param="shadow")
        return {"written": await self.shadow.drain(), "dir": str(self.shadow.log.dir)}
