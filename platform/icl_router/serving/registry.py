"""The registry deployment: the pool (models, profiles, costs, deployments) and its version.

One replica holds the truth; the ingress and the router replicas read it as a typed
:class:`PoolSnapshot`. Onboarded profiles survive a restart of the replica only with
``persist`` (written to the router directory's profiles.parquet). Its calls never raise
for bad input: they return a :class:`Refusal` (status, code, message, param), which the
ingress answers as it is, so no exception type has to survive a trip through Ray.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError
from ray import serve

from icl_router.config import PoolModelConfig
from icl_router.routing.decision import DecisionParams
from icl_router.serving.deployments import deployment_name, llm_config
from icl_router.serving.protocol import ROUTED, validation_error

log = logging.getLogger("ray.serve")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name: a path that is not local is taken as a hub id

State = Literal["ready", "deploying", "failed"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    state: State
    cost: float
    deployment: str
    app: str | None = None  # the Serve app the registry deployed it in; None: the serve config's pool (the main app)
    accuracy: float | None = None  # mean of its profile (its prior); None: no profile
    error: str | None = None  # why a deployment failed


@dataclass(frozen=True)
class PoolSnapshot:
    epoch: str  # changes when the registry replica restarts (its version starts over)
    version: int
    anchors: tuple[str, ...]
    models: dict[str, ModelEntry]
    profiles: dict[str, tuple[bool, ...]]  # the routable models (ready, with a profile), registration order
    decision: DecisionParams | None = None  # the router directory's decision layer

    @property
    def k(self) -> int:
        return len(self.anchors)

    @property
    def routable(self) -> list[str]:
        return list(self.profiles)

    @property
    def ready(self) -> list[str]:
        return [m for m, e in self.models.items() if e.state == "ready"]

    def priors(self) -> dict[str, float]:
        return {m: float(self.models[m].accuracy) for m in self.profiles}

    def costs(self) -> dict[str, float]:
        return {m: e.cost for m, e in self.models.items()}


EMPTY = PoolSnapshot(epoch="", version=-1, anchors=(), models={}, profiles={})


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    param: str | None = None


@dataclass
class _Entry:
    state: State
    cost: float
    deployment: str
    app: str | None = None
    error: str | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class Registry:
    def __init__(self, router_dir: str, *, costs: dict[str, float], persist: bool = False, deploy_timeout_s: float = 900.0) -> None:
        from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles

        self.router_dir, self.persist, self.deploy_timeout_s = Path(router_dir), persist, deploy_timeout_s
        meta = read_meta(router_dir)
        self.anchor_ids = list(meta.anchor_query_ids)
        self.decision = DecisionParams.from_json(meta.decision) if meta.decision is not None else None
        self.profiles: dict[str, np.ndarray] = read_profiles(self.router_dir / PROFILES_FILE, self.anchor_ids)  # model -> bool [K]
        self.models = {m: _Entry("ready", float(c), deployment_name(m)) for m, c in costs.items()}
        self.epoch, self.version = uuid.uuid4().hex[:12], 0
        self.lock = asyncio.Lock()
        unserved = sorted(set(self.profiles) - set(self.models))
        if unserved:
            log.info("router profiles without a pool deployment (not routable): %s", unserved)

    def get_version(self) -> tuple[str, int]:
        return self.epoch, self.version

    def snapshot(self) -> PoolSnapshot:
        entries = {
            m: ModelEntry(m, e.state, e.cost, e.deployment, e.app, float(self.profiles[m].mean()) if m in self.profiles else None, e.error)
            for m, e in self.models.items()
        }
        routable = {m: tuple(bool(x) for x in self.profiles[m]) for m, e in self.models.items() if e.state == "ready" and m in self.profiles}
        return PoolSnapshot(self.epoch, self.version, tuple(self.anchor_ids), entries, routable, self.decision)

    # ---- registering ------------------------------------------------------------------

    def _profile(self, model_id: str, profile: list[bool] | dict[str, bool]) -> np.ndarray | Refusal:
        k = len(self.anchor_ids)
        if isinstance(profile, dict):
            missing = [q for q in self.anchor_ids if q not in profile]
            extra = [q for q in profile if q not in set(self.anchor_ids)]
            if missing or extra:
                return Refusal(400, "invalid_value", (
                    f"profile of {model_id!r}: {len(missing)} anchors missing (e.g. {missing[:3]}), "
                    f"{len(extra)} unknown ids (e.g. {extra[:3]}); give one outcome per anchor id of GET /admin/models 'anchors'"
                ), "profile")
            return np.array([bool(profile[q]) for q in self.anchor_ids])
        if len(profile) != k:
            return Refusal(400, "invalid_value", f"profile of {model_id!r} has {len(profile)} outcomes; the router has K={k} anchors (in GET /admin/models 'anchors' order)", "profile")
        return np.array(profile, dtype=bool)

    @staticmethod
    def _serving(model_id: str, serving: dict[str, Any]) -> PoolModelConfig | Refusal:
        """The ``serving`` block as a pool-model config, checked before anything is deployed."""
        if "name" in serving:
            return Refusal(400, "invalid_value", f"serving.name: the model is named by 'model' ({model_id!r}); remove serving.name", "serving.name")
        try:
            cfg = PoolModelConfig(name=model_id, **serving)
        except ValidationError as e:
            err = validation_error(e, prefix="serving")
            return Refusal(400, "invalid_value", err.message, err.param)
        except (TypeError, ValueError) as e:
            return Refusal(400, "invalid_value", f"serving: {e}", "serving")
        if not (Path(cfg.path).is_dir() or (HUB_ID.match(cfg.path) and not Path(cfg.path).exists())):
            return Refusal(400, "invalid_value", f"serving.path: {cfg.path!r} is neither a local model directory nor a hub id (org/name)", "serving.path")
        return cfg

    async def register(
        self, model_id: str, profile: list[bool] | dict[str, bool] | None, *, dataset: str | None, cost: float | None,
        serving: dict | None, replace: bool,
    ) -> dict | Refusal:
        """Add a model's profile, given or read from a dataset's anchor outcomes (with ``serving``,
        deploy the model as its own Serve app first). Nothing changes unless it succeeds."""
        if model_id in ROUTED:
            return Refusal(400, "invalid_value", f"model: {model_id!r} is reserved for routed requests; name the model otherwise", "model")
        if (profile is None) == (dataset is None):
            return Refusal(400, "invalid_value", "give exactly one of 'profile' (outcomes on the anchors) or 'dataset' (a dataset directory with the model's anchor outcomes)", "profile")
        cfg = self._serving(model_id, serving) if serving is not None else None
        if isinstance(cfg, Refusal):
            return cfg
        if dataset is not None:
            from icl_router.data.dataset import Dataset
            from icl_router.routing.register import anchor_profiles

            try:
                prof = await asyncio.to_thread(lambda: anchor_profiles(Dataset(dataset), [model_id], self.anchor_ids)[model_id])
            except Exception as e:  # not a dataset, no outcomes for the model, unreadable: the admin's input
                return Refusal(400, "invalid_value", f"dataset: {e}", "dataset")
        else:
            prof = self._profile(model_id, profile)
            if isinstance(prof, Refusal):
                return prof
        async with self.lock:
            entry = self.models.get(model_id)
            if cfg is not None:
                if entry is not None and entry.state == "deploying":
                    return Refusal(409, "deployment_in_progress", f"model {model_id!r} is being deployed; DELETE /admin/models/{model_id} cancels it", "model")
                if entry is not None and not (entry.state == "failed" and entry.app):
                    return Refusal(409, "model_exists", f"model {model_id!r} is already deployed; register its profile without 'serving'", "model")
                entry = _Entry("deploying", cfg.cost, deployment_name(model_id), app=f"pool-{model_id}")
                entry.task = asyncio.get_running_loop().create_task(self._deploy(model_id, entry, cfg))
                self.models[model_id] = entry
            elif entry is None:
                return Refusal(404, "model_not_found", f"model {model_id!r} is not deployed; add 'serving' (path, engine_kwargs, ...) to deploy it, or list it in the serve config's pool", "model")
            elif entry.state == "failed":
                return Refusal(409, "deployment_failed", f"model {model_id!r} failed to deploy ({entry.error}); register it again with 'serving' to retry, or DELETE it", "model")
            elif model_id in self.profiles and not replace:
                return Refusal(409, "model_exists", f"model {model_id!r} is already registered; pass replace: true to update its profile", "model")
            if cost is not None:
                entry.cost = float(cost)
            self.profiles[model_id] = prof
            await self._persist()
            self.version += 1
            return {"model": model_id, "state": entry.state, "version": self.version, "accuracy": float(prof.mean())}

    async def _persist(self) -> None:
        if self.persist:
            from icl_router.model.router_dir import PROFILES_FILE, write_profiles

            await asyncio.to_thread(write_profiles, self.router_dir / PROFILES_FILE, dict(self.profiles), self.anchor_ids)

    async def _deploy(self, model_id: str, entry: _Entry, cfg: PoolModelConfig) -> None:
        """Run the model's LLMServer as its own app (the main app is untouched), then mark it ready;
        not RUNNING within ``deploy_timeout_s`` (or failed): torn down and marked failed with the reason."""
        from ray.serve.llm import build_llm_deployment

        try:
            app = build_llm_deployment(llm_config(cfg))
            # serve.run_many (public, DeveloperAPI) deploys without waiting for RUNNING; serve.run always
            # waits, and the wait could not be bounded or cancelled from here.
            target = serve.RunTarget(app, name=entry.app, route_prefix=None)
            await asyncio.to_thread(serve.run_many, [target], wait_for_applications_running=False)
            deadline, last = time.monotonic() + self.deploy_timeout_s, "not deployed yet"
            while True:
                status = (await asyncio.to_thread(serve.status)).applications.get(entry.app)
                if status is not None:
                    state = str(getattr(status.status, "value", status.status))
                    # the replicas' own failure (e.g. vLLM refusing the model) is in the deployment's message
                    said = [status.message, *(d.message for d in status.deployments.values())]
                    last = "; ".join([state, *(m.strip()[-400:] for m in said if m and m.strip())])
                    if state == "RUNNING":
                        break
                    if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                        raise RuntimeError(last)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not running after deploy_timeout_s={self.deploy_timeout_s:g} s (last status {last})")
                await asyncio.sleep(1.0)
            entry.state = "ready"
        except asyncio.CancelledError:  # DELETE: it tears the app down
            raise
        except Exception as e:  # the service keeps serving the rest of the pool
            log.error("deploying %s failed: %s", model_id, e)
            await self._teardown(entry.app)  # before it reads as failed: a retry may deploy the app again
            entry.state, entry.error = "failed", str(e)[:1000]
        finally:
            entry.task = None
        self.version += 1

    async def _teardown(self, app: str) -> None:
        try:
            await asyncio.to_thread(serve.delete, app)
        except Exception as e:
            log.warning("tearing down %s: %s", app, e)

    # ---- unregistering --------------------------------------------------------------------

    async def delete(self, model_id: str) -> dict | Refusal:
        """Unregister a model: a deployment the registry made (ready, stuck deploying or failed) is
        torn down; a model of the serve config's pool loses its profile and stays served by name."""
        async with self.lock:
            entry = self.models.get(model_id)
            if entry is None:
                return Refusal(404, "model_not_found", f"model {model_id!r} is not in the pool", "name")
            if entry.app is None:
                if model_id not in self.profiles:
                    return Refusal(409, "model_in_config", f"model {model_id!r} is in the serve config's pool and has no profile; "
                                   "remove it from the config to stop serving it", "name")
                del self.profiles[model_id]
                await self._persist()
                self.version += 1
                return {"model": model_id, "deleted": "profile", "torn_down": None}
            if entry.task is not None:
                entry.task.cancel()
            del self.models[model_id]
            self.profiles.pop(model_id, None)
            await self._persist()
            self.version += 1
        await self._teardown(entry.app)
        return {"model": model_id, "deleted": "model", "torn_down": entry.app}

