"""The registry deployment: the pool (models, profiles, costs, deployments) and its version.

One replica holds the truth; the ingress and the router replicas read it as a typed
:class:`PoolSnapshot`. Onboarded profiles survive a restart of the replica only with
``persist`` (written to the router directory's profiles.parquet). Its calls never raise
for bad input: they return a :class:`Refusal` (status, code, message, param), which the
ingress answers as it is, so no exception type has to survive a trip through Ray.

A registration with ``serving`` deploys the model as its own Serve app; without a profile the
model is then profiled on the router's anchors through that app (``serving/onboarding.py``):

    deploying -> profiling (graded/K) -> ready          or failed, with the reason

Only ``ready`` models with a profile are routable (or served by name). Every model the registry
deploys is recorded in the onboarding directory before its deployment starts; a restarted
registry reads the records back, adopts the apps still running, and profiles only the anchors
without an outcome (outcomes are append-only).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError
from ray import serve

from icl_router.config import AuthConfig, OnboardingConfig, PoolModelConfig
from icl_router.routing.decision import DecisionParams
from icl_router.serving.api_errors import validation_error
from icl_router.serving.endpoint import deployment_name, pool_deployment_name
from icl_router.serving.engine_calls import ask_chat
from icl_router.serving.limits import SpendTotals
from icl_router.serving.protocol import ROUTED

log = logging.getLogger("ray.serve")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name: a path that is not local is taken as a hub id

State = Literal["deploying", "profiling", "ready", "failed"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    state: State
    cost: float
    deployment: str
    app: str | None = None  # the Serve app the registry deployed it in; None: the serve config's pool (the main app)
    accuracy: float | None = None  # mean of its profile (its prior); None: no profile
    error: str | None = None  # why a deployment or its profiling failed
    graded: int | None = None  # profiling on the anchors: outcomes written so far (None: not profiled by the registry)
    resumed: int | None = None  # of those, outcomes found written when this profiling run started


@dataclass(frozen=True)
class PoolSnapshot:
    epoch: str  # changes when the registry replica restarts (its version starts over)
    version: int
    anchors: tuple[str, ...]
    models: dict[str, ModelEntry]
    profiles: dict[str, tuple[bool, ...]]  # the routable models (ready, with a profile), registration order
    decision: DecisionParams | None = None  # the router directory's decision layer
    serving: bool = False  # an ingress replica has started (router and a model answered) since this registry came up

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
    graded: int | None = None
    resumed: int | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class Registry:
    def __init__(
        self, router_dir: str, *, costs: dict[str, float], persist: bool = False, deploy_timeout_s: float = 900.0,
        onboarding: dict | None = None, deployments: dict[str, str] | None = None, limits: dict | None = None,
    ) -> None:
        from icl_router.model.router_dir import (
            PROFILES_FILE,
            RouterDirError,
            read_anchor_queries,
            read_meta,
            read_profiles,
        )
        from icl_router.serving.onboarding import OnboardingStore, ungradable

        self.router_dir, self.persist, self.deploy_timeout_s = Path(router_dir), persist, deploy_timeout_s
        meta = read_meta(router_dir)
        self.anchor_ids = list(meta.anchor_query_ids)
        self.decision = DecisionParams.from_json(meta.decision) if meta.decision is not None else None
        self.profiles: dict[str, np.ndarray] = read_profiles(self.router_dir / PROFILES_FILE, self.anchor_ids)  # model -> bool [K]
        deployments = deployments or {}
        self.models = {m: _Entry("ready", float(c), deployments.get(m, deployment_name(m))) for m, c in costs.items()}
        # the service's spend per key name (serving/limits.py): the ingress replicas send theirs each round
        self.spend = SpendTotals(AuthConfig.model_validate({**(limits or {}), "open": True}), time.monotonic)
        self.epoch, self.version = uuid.uuid4().hex[:12], 0
        from icl_router.routing import evidence_store

        self.evidence_generation, self._evidence_checked = evidence_store.generation(router_dir), 0.0
        self.serving = False
        self.lock = asyncio.Lock()
        unserved = sorted(set(self.profiles) - set(self.models))
        if unserved:
            log.info("router profiles without a pool deployment (not routable): %s", unserved)
        self.onboarding = OnboardingConfig.model_validate(onboarding or {})
        try:
            anchors = read_anchor_queries(self.router_dir)
            self.cannot_profile = ungradable(anchors)  # why models cannot be profiled here (None: they can)
        except RouterDirError as e:
            anchors, self.cannot_profile = None, str(e)
        self.store = OnboardingStore(self.onboarding.dir or self.router_dir / "onboarding", anchors)
        self._restore()

    def _restore(self) -> None:
        """Take back the models a previous replica deployed (its records): failed ones stay failed, the
        others resume (the app adopted if it still runs, the profile from the outcomes written)."""
        self._resuming: list[tuple[str, _Entry, PoolModelConfig, np.ndarray | None]] = []
        for rec in self.store.records():
            model_id = rec["model"]
            if model_id in self.models:  # the serve config's pool names it now: the config wins
                log.warning("registration record of %s ignored: the serve config's pool has the model", model_id)
                continue
            cfg = PoolModelConfig(name=model_id, **rec["serving"])
            entry = _Entry("deploying", float(rec["cost"]), pool_deployment_name(cfg), app=rec["app"])
            self.models[model_id] = entry
            if rec.get("error"):
                entry.state, entry.error = "failed", rec["error"]
                continue
            given = None if rec.get("profile") is None else np.array(rec["profile"], dtype=bool)
            if given is not None:
                self.profiles[model_id] = given
            self._resuming.append((model_id, entry, cfg, given))
        try:
            loop = asyncio.get_running_loop()  # Serve runs a replica's constructor on its event loop
        except RuntimeError:  # constructed outside an event loop (unit tests): resume() starts them
            return
        self._start_resuming(loop)

    def _start_resuming(self, loop: asyncio.AbstractEventLoop) -> None:
        for model_id, entry, cfg, given in self._resuming:
            log.info("resuming the onboarding of %s", model_id)
            entry.task = loop.create_task(self._onboard(model_id, entry, cfg, given, adopt=True))
        self._resuming = []

    async def resume(self) -> None:
        """Start resuming the recorded models (when the replica was built outside an event loop)."""
        self._start_resuming(asyncio.get_running_loop())

    def get_version(self) -> tuple[str, int]:
        """The pool's (epoch, version); a new generation of the router directory's evidence store
        (``icl-router reprofile``) moves the version, so every router replica reloads it on its next sync."""
        from icl_router.routing import evidence_store

        now = time.monotonic()
        if now - self._evidence_checked >= 1.0:
            self._evidence_checked = now
            gen = evidence_store.generation(self.router_dir)
            if gen != self.evidence_generation:
                self.evidence_generation = gen
                self.version += 1
                log.info("evidence store generation %s: pool version %d", gen or "(none)", self.version)
        return self.epoch, self.version

    def add_spend(self, deltas: dict[str, float]) -> dict[str, float]:
        """An ingress replica's spend since its last round (key name -> cost units); the service's totals back."""
        return self.spend.add(deltas)

    def mark_serving(self) -> None:
        """An ingress replica has started: replicas added from now on join a running service."""
        self.serving = True

    def snapshot(self) -> PoolSnapshot:
        entries = {
            m: ModelEntry(m, e.state, e.cost, e.deployment, e.app, float(self.profiles[m].mean()) if m in self.profiles else None, e.error,
                          e.graded, e.resumed)
            for m, e in self.models.items()
        }
        routable = {m: tuple(bool(x) for x in self.profiles[m]) for m, e in self.models.items() if e.state == "ready" and m in self.profiles}
        return PoolSnapshot(self.epoch, self.version, tuple(self.anchor_ids), entries, routable, self.decision, self.serving)

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
        if "path" not in serving and "endpoint" not in serving:
            return Refusal(400, "invalid_value", "serving.path: required: give path (a model to serve with vLLM) or endpoint "
                           "({base_url, model, api_key_env}: an OpenAI-compatible API)", "serving.path")
        try:
            cfg = PoolModelConfig(name=model_id, **serving)
        except ValidationError as e:
            err = validation_error(e, prefix="serving")
            return Refusal(400, "invalid_value", err.message, err.param)
        except (TypeError, ValueError) as e:
            return Refusal(400, "invalid_value", f"serving: {e}", "serving")
        from icl_router.pretrained import ModelPathError, check_model_path

        if cfg.path is None:  # an endpoint model: its block was checked as a config
            return cfg
        try:
            check_model_path(cfg.path, accelerator=cfg.accelerator, what="serving.path")
        except ModelPathError as e:
            return Refusal(400, "invalid_value", str(e), "serving.path")
        if not (Path(cfg.path).exists() or HUB_ID.match(cfg.path)):
            return Refusal(400, "invalid_value", f"serving.path: {cfg.path!r} is neither a local model directory nor a hub id (org/name)", "serving.path")
        return cfg

    async def _can_profile(self, model_id: str) -> Refusal | None:
        """None when a model can be profiled on the anchors here; else why not (nothing is deployed)."""
        reason = self.cannot_profile
        if reason is None:
            from icl_router.serving.onboarding import OnboardingError

            try:  # the onboarding dataset (the anchors' queries) is written once, before the first deployment
                await asyncio.to_thread(self.store.prepare)
            except (OnboardingError, OSError) as e:
                reason = str(e)
        if reason is None:
            return None
        return Refusal(400, "cannot_grade", f"model {model_id!r} cannot be profiled on the router's anchors: {reason}. "
                       "Register it with its 'profile' (its outcomes on the anchors) or a 'dataset' instead", "profile")

    async def register(
        self, model_id: str, profile: list[bool] | dict[str, bool] | None, *, dataset: str | None, cost: float | None,
        serving: dict | None, replace: bool,
    ) -> dict | Refusal:
        """Add a model's profile, given or read from a dataset's anchor outcomes (with ``serving``,
        deploy the model as its own Serve app first); with ``serving`` and neither, deploy the model
        and profile it on the anchors (``state: deploying``, then ``profiling``). Nothing changes unless it succeeds.

        Two steps: the request is checked on its own (``_validate``), then against the pool, under
        the lock, and the model moves to its next state (``_start_onboarding`` or ``_set_profile``)."""
        checked = await self._validate(model_id, profile, dataset=dataset, serving=serving)
        if isinstance(checked, Refusal):
            return checked
        cfg, prof = checked
        async with self.lock:
            if cfg is not None:
                entry = await self._start_onboarding(model_id, cfg, prof, cost=cost)
            else:
                entry = await self._set_profile(model_id, prof, cost=cost, replace=replace)
            if isinstance(entry, Refusal):
                return entry
            self.version += 1
            return {"model": model_id, "state": entry.state, "version": self.version, "accuracy": None if prof is None else float(prof.mean())}

    async def _validate(
        self, model_id: str, profile: list[bool] | dict[str, bool] | None, *, dataset: str | None, serving: dict | None,
    ) -> tuple[PoolModelConfig | None, np.ndarray | None] | Refusal:
        """The registration on its own: the name, what it gives (profile, dataset, serving), the serving
        config and the profile read; (serving config or None, profile or None)."""
        if model_id in ROUTED:
            return Refusal(400, "invalid_value", f"model: {model_id!r} is reserved for routed requests; name the model otherwise", "model")
        if profile is not None and dataset is not None:
            return Refusal(400, "invalid_value", "give one of 'profile' (outcomes on the anchors) or 'dataset' (a dataset directory with the model's anchor outcomes), not both", "profile")
        if profile is None and dataset is None and serving is None:
            return Refusal(400, "invalid_value", (
                f"model {model_id!r} has neither a profile nor a serving path: give 'profile' (its outcomes on the anchors) or 'dataset', "
                "or 'serving' (path, engine_kwargs, ...) to deploy it and profile it on the anchors"
            ), "serving")
        cfg = self._serving(model_id, serving) if serving is not None else None
        if isinstance(cfg, Refusal):
            return cfg
        if cfg is not None and cfg.path is not None and cfg.path.endswith(".gguf"):  # converted once, beside the onboarding outcomes
            from icl_router.pretrained import prepare_model_path

            root = self.store.root / "models"
            path = await asyncio.to_thread(prepare_model_path, cfg.path, accelerator=cfg.accelerator, what="serving.path", root=root)
            cfg = cfg.model_copy(update={"path": path})
        prof: np.ndarray | Refusal | None = None
        if dataset is not None:
            from icl_router.data.dataset import Dataset
            from icl_router.routing.register import anchor_profiles

            try:
                prof = await asyncio.to_thread(lambda: anchor_profiles(Dataset(dataset), [model_id], self.anchor_ids)[model_id])
            except Exception as e:  # not a dataset, no outcomes for the model, unreadable: the admin's input
                return Refusal(400, "invalid_value", f"dataset: {e}", "dataset")
        elif profile is not None:
            prof = self._profile(model_id, profile)
            if isinstance(prof, Refusal):
                return prof
        return cfg, prof

    async def _start_onboarding(self, model_id: str, cfg: PoolModelConfig, prof: np.ndarray | None, *, cost: float | None) -> _Entry | Refusal:
        """A model to deploy: checked against its current state, recorded, then deploying (profiled on
        the anchors afterwards unless ``prof`` is given). Under the lock."""
        entry = self.models.get(model_id)
        if entry is not None and entry.state in ("deploying", "profiling"):
            return Refusal(409, "deployment_in_progress", f"model {model_id!r} is being {entry.state.replace('ing', 'ed')}; "
                           f"DELETE /admin/models/{model_id} cancels it", "model")
        if entry is not None and not (entry.state == "failed" and entry.app):
            return Refusal(409, "model_exists", f"model {model_id!r} is already deployed; register its profile without 'serving'", "model")
        if prof is None:
            refused = await self._can_profile(model_id)
            if refused is not None:
                return refused
        entry = _Entry("deploying", cfg.cost if cost is None else float(cost), pool_deployment_name(cfg), app=f"pool-{model_id}")
        record = {"model": model_id, "serving": cfg.model_dump(mode="json", exclude={"name"}), "cost": entry.cost, "app": entry.app,
                  "profile": None if prof is None else [bool(x) for x in prof], "created": time.time()}
        try:  # recorded before anything is deployed: a restarted registry takes it from here
            await asyncio.to_thread(self.store.write_record, record)
        except OSError as e:
            return Refusal(409, "onboarding_dir_unwritable", f"the onboarding directory {self.store.root} is not writable ({e}); "
                           "set onboarding.dir in the serve config", "serving")
        if prof is None:
            self.profiles.pop(model_id, None)  # a failed earlier try's given profile does not stand in for the anchors
        else:
            self.profiles[model_id] = prof
        entry.task = asyncio.get_running_loop().create_task(self._onboard(model_id, entry, cfg, prof, adopt=False))
        self.models[model_id] = entry
        return entry

    async def _set_profile(self, model_id: str, prof: np.ndarray, *, cost: float | None, replace: bool) -> _Entry | Refusal:
        """A profile for a model already served: checked against its state, then set. Under the lock."""
        entry = self.models.get(model_id)
        if entry is None:
            return Refusal(404, "model_not_found", f"model {model_id!r} is not deployed; add 'serving' (path, engine_kwargs, ...) to deploy it, or list it in the serve config's pool", "model")
        if entry.state == "failed":
            return Refusal(409, "deployment_failed", f"model {model_id!r} failed ({entry.error}); register it again with 'serving' to retry, or DELETE it", "model")
        if entry.state in ("deploying", "profiling"):
            return Refusal(409, "deployment_in_progress", f"model {model_id!r} is being onboarded; wait for it to be ready, or DELETE it", "model")
        if model_id in self.profiles and not replace:
            return Refusal(409, "model_exists", f"model {model_id!r} is already registered; pass replace: true to update its profile", "model")
        if cost is not None:
            entry.cost = float(cost)
        self.profiles[model_id] = prof
        await self._persist()
        return entry

    async def _persist(self) -> None:
        if self.persist:
            from icl_router.model.router_dir import PROFILES_FILE, write_profiles

            await asyncio.to_thread(write_profiles, self.router_dir / PROFILES_FILE, dict(self.profiles), self.anchor_ids)

    async def _onboard(self, model_id: str, entry: _Entry, cfg: PoolModelConfig, given: np.ndarray | None, *, adopt: bool) -> None:
        """Deploy (or, after a restart, adopt), profile on the anchors unless a profile was given, then make it
        routable. A failure leaves the model failed with the reason, its app torn down, its record marked."""
        try:
            await self._deploy(model_id, entry, cfg, adopt=adopt)
            if given is None:
                entry.state = "profiling"
                self.version += 1
                prof = await self._profile_anchors(model_id, entry)
            async with self.lock:
                if self.models.get(model_id) is not entry:  # deleted meanwhile
                    return
                if given is None:
                    self.profiles[model_id] = prof
                entry.state = "ready"  # with its profile in the same step: never routable half-registered
                await self._persist()
                self.version += 1
            log.info("%s is ready (profile accuracy %.3f)", model_id, float(self.profiles[model_id].mean()))
        except asyncio.CancelledError:  # DELETE: it tears the app down
            raise
        except Exception as e:  # the service keeps serving the rest of the pool
            log.error("onboarding %s failed while %s: %s", model_id, entry.state, e)
            why = f"{entry.state}: {e}"[:1000]
            await self._teardown(entry.app)  # before it reads as failed: a retry may deploy the app again
            if self.models.get(model_id) is entry:
                await self._mark_failed(model_id, why)
                entry.state, entry.error = "failed", why
                self.version += 1
        finally:
            entry.task = None

    async def _mark_failed(self, model_id: str, why: str) -> None:
        recs = [r for r in await asyncio.to_thread(self.store.records) if r["model"] == model_id]
        if recs:
            try:
                await asyncio.to_thread(self.store.write_record, {**recs[0], "error": why})
            except OSError as e:
                log.warning("recording the failure of %s: %s", model_id, e)

    async def _app_status(self, app: str) -> tuple[str, str] | None:
        """(status, what Serve says about it) of an app, or None if Serve has no such app."""
        status = (await asyncio.to_thread(serve.status)).applications.get(app)
        if status is None:
            return None
        state = str(getattr(status.status, "value", status.status))
        # the replicas' own failure (e.g. vLLM refusing the model) is in the deployment's message
        said = [status.message, *(d.message for d in status.deployments.values())]
        return state, "; ".join([state, *(m.strip()[-400:] for m in said if m and m.strip())])

    async def _deploy(self, model_id: str, entry: _Entry, cfg: PoolModelConfig, *, adopt: bool) -> None:
        """Run the model's LLMServer as its own app (the main app is untouched) and wait until it runs; not
        RUNNING within ``deploy_timeout_s`` (or failed): raises with the reason. ``adopt``: an app that
        already exists (a previous registry replica deployed it) is waited for, not deployed again."""
        from icl_router.serving.endpoint import pool_model_app

        found = await self._app_status(entry.app) if adopt else None
        if found is None or found[0] in ("DEPLOY_FAILED", "UNHEALTHY"):
            app = pool_model_app(cfg)  # a vLLM replica, or an endpoint's forwarder
            # serve.run_many (public, DeveloperAPI) deploys without waiting for RUNNING; serve.run always
            # waits, and the wait could not be bounded or cancelled from here.
            target = serve.RunTarget(app, name=entry.app, route_prefix=None)
            await asyncio.to_thread(serve.run_many, [target], wait_for_applications_running=False)
        deadline, last = time.monotonic() + self.deploy_timeout_s, "not deployed yet"
        while True:
            found = await self._app_status(entry.app)
            if found is not None:
                state, last = found
                if state == "RUNNING":
                    return
                if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise RuntimeError(last)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not running after deploy_timeout_s={self.deploy_timeout_s:g} s (last status {last})")
            await asyncio.sleep(1.0)

    async def _profile_anchors(self, model_id: str, entry: _Entry) -> np.ndarray:
        """Ask the anchors without an outcome through the model's app, grade, append; the profile read back."""
        from icl_router.serving.onboarding import OnboardingError, run_anchors

        store, ob = self.store, self.onboarding
        done = await asyncio.to_thread(store.outcomes, model_id)
        entry.graded = entry.resumed = len(done)
        todo = [r for r in store.anchors.to_pylist() if r["query_id"] not in done]
        log.info("profiling %s on %d anchors (%d already graded)", model_id, len(todo), len(done))
        handle = serve.get_deployment_handle(entry.deployment, app_name=entry.app)

        def written(n: int) -> None:
            entry.graded += n

        await run_anchors(
            todo, ask=partial(ask_chat, handle, model_id=model_id, sampling=ob.sampling.model_dump()), model_id=model_id, cost=entry.cost,
            store=store, concurrency=ob.concurrency, shard_size=ob.shard_size, timeout_s=ob.request_timeout_s, retries=ob.retries,
            on_written=written, style=ob.prompt_style, max_tokens=ob.max_tokens,
        )
        prof = await asyncio.to_thread(store.profile, model_id)
        if prof is None:  # every anchor was answered: only a concurrent writer could leave one out
            raise OnboardingError(f"{store.root}: outcomes of {model_id!r} lack anchors after profiling")
        return prof

    async def _teardown(self, app: str) -> None:
        try:
            await asyncio.to_thread(serve.delete, app)
        except Exception as e:
            log.warning("tearing down %s: %s", app, e)

    # ---- unregistering --------------------------------------------------------------------

    async def delete(self, model_id: str) -> dict | Refusal:
        """Unregister a model: a deployment the registry made (ready, stuck deploying or profiling, failed) is
        torn down and its record removed (its outcomes stay: a new onboarding resumes from them); a model of
        the serve config's pool loses its profile and stays served by name."""
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
            await asyncio.to_thread(self.store.remove_record, model_id)
            await self._persist()
            self.version += 1
        await self._teardown(entry.app)
        return {"model": model_id, "deleted": "model", "torn_down": entry.app}

