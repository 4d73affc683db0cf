"""The health handler: liveness and readiness probes (no key), and the OpenAPI document."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from icl_router.serving.auth import Keys
from icl_router.serving.failover import ROUTER
from icl_router.serving.openapi import service_schema
from icl_router.serving.pool_view import PoolView


class HealthHandler:
    def __init__(self, view: PoolView, *, keys: Keys) -> None:
        self.view, self.keys = view, keys
        self.schema: dict | None = None

    def health(self) -> dict:
        """Live: the ingress answers."""
        return {"status": "ok"}

    def ready(self, request: Request) -> Response:
        """Ready: the router answered once and a pool model answers now. A router that fails later
        does not make the service unready: requests then route by the priors."""
        view = self.view
        body = {"ready": view.ready(), "router": "down" if view.circuits.is_open(ROUTER) else "up",
                "models_up": sum(not view.circuits.is_open(m) for m in view.snap.ready)}
        if body["ready"]:
            return JSONResponse(body)
        request.state.error_code = "not_ready"
        return JSONResponse(body, status_code=503, headers={"Retry-After": view.retry_after})

    def openapi(self, request: Request) -> dict:
        """The service's OpenAPI document (an API or an admin key), built once."""
        self.keys.check(request.headers.get("authorization"), either=True)
        if self.schema is None:
            self.schema = service_schema(request.app.routes)
        return self.schema
