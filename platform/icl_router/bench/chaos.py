"""Chaos under load: routed traffic while a pool replica, then the router's replicas, then the registry's replica are killed.

Starts the service (``--config``, or ``--tiny``: the tiny router and pool of the tests, built in a
temp dir), waits for /ready, and keeps ``--concurrency`` clients sending routed chat requests on
loopback. Phases: ``normal`` (``--normal-s``), then each fault: the replica is killed, and the
phase lasts until the part is back (its circuit closed, or for the registry: the admin API
answering again) and at least ``--fault-s`` have passed, bounded by ``--recover-timeout-s``.
A request belongs to the phase in which it started.

Prints: requests and failed (all phases), and per phase p50_ms, p99_ms, max_ms, failed and
over_3x_normal_p99 (requests slower than three times the normal phase's p99); recovered_s per
fault (kill to back). Bounded: every wait has a bound, the clients stop at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the sum of 17 and 25?",
    "Write a Python function that reverses a list.",
    "Who wrote Hamlet?",
    "Which option is correct? A B C D.",
]
FAULTS = ("pool_replica", "router_replica", "registry_replica")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="serve/demo.yaml", help="serve config to start (ignored with --tiny)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny router and two tiny vLLM models, built in a temp dir")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--normal-s", type=float, default=30.0, help="length of the normal phase")
    p.add_argument("--fault-s", type=float, default=20.0, help="least length of each fault phase")
    p.add_argument("--recover-timeout-s", type=float, default=420.0, help="bound on each fault phase")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)
    p.add_argument("--max-tokens", type=int, default=4)


def _get(url: str, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def _kill(app: str, deployment: str) -> int:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    for n in names:
        ray.kill(ray.get_actor(n, namespace="serve"), no_restart=True)
    return len(names)


def run(args: argparse.Namespace) -> dict:
    import openai

    from icl_router.config import AuthConfig, RayConfig, ServeConfig, load_config
    from icl_router.serving.app import start, wait_ready

    root = None
    if args.tiny:
        from icl_router.testing import tiny_serve_config

        root = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
        cfg = tiny_serve_config(root, both=True, auth=AuthConfig(api_keys=["sk-chaos"], admin_keys=["sk-chaos-admin"]), port=0,
                                first_output_timeout_s=10, ray=RayConfig(num_cpus=8))
    else:
        cfg = load_config(ServeConfig, args.config, args.overrides)
    try:
        return _chaos(args, cfg, start, wait_ready, openai)
    finally:
        from ray import serve

        serve.shutdown()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def _chaos(args: argparse.Namespace, cfg, start, wait_ready, openai) -> dict:  # noqa: ANN001
    url = start(cfg)
    base = url.removesuffix("/v1")
    ready_s = wait_ready(url, app_name=cfg.app_name, timeout_s=args.ready_timeout_s)
    from icl_router.serving.auth import Keys

    keys = Keys.from_config(cfg.auth)  # the bare keys (a config entry may be name:key)
    key = next(iter(keys.api), "none")
    admin = next(iter(keys.admin), None)
    client = openai.OpenAI(base_url=url, api_key=key, timeout=120, max_retries=0)
    phase, stop = ["normal"], threading.Event()
    rows: list[tuple[str, float, bool, str]] = []  # (phase, ms, ok, model or error)
    lock = threading.Lock()

    def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            ph, i = phase[0], i + 1
            t0 = time.perf_counter()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="icl-router", messages=[{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({w}.{i})"}],
                    max_tokens=args.max_tokens,
                )
                raw.parse()
                row = (ph, (time.perf_counter() - t0) * 1e3, True, raw.headers.get("x-icl-router-model", ""))
            except openai.APIError as e:
                row = (ph, (time.perf_counter() - t0) * 1e3, False, f"{type(e).__name__}: {str(e)[:120]}")
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.concurrency)]
    for t in threads:
        t.start()
    recovered: dict[str, float | None] = {}
    try:
        time.sleep(args.normal_s)
        for fault in FAULTS:
            with lock:
                answered = [m for ph, _, ok, m in rows[-50:] if ok]
            recovered[fault] = _inject(fault, cfg.app_name, base, admin, answered=answered, phase=phase, args=args)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    return _summary(rows, recovered, concurrency=args.concurrency, ready_s=ready_s)


def _inject(fault: str, app_name: str, base: str, admin: str | None, *, answered: list[str], phase: list[str], args: argparse.Namespace) -> float | None:
    """Kill the replicas of ``fault`` (the pool model that answered most of late, the router, the registry), mark
    the traffic's ``phase`` and wait until it is back (seconds) or ``recover_timeout_s`` passes (None)."""
    victim = collections.Counter(answered).most_common(1)[0][0] if fault == "pool_replica" else None
    if fault == "pool_replica":
        killed, back = _kill(app_name, f"LLMServer:{victim}"), lambda v=victim: _get(f"{base}/admin/models/{v}", admin)[1].get("circuit") == "closed"
    elif fault == "router_replica":
        killed, back = _kill(app_name, "RouterDeployment"), lambda: _get(f"{base}/admin/models", admin)[1].get("router") == "closed"
    else:
        killed, back = _kill(app_name, "Registry"), lambda: _get(f"{base}/admin/models", admin)[0] == 200
    t_kill = time.monotonic()
    phase[0] = fault
    print(f"chaos: {fault}: killed {killed} replica(s){f' of {victim}' if victim else ''}", flush=True)
    got = None
    while time.monotonic() - t_kill < args.recover_timeout_s:
        if got is None and time.monotonic() - t_kill > 1.0 and back():
            got = time.monotonic() - t_kill
        if got is not None and time.monotonic() - t_kill >= args.fault_s:
            break
        time.sleep(0.5)
    recovered = None if got is None else round(got, 1)
    print(f"chaos: {fault}: back after {recovered} s", flush=True)
    return recovered


def _summary(rows: list[tuple[str, float, bool, str]], recovered: dict[str, float | None], *, concurrency: int, ready_s: float) -> dict:
    """Latency and failures per phase (normal, then each fault) of the (phase, ms, ok, model or error) rows."""
    by_phase: dict[str, list] = collections.defaultdict(list)
    for r in rows:
        by_phase[r[0]].append(r)
    normal_p99 = float(np.percentile([ms for _, ms, ok, _ in by_phase["normal"] if ok], 99)) if by_phase["normal"] else float("nan")

    def stats(ph: str) -> dict:
        ok = [ms for _, ms, good, _ in by_phase[ph] if good]
        failed = [m for *_, good, m in by_phase[ph] if not good]
        return {
            "requests": len(by_phase[ph]),
            "failed": len(failed),
            "p50_ms": round(float(np.median(ok)), 1) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
            "max_ms": round(float(max(ok)), 1) if ok else None,
            "over_3x_normal_p99": sum(ms > 3 * normal_p99 for ms in ok),
            "errors": sorted(set(failed))[:3],
        }

    phases = {ph: stats(ph) for ph in ("normal", *FAULTS)}
    return {
        "requests": len(rows),
        "failed": sum(not ok for _, _, ok, _ in rows),
        "p50_ms": {ph: s["p50_ms"] for ph, s in phases.items()},
        "p99_ms": {ph: s["p99_ms"] for ph, s in phases.items()},
        "max_ms": {ph: s["max_ms"] for ph, s in phases.items()},
        "recovered_s": recovered,
        "phases": phases,
        "concurrency": concurrency,
        "ready_s": round(ready_s, 1),
    }
