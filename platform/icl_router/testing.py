"""Helpers for tests and benchmarks that need real artefacts without a hub (no network here)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# Queries of different shapes and lengths for model / scorer tests.
SAMPLE_QUERIES = [
    "What is 2+2?",
    "Name the capital city of France.",
    "Write a python function that returns the sorted list of primes below n.",
    "Why does water boil at a lower temperature on a mountain?",
    "A triangle has sides 3, 4 and 5. What is its area?",
]


def full_forward_p(router, profiles, query_emb, queries):  # noqa: ANN001
    """p(Yes) [Q, T] from the naive per-pair prompts (the prefix recomputed for every pair):
    the reference the cached paths must equal."""
    import torch

    from icl_router.train.steps import collate_stage2

    Q, T = len(queries), len(profiles)
    batch = collate_stage2(
        router.layout,
        list(queries) * T,
        model_idx=[t for t in range(T) for _ in range(Q)],
        profiles=profiles,
        target=[0.0] * (T * Q),
        query_emb=None if query_emb is None else query_emb.repeat(T, 1),
    )
    with torch.no_grad():
        return torch.sigmoid(router.forward_pairs(batch.pairs)).view(T, Q).T


# Enough words, digits and JSON punctuation for a tokenizer that can spell the profile prompts.
DEFAULT_TEXTS = [
    "Answer the question. Reply with a JSON object with the keys reasoning and answer.",
    '{"reasoning": "First add the numbers, then divide.", "answer": "42"}',
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . : ; ' \"",
    "Which option is correct? A B C D. What is the sum of the three-digit numbers?",
]


def make_tiny_causal_lm(path: str | Path, *, seed: int = 0, texts: Iterable[str] = ()) -> Path:
    """Save a randomly initialised tiny Qwen2 (hidden 128, 4 heads of 32, 2 layers; vLLM CPU needs
    head size >= 32) with a byte-level BPE tokenizer trained on ``texts`` and a ChatML template."""
    import torch

    from icl_router.model.tiny import build_tiny_router_lm

    path = Path(path)
    lm, tokenizer = build_tiny_router_lm([*DEFAULT_TEXTS, *texts], vocab_size=3000, seed=seed)
    # With the usual init (std 0.02) and tied embeddings the residual stream is the input
    # embedding, so greedy decoding repeats the last prompt token ("\n") for every seed and
    # prompt. Std 0.1 makes answers differ between seeds and prompts, as two real models do.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A self-contained routing service for tests and benchmarks: a tiny router directory with random
# weights (the plumbing, not routing quality, is what it exercises) and two tiny vLLM pool models.
TINY_POOL = {"tiny-a": 0.01, "tiny-b": 0.001}  # name -> cost
TINY_TEXTS = ["What is the sum of 17 and 25?", "Write a Python function that reverses a list.", "Who wrote Hamlet?"]


def tiny_profile(k: int) -> np.ndarray:
    """The profile of tiny-a in a tiny router directory: a fixed draw, about half right."""
    import numpy as np

    return np.random.RandomState(0).rand(k) < 0.5


def tiny_anchors(k: int, *, golds: list[str] | None = None, grader: str | None = "exact_match") -> pa.Table:
    """The rows of a tiny router directory's anchors.parquet: ``anchor-<i>``, a short arithmetic question,
    ``golds`` (default: the right sums) graded by ``grader`` (None: ungradable anchors)."""
    import pyarrow as pa

    from icl_router import schemas

    golds = golds if golds is not None else [str(2 * i + 1) for i in range(k)]
    return pa.table({
        schemas.QUERY_ID: [f"anchor-{i}" for i in range(k)], schemas.POSITION: pa.array(range(k), pa.int32()),
        schemas.TEXT: [f"What is {i} plus {i + 1}?" for i in range(k)], schemas.TASK: ["arithmetic"] * k,
        schemas.GOLD: golds, schemas.GRADER: [grader] * k,
    }, schema=schemas.ROUTER_ANCHORS_SCHEMA)


def make_tiny_router_dir(
    path: str | Path, *, k: int = 8, decision: dict | None = None, texts: Iterable[str] = TINY_TEXTS, both: bool = False,
    anchors: pa.Table | None = None,
) -> Path:
    """A vector-query router directory (random weights, random anchor embeddings, anchor evidence) whose
    pool holds tiny-a's profile (``both``: tiny-b's too, half right); ``decision``: a DecisionParams.to_json();
    ``anchors``: its anchors.parquet (default ``tiny_anchors(k)``)."""
    import numpy as np
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir, write_anchor_queries
    from icl_router.model.tiny import build_tiny_router_lm

    lm, tok = build_tiny_router_lm(list(texts), seed=0)
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(k, 384), anchor_evidence=True)
    meta = RouterMeta(
        embedder="all-MiniLM-L6-v2", embedding_dim=384, query_input="vector", profile_layout="pairs",
        placeholder_id=layout.placeholder_id, yes_id=layout.yes_id, no_id=layout.no_id,
        anchor_query_ids=[f"anchor-{i}" for i in range(k)], anchor_evidence=True, decision=decision,
    )
    pool = {"tiny-a": tiny_profile(k), **({"tiny-b": np.arange(k) % 2 == 0} if both else {})}
    path = save_router_dir(router, Path(path), meta=meta, pool=pool)
    write_anchor_queries(path, anchors if anchors is not None else tiny_anchors(k))
    return path


def tiny_serve_config(root: str | Path, *, k: int = 8, decision: dict | None = None, both: bool = False, **fields: object) -> object:
    """A ServeConfig over a tiny router directory and the TINY_POOL models, all written under ``root``
    (``both``: both models routable from the start); ``fields``: more ServeConfig fields (port, auth, ...)."""
    from icl_router.config import AutoscalingConfig, PoolModelConfig, ScorerServeConfig, ServeConfig

    root = Path(root)
    pool = [
        PoolModelConfig(
            name=name, path=str(make_tiny_causal_lm(root / name, seed=i, texts=TINY_TEXTS)), cost=cost,
            engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8),
        )
        for i, (name, cost) in enumerate(TINY_POOL.items())
    ]
    router = fields.pop("router", None) or ScorerServeConfig(path=str(make_tiny_router_dir(root / "router", k=k, decision=decision, both=both)), num_cpus=1)
    return ServeConfig(router=router, pool=pool, **fields)


@contextmanager
def served_root(prefix: str, *, cache: bool = False, **ray_init: object) -> Iterator[Path]:
    """A temp root for a served app with a fresh local Ray under it (``ray_init``: ``ray.init``'s
    arguments) and TMPDIR inside it (vLLM's vllm_dist_* files; Ray's workers inherit it); ``cache``:
    ICL_ROUTER_CACHE there too (an embedder variant built once, the replicas reading it). The root
    is short (/tmp/<prefix>...): Ray's socket paths have a 107-byte limit. On exit Serve and Ray
    shut down, the environment is restored and the root removed."""
    import ray
    from ray import serve

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (root / "tmp").mkdir()
    env = {"TMPDIR": str(root / "tmp"), **({"ICL_ROUTER_CACHE": str(root / "cache")} if cache else {})}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(_temp_dir=str(root / "ray"), include_dashboard=False, **ray_init)
        yield root
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


# ---- autoscaling under load, read from Serve's own state (the serving tests) ------------------------

LIVE_REPLICA = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")  # every state but STOPPING/STOPPED
ONE_REPLICA = ("HEALTHY", {"RUNNING": 1})  # a deployment settled at one replica


def deployment_status(deployment: str, *, app: str = "icl-router") -> tuple[str, str, dict[str, int]]:
    """(status, status_trigger, replicas by state) of one deployment, from Serve's public status."""
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    name = lambda v: str(getattr(v, "value", v))  # noqa: E731 - Serve's enums are str enums
    return name(dep.status), name(dep.status_trigger), {name(k): n for k, n in dep.replica_states.items() if n}


