"""The registry (the pool and its version), the router deployment, and pool models' LLMConfigs.

Router replicas score against the registry's pool. Every scoring call carries the
pool version its ingress knows; a replica behind that version refreshes from the
registry first (one prefix forward per new model), so a model registered through
any ingress is routable by the next query that ingress sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from icl_router.config import PoolModelConfig

log = logging.getLogger("ray.serve")

# vLLM on CPU (ENVIRONMENT.md): one OMP thread, no pinning, a 1 GiB KV cache instead of 92% of RAM.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
MAX_ROUTE_CHARS = 4000  # the router reads at most this much of a query (it was trained on short ones)


def llm_config(m: PoolModelConfig) -> Any:
    """The ray.serve.llm LLMConfig of one pool model (deployment ``LLMServer:<name>``)."""
    from ray.serve.llm import LLMConfig

    cpu = m.accelerator == "cpu"
    hw: dict[str, Any] = {"accelerator_config": {"kind": "cpu"}} if cpu else {}
    if m.accelerator_type:
        hw["accelerator_type"] = m.accelerator_type
    return LLMConfig(
        model_loading_config={"model_id": m.name, "model_source": m.path},
        engine_kwargs=dict(m.engine_kwargs),
        deployment_config={"autoscaling_config": m.autoscaling.model_dump(), "max_ongoing_requests": m.max_ongoing_requests},
        runtime_env={"env_vars": {**CPU_ENV, **m.env_vars} if cpu else dict(m.env_vars)},
        **hw,
    )


def deployment_name(model_id: str) -> str:
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class Registry:
    """The pool: which models are deployed, which are routable (have a profile), their costs.

    One replica holds the truth. Onboarded profiles survive its restart only with
    ``persist`` (written to the router directory's profiles.parquet).
    """

    def __init__(self, router_dir: str, *, models: dict[str, dict], persist: bool = False) -> None:
        from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles

        self.router_dir, self.persist = Path(router_dir), persist
        self.anchor_ids = read_meta(router_dir).anchor_query_ids
        self.profiles = read_profiles(self.router_dir / PROFILES_FILE, self.anchor_ids)  # model_id -> bool [K]
        # model_id -> {cost, app (None: this app), deployment, state: ready | deploying | failed}
        self.models = {m: {"app": None, "deployment": deployment_name(m), "state": "ready", **v} for m, v in models.items()}
        self.version = 0
        unserved = sorted(set(self.profiles) - set(self.models))
        if unserved:
            log.info("router profiles without a pool deployment (not routable): %s", unserved)

    def get_version(self) -> int:
        return self.version

    def snapshot(self) -> dict:
        routable = {m: self.profiles[m].tolist() for m, v in self.models.items() if m in self.profiles and v["state"] == "ready"}
        models = {m: {**v, "accuracy": float(self.profiles[m].mean()) if m in self.profiles else None} for m, v in self.models.items()}
        return {"version": self.version, "routable": routable, "models": models, "k": len(self.anchor_ids)}

    def _profile(self, model_id: str, profile: list[bool] | dict[str, bool]) -> np.ndarray:
        k = len(self.anchor_ids)
        if isinstance(profile, dict):
            missing = [q for q in self.anchor_ids if q not in profile]
            extra = [q for q in profile if q not in set(self.anchor_ids)]
            if missing or extra:
                raise ValueError(
                    f"profile of {model_id!r}: {len(missing)} anchors missing (e.g. {missing[:3]}), "
                    f"{len(extra)} unknown ids (e.g. {extra[:3]}); give one outcome per anchor id of GET /admin/models 'anchors'"
                )
            return np.array([bool(profile[q]) for q in self.anchor_ids])
        if len(profile) != k:
            raise ValueError(f"profile of {model_id!r} has {len(profile)} outcomes; the router has K={k} anchors (in GET /admin/models 'anchors' order)")
        return np.array(profile, dtype=bool)

    def anchors(self) -> list[str]:
        return list(self.anchor_ids)

    async def register(
        self, model_id: str, profile: list[bool] | dict[str, bool] | None, *, dataset: str | None, cost: float | None, serving: dict | None, replace: bool
    ) -> dict:
        """Add a model's profile, given or read from a dataset's anchor outcomes (and, with
        ``serving``, deploy the model as its own Serve app first).

        Raises ValueError (bad input), KeyError (not deployed), FileExistsError (registered, no replace).
        """
        if (profile is None) == (dataset is None):
            raise ValueError("give exactly one of 'profile' (outcomes on the anchors) or 'dataset' (a dataset directory with the model's anchor outcomes)")
        if dataset is not None:
            from icl_router.data.dataset import Dataset
            from icl_router.routing.register import anchor_profiles

            prof = await asyncio.to_thread(lambda: anchor_profiles(Dataset(dataset), [model_id], self.anchor_ids)[model_id])
        else:
            prof = self._profile(model_id, profile)
        if model_id in self.profiles and model_id in self.models and not replace:
            raise FileExistsError(f"model {model_id!r} is already registered; pass replace: true to update its profile")
        if serving is not None:
            if model_id in self.models:
                raise FileExistsError(f"model {model_id!r} is already deployed; register its profile without 'serving'")
            cfg = PoolModelConfig(name=model_id, **serving)  # pydantic errors are ValueErrors
            self.models[model_id] = {"app": f"pool-{model_id}", "deployment": deployment_name(model_id), "state": "deploying", "cost": cfg.cost}
            asyncio.get_running_loop().create_task(self._deploy(model_id, cfg))
        elif model_id not in self.models:
            raise KeyError(f"model {model_id!r} is not deployed; add 'serving' (path, engine_kwargs, ...) to deploy it, or list it in the serve config's pool")
        if cost is not None:
            self.models[model_id]["cost"] = cost
        self.profiles[model_id] = prof
        if self.persist:
            from icl_router.model.router_dir import PROFILES_FILE, write_profiles

            await asyncio.to_thread(write_profiles, self.router_dir / PROFILES_FILE, dict(self.profiles), self.anchor_ids)
        self.version += 1
        return {"model": model_id, "state": self.models[model_id]["state"], "version": self.version, "accuracy": float(prof.mean())}

    async def _deploy(self, model_id: str, cfg: PoolModelConfig) -> None:
        """Run the model's LLMServer as its own app (the main app is untouched), then mark it ready."""
        from ray.serve.llm import build_llm_deployment

        entry = self.models[model_id]
        try:
            app = build_llm_deployment(llm_config(cfg))
            await asyncio.to_thread(serve._run, app, _blocking=False, name=entry["app"], route_prefix=None)
            while True:
                status = (await asyncio.to_thread(serve.status)).applications.get(entry["app"])
                if status is not None and status.status == "RUNNING":
                    break
                if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise RuntimeError(status.message)
                await asyncio.sleep(1.0)
            entry["state"] = "ready"
        except Exception as e:  # the service keeps serving the rest of the pool
            log.error("deploying %s failed: %s", model_id, e)
            entry["state"], entry["error"] = "failed", str(e)[:500]
        self.version += 1


@serve.deployment
class Router:
    """Holds the router LM and the profile caches; batches concurrent queries into one embedding + scorer call.

    ``score`` returns the p's and where this replica spent the time (ms): ``queue`` (waiting for the
    batch to start), ``embed``, ``score`` (the router forward), ``batch`` (queries in it), ``cached``.
    """

    async def __init__(
        self, router_dir: str, *, registry: Any, embedder: str | None, max_batch_size: int, batch_wait_timeout_s: float,
        threads: int = 1, embed_cache: int = 4096, embed_dtype: str = "float32",
    ) -> None:
        import torch

        from icl_router.data.embed import load_embedder
        from icl_router.model.router_dir import load_router_dir
        from icl_router.routing.scorer import Scorer
        from icl_router.serving.metrics import router_metrics

        # The replica's share of the cores: more intra-op threads than that spin against vLLM's
        # engine and the other replicas (2 threads on the 2 loaded cores made a MiniLM query 30x slower).
        torch.set_num_threads(max(1, threads))
        loaded = load_router_dir(router_dir)
        self.scorer = Scorer(loaded.router)
        self.embedder = load_embedder(embedder or loaded.meta.embedder) if loaded.meta.query_input == "vector" else None
        self.fast_embed = False
        if self.embedder is not None:  # the direct forward must give what encode gives (what the anchors were embedded with)
            warm = ["warm up the embedder and the router"]
            ref = self.embedder.encode(warm, normalize_embeddings=True, convert_to_numpy=True)
            diff = float(np.abs(self._embed_forward(warm) - ref).max())
            self.fast_embed = diff < 1e-5
            if self.fast_embed and embed_dtype != "float32":
                self.embedder.to(getattr(torch, embed_dtype))  # bfloat16: half the weight traffic; cosine to float32 >= 0.9999 on MiniLM
            log.info("router replica: %d thread(s); embedder direct forward vs encode max diff %.1e: %s", torch.get_num_threads(), diff,
                     f"direct forward, {embed_dtype}" if self.fast_embed else "using encode, float32")
        self.embed_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # exact query text -> embedding (LRU)
        self.embed_cache_size = embed_cache
        self.registry, self.version, self.lock = registry, -1, asyncio.Lock()
        self.profiles: dict[str, list[bool]] = {}  # what the scorer holds
        self.metrics = router_metrics()
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        await self._sync(0)
        self._score_now([("warm up the embedder and the router", time.perf_counter())])

    async def _sync(self, version: int) -> None:
        async with self.lock:
            if version <= self.version:
                return
            snap = await self.registry.snapshot.remote()
            for m, prof in snap["routable"].items():
                if self.profiles.get(m) != prof:
                    await asyncio.to_thread(self.scorer.add, m, np.array(prof, dtype=bool))  # one prefix forward
                    self.profiles[m] = prof
            self.version = snap["version"]

    async def score(self, text: str, version: int) -> dict:
        """{"p": p(correct) of every routable model, "ms": stage times} for one query (batched with concurrent calls)."""
        if version > self.version:
            await self._sync(version)
        return await self._batch((text[:MAX_ROUTE_CHARS], time.perf_counter()))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batch(self, items: list[tuple[str, float]]) -> list[dict]:
        # On this loop, not in a thread: queries arriving meanwhile wait for the next batch either
        # way, and the two thread hops cost ~1 ms a query on loaded cores. (Serve runs this loop in
        # its own thread: the replica's control calls are not blocked.)
        return self._score_now(items)

    def _embed_forward(self, texts: list[str]) -> np.ndarray:
        """The embedder's modules on one padded batch, without encode's per-call bookkeeping (~1 ms a query)."""
        import torch

        e = self.embedder
        prompt = e.prompts.get(e.default_prompt_name) if e.default_prompt_name else None
        with torch.inference_mode():
            v = e(e.preprocess(texts, prompt=prompt))["sentence_embedding"].float()
            return torch.nn.functional.normalize(v, dim=-1).numpy()

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """[Q, E] query embeddings, each text embedded once per batch and reused from the LRU cache."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.embed_cache))
        if missing:
            enc = self._embed_forward(missing) if self.fast_embed else self.embedder.encode(missing, normalize_embeddings=True, convert_to_numpy=True)
            for t, v in zip(missing, enc):
                self.embed_cache[t] = v
        out = np.stack([self.embed_cache[t] for t in texts])
        for t in texts:
            self.embed_cache.move_to_end(t)
        while len(self.embed_cache) > self.embed_cache_size:
            self.embed_cache.popitem(last=False)
        return out, len(texts) - len(missing)

    def _score_now(self, items: list[tuple[str, float]]) -> list[dict]:
        t0 = time.perf_counter()
        texts = [t for t, _ in items]
        models = self.scorer.models
        if not models:
            return [{"p": {}, "ms": {}} for _ in texts]
        emb, cached = self._embed(texts) if self.embedder else (None, 0)  # [Q, E]
        t1 = time.perf_counter()
        p = self.scorer.score(texts, query_emb=emb, models=models)  # [Q, T]
        t2 = time.perf_counter()
        self.metrics["scoring_ms"].observe((t2 - t0) * 1e3)
        self.metrics["batch_size"].observe(len(texts))
        ms = {"embed": round((t1 - t0) * 1e3, 2), "score": round((t2 - t1) * 1e3, 2), "batch": len(texts), "cached": cached}
        return [{"p": dict(zip(models, row.tolist())), "ms": {"queue": round((t0 - tq) * 1e3, 2), **ms}} for row, (_, tq) in zip(p, items)]
