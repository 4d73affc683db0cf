"""The /admin handler: the pool as the registry holds it, registering and unregistering models.

Every call needs an admin key. The registry answers bad input with a ``Refusal``, turned here into
the same 4xx it would have been; a registry that does not answer is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from icl_router.serving.api_errors import ApiError
from icl_router.serving.auth import Keys
from icl_router.serving.failover import ROUTER
from icl_router.serving.http_io import read_json
from icl_router.serving.pool_view import PoolView, awaited
from icl_router.serving.protocol import RegisterBody
from icl_router.serving.registry import PoolSnapshot, Refusal

log = logging.getLogger("ray.serve")


class AdminHandler:
    def __init__(self, view: PoolView, *, keys: Keys) -> None:
        self.view, self.cfg, self.keys = view, view.cfg, keys

    async def list_models(self, request: Request) -> dict:
        self._check(request)
        snap = await self._fresh()
        return {"object": "list", "version": snap.version, "k": snap.k, "anchors": list(snap.anchors),
                "router": self.view.circuits.state(ROUTER), "data": [self._row(snap, m) for m in snap.models]}

    async def get_model(self, request: Request, name: str) -> dict:
        self._check(request)
        snap = await self._fresh()
        if name not in snap.models:
            raise ApiError(404, f"model {name!r} is not in the pool; GET /admin/models lists it", code="model_not_found", param="name")
        return self._row(snap, name)

    async def register(self, request: Request) -> JSONResponse:
        self._check(request)
        body: RegisterBody = await read_json(request, RegisterBody, limit=self.cfg.max_body_bytes)
        out = await self._registry("register", body.model, body.profile, dataset=body.dataset, cost=body.cost, serving=body.serving,
                                   replace=body.replace)
        snap = await self._fresh()
        if body.model in snap.profiles:
            await self._warm(snap, body.model)
        return JSONResponse(out, status_code=201 if out["state"] == "ready" else 202)

    async def delete_model(self, request: Request, name: str) -> dict:
        self._check(request)
        out = await self._registry("delete", name)
        if out["deleted"] == "model":
            self.view.forget_handle(name)
        await self._fresh()
        return out

    # ---- steps ----------------------------------------------------------------------------------

    def _check(self, request: Request) -> None:
        self.keys.check(request.headers.get("authorization"), admin=True)

    def _unavailable(self) -> ApiError:
        return ApiError(503, "the pool registry is not answering (restarting?); retry", code="registry_unavailable", type_="server_error",
                        headers={"Retry-After": self.view.retry_after})

    async def _registry(self, method: str, *args: Any, **kw: Any) -> Any:
        try:
            out = await asyncio.wait_for(awaited(getattr(self.view.registry, method).remote(*args, **kw)), self.cfg.registry_timeout_s)
        except Exception as e:
            log.warning("registry.%s failed: %s: %s", method, type(e).__name__, str(e)[:200])
            raise self._unavailable() from None
        if isinstance(out, Refusal):
            raise ApiError(out.status, out.message, code=out.code, param=out.param)
        return out

    async def _fresh(self) -> PoolSnapshot:
        try:
            return await self.view.refresh()
        except Exception:
            raise self._unavailable() from None

    async def _warm(self, snap: PoolSnapshot, model: str) -> None:
        """Score once on the router replica this ingress talks to, so the next routed query pays no prefix forward."""
        if self.view.circuits.is_open(ROUTER):
            return
        try:
            await asyncio.wait_for(awaited(self.view.router.score.remote("warm up", (snap.epoch, snap.version))), self.cfg.probe_timeout_s)
        except Exception as e:
            log.warning("warming the router after registering %s: %s", model, e)

    def _row(self, snap: PoolSnapshot, name: str) -> dict:
        e = snap.models[name]
        progress = None if e.graded is None else {"graded": e.graded, "k": snap.k, "resumed": e.resumed}
        return {"id": name, "state": e.state, "cost": e.cost, "app": e.app, "deployment": e.deployment, "accuracy": e.accuracy,
                "routable": name in snap.profiles, "circuit": self.view.circuits.state(name), "error": e.error, "progress": progress}