def pool_diagnosis(root: str | Path, *, lines: int = 30) -> str:
    """What a served test's failure message needs to be read later: Serve's status of every deployment
    and the last ``lines`` of each pool replica's log under ``root`` (``served_root``'s Ray session)."""
    from ray import serve

    out = []
    try:
        for app_name, app in serve.status().applications.items():
            for name, dep in app.deployments.items():
                out.append(f"{app_name}/{name}: {dep.status} {dep.replica_states} {dep.message[:300]}")
    except Exception as e:  # Serve itself down: the logs below still say why
        out.append(f"serve.status(): {type(e).__name__}: {e}")
    for log in sorted(Path(root).glob("ray/session_latest/logs/serve/replica_*LLMServer*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(out)


def wait_for_one_replica(deployment: str, *, bound_s: float) -> tuple[tuple[str, dict[str, int]], float]:
    """((status, replicas by state), seconds waited): polls until ``deployment`` is settled at one
    replica, or ``bound_s`` pass."""
    import time

    t0 = time.monotonic()
    while (got := deployment_status(deployment)[::2]) != ONE_REPLICA and time.monotonic() - t0 < bound_s:
        time.sleep(1.0)
    return got, time.monotonic() - t0


@dataclass
class LoadRun:
    """What ``load_until_scaled`` saw: requests done, errors, (status, trigger) pairs, and when (s) the
    scale-up was decided and a second replica ran (None: never)."""

    done: int
    errors: list[str]
    seen: set[tuple[str, str]]
    decided: float | None
    running: float | None
    took: float

    def summary(self, deployment: str, concurrency: int) -> str:
        fmt = lambda t: "never" if t is None else f"at {t:.0f} s"  # noqa: E731
        return (f"load: {self.done} routed requests at concurrency {concurrency} in {self.took:.0f} s, {len(self.errors)} errors; "
                f"{deployment} scale-up decided {fmt(self.decided)}, second replica running {fmt(self.running)}; statuses seen {sorted(self.seen)}")


def load_until_scaled(send: Callable[[int], object], deployment: str, *, concurrency: int, max_s: float) -> LoadRun:
    """Call ``send(i)`` from ``concurrency`` threads until ``deployment`` runs a second replica, a call
    fails, or ``max_s`` pass (a bounded wait on Serve's state: no timing is asserted)."""
    import concurrent.futures as cf
    import itertools
    import threading
    import time

    done, errors, stop, n = [], [], threading.Event(), itertools.count()
    decided = running = None
    seen: set[tuple[str, str]] = set()

    def worker() -> None:
        while not stop.is_set() and not errors:
            try:
                send(next(n))
                done.append(1)
            except Exception as e:  # any failure ends the load and fails the caller's test
                errors.append(repr(e))

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = [ex.submit(worker) for _ in range(concurrency)]
        try:
            while time.monotonic() - t0 < max_s and not errors:
                status, trigger, states = deployment_status(deployment)
                seen.add((status, trigger))
                if decided is None and (status == "UPSCALING" or sum(states.get(s, 0) for s in LIVE_REPLICA) >= 2):
                    decided = time.monotonic() - t0
                if states.get("RUNNING", 0) >= 2:
                    running = time.monotonic() - t0
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            for f in futs:
                f.result()
    return LoadRun(len(done), errors, seen, decided, running, time.monotonic() - t0)


def free_port_base(start: int) -> int:
    """A port base from ``start`` (in steps of 1,000) whose derived ports (cluster/local's scripts:
    base .. base+18, base+100, base+400) are free now."""
    import socket

    for base in range(start, 60000, 1000):
        try:
            for port in [base + i for i in range(19)] + [base + 100, base + 400]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free port range from {start}")


@dataclass
class OpenAIServer:
    """A real OpenAI-compatible server on loopback (vLLM's own), started by ``openai_server``."""

    base_url: str  # .../v1
    model: str
    proc: object
    log: Path

    def wait_ready(self, ready_s: float = 300) -> None:
        """Wait, bounded, until GET /v1/models answers 200; raises with the log's tail if it exits or times out."""
        import time
        import urllib.request

        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OpenAI server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() - t0 > ready_s:
                raise TimeoutError(f"the OpenAI server did not answer within {ready_s:g} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after a bounded wait): a pool endpoint going down."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@contextmanager
def openai_server(model_dir: str | Path, *, root: str | Path, name: str = "tiny-endpoint", ready_s: float | None = 300) -> Iterator[OpenAIServer]:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) serving ``model_dir`` as
    ``name`` on a free loopback port, with the fast CPU settings (../shared/ENVIRONMENT.md); waits, bounded,
    for GET /v1/models (``ready_s``; None: the caller calls ``wait_ready`` once it has started something
    else meanwhile), and stops it on exit. Its output goes to ``root``/openai-server.log."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(root)
    log = root / "openai-server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TMPDIR": os.environ.get("TMPDIR", str(root))}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = OpenAIServer(f"http://127.0.0.1:{port}/v1", name, proc, log)
    try:
        if ready_s is not None:
            server.wait_ready(ready_s)
        yield server
    finally:
        server.stop()
