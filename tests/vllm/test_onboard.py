"""One-call onboarding end to end: Ray Serve + ray.serve.llm (real vLLM on CPU), the real graders.

One app serves the module: a tiny router directory (random weights; K anchors with gold answers and
a grader) and one tiny vLLM pool model, tiny-a. A new tiny model, tiny-new, is onboarded by a single
POST: deployed, profiled on the anchors through its own replica, graded, registered. Then the same
weights are onboarded again from the CLI as tiny-new2, and the registry's replica is killed while
it profiles: the restarted registry resumes from the outcomes written and ends with the same profile.

The anchors' golds make the profile mixed: on even anchors the gold is tiny-new's own greedy answer
(computed here with transformers, whose greedy tokens vLLM reproduces), on odd ones an answer it never
gives. The tests run in file order (the restart test compares with the first onboarding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from icl_router import schemas as S
from icl_router.serving.admin_client import http_json

pytestmark = pytest.mark.vllm

ADMIN_KEY = "sk-onboard-admin"
K = 24  # anchors: profiled one at a time, so a kill lands between two of them
MAX_TOKENS = 24  # per anchor answer
WRONG = "§ never said §"  # the gold of odd anchors: not an answer tiny-new gives
FIRST: dict[str, tuple[str, bool]] = {}  # anchor -> (response, correct) of the uninterrupted onboarding


@dataclass
class Service:
    base: str
    root: Path
    config: Path  # the serve config as YAML (for the CLI)
    serving: dict  # the new model's serving block
    golds: list[str]

    @property
    def outcomes(self) -> Path:
        return self.root / "onboarding" / S.OUTCOMES_DIR


def _hf_answers(path: Path, texts: list[str]) -> list[str]:
    """tiny-new's greedy answers to the anchors' prompts (as data/profile.py builds them), from transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icl_router.data.profile import build_prompt

    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": build_prompt("exact_match", t)}], add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            gen = lm.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def service():
    import yaml

    from icl_router.config import (
        AuthConfig,
        AutoscalingConfig,
        OnboardingConfig,
        PoolModelConfig,
        RayConfig,
        SamplingConfig,
        ScorerServeConfig,
        ServeConfig,
    )
    from icl_router.serving.admin_client import serving_block
    from icl_router.serving.app import free_port, start
    from icl_router.testing import TINY_TEXTS, make_tiny_causal_lm, make_tiny_router_dir, served_root, tiny_anchors

    with served_root("onb-", num_cpus=8) as root:
        new = make_tiny_causal_lm(root / "tiny-new", seed=5, texts=TINY_TEXTS)
        texts = tiny_anchors(K).column(S.TEXT).to_pylist()
        answers = _hf_answers(new, texts)
        golds = [a if i % 2 == 0 else WRONG for i, a in enumerate(answers)]
        router = make_tiny_router_dir(root / "router", k=K, anchors=tiny_anchors(K, golds=golds, grader="exact_match"))
        pool = [PoolModelConfig(
            name="tiny-a", path=str(make_tiny_causal_lm(root / "tiny-a", seed=0, texts=TINY_TEXTS)), cost=0.01,
            engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8),
        )]
        cfg = ServeConfig(
            router=ScorerServeConfig(path=str(router), num_cpus=1), pool=pool, auth=AuthConfig(admin_keys=[ADMIN_KEY], open=True), port=free_port(),
            deploy_timeout_s=600, persist_profiles=True, ray=RayConfig(num_cpus=8),
            # one anchor at a time, each its own file: a restart lands mid-profiling, and every answer comes from
            # a batch of one (the same tokens in both onboardings)
            onboarding=OnboardingConfig(dir=str(root / "onboarding"), sampling=SamplingConfig(max_tokens=MAX_TOKENS), concurrency=1, shard_size=1),
        )
        config = root / "serve.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        t0 = time.monotonic()
        url = start(cfg)
        base = url.removesuffix("/v1")
        while time.monotonic() - t0 < 900 and http_json(base + "/ready")[0] != 200:  # a bounded wait for readiness
            time.sleep(1)
        print(f"service ready in {time.monotonic() - t0:.0f} s")
        yield Service(base, root, config, serving_block(cfg, like="tiny-a", serving=None, path=str(new)), golds)


def _admin(service: Service, name: str = "") -> str:
    return service.base + "/admin/models" + (f"/{name}" if name else "")


def _chat(service: Service, model: str = "icl-router", **routing) -> tuple[int, dict, dict]:
    """(status, x-icl-router-p as a dict, body) of one chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 2,
            **({"routing": routing} if routing else {})}
    req = urllib.request.Request(service.base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    p = {k.lower(): v for k, v in headers.items()}.get("x-icl-router-p", "")
    return status, {m: float(v) for m, v in (kv.split("=") for kv in p.split(",") if kv)}, json.loads(raw)


def _outcomes(service: Service, model: str) -> list[dict]:
    from icl_router.data.dataset import Dataset

    return Dataset(service.root / "onboarding").read_outcomes([model]).to_pylist()


def _files(service: Service, model: str) -> dict[Path, int]:
    folder = service.outcomes / f"{S.MODEL_ID}={model}"
    return {p: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")} if folder.is_dir() else {}


def _apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def _check_graded(service: Service, rows: list[dict]) -> dict[str, tuple[str, bool]]:
    """Every anchor once, each graded by the project's grader; returns anchor -> (response, correct)."""
    from icl_router.graders import grade

    anchors = [f"anchor-{i}" for i in range(K)]
    assert sorted(r[S.QUERY_ID] for r in rows) == sorted(anchors)
    gold = dict(zip(anchors, service.golds))
    for r in rows:  # the verdict is a float: compared as a value
        assert r[S.SCORE] == pytest.approx(grade("exact_match", r[S.RESPONSE], gold[r[S.QUERY_ID]]), abs=1e-12)
        assert r[S.CORRECT] == (r[S.SCORE] >= S.CORRECT_THRESHOLD) and r[S.COMPLETION_TOKENS] > 0
    return {r[S.QUERY_ID]: (r[S.RESPONSE], r[S.CORRECT]) for r in rows}


def _registered_profile(service: Service, model: str) -> list[bool]:
    """The model's profile as the registry persisted it (profiles.parquet), in anchor order."""
    from icl_router.model.router_dir import PROFILES_FILE, read_profiles

    return read_profiles(service.root / "router" / PROFILES_FILE, [f"anchor-{i}" for i in range(K)])[model].tolist()


@pytest.mark.timeout(300)
def test_bad_registrations_get_a_clear_4xx_and_change_nothing(service):
    apps, rows = _apps(), http_json(_admin(service), key=ADMIN_KEY)[1]["data"]
    cases = [
        ({"model": "tiny-new"}, "serving", "neither a profile nor a serving path"),  # no serving path, no profile
        ({"model": "tiny-new", "serving": service.serving, "profile": [True] * (K - 1)}, "profile", f"K={K}"),  # wrong length
        ({"model": "tiny-new", "serving": {**service.serving, "path": str(service.root / "nowhere")}}, "serving.path", "no such file or directory"),
    ]
    for body, param, text in cases:
        status, out = http_json(_admin(service), method="POST", body=body, key=ADMIN_KEY)
        assert status == 400 and out["error"]["param"] == param and text in out["error"]["message"], out
    assert _apps() == apps and http_json(_admin(service), key=ADMIN_KEY)[1]["data"] == rows
    assert not service.outcomes.exists() and not (service.root / "onboarding" / "registrations").exists()


def _follow(service: Service, model: str, bound_s: float) -> tuple[list[str], dict, dict[str, float]]:
    """Poll GET /admin/models/{model} until ready or failed (a bounded wait): the states seen in order, the
    last row, and when each state was first seen (seconds from now). While not ready the model is neither
    routed to nor served by name (checked once per state)."""
    t0, states, seen_at, row = time.monotonic(), [], {}, {}
    while time.monotonic() - t0 < bound_s:
        row = http_json(_admin(service, model), key=ADMIN_KEY)[1]
        state = row.get("state")
        if state and (not states or states[-1] != state):
            states.append(state)
            seen_at[state] = time.monotonic() - t0
            if state in ("deploying", "profiling"):
                assert not row["routable"]
                status, p, _ = _chat(service)
                assert status == 200 and model not in p
                assert _chat(service, model=model)[0] == 404
        if state in ("ready", "failed"):
            break
        time.sleep(0.2)
    return states, row, seen_at


@pytest.mark.timeout(900)
def test_one_post_takes_a_new_model_from_nothing_to_routable(service):
    t0 = time.monotonic()
    status, out = http_json(_admin(service), method="POST", body={"model": "tiny-new", "serving": service.serving, "cost": 0.002}, key=ADMIN_KEY)
    assert status == 202 and out["state"] == "deploying" and out["accuracy"] is None, out
    states, row, seen_at = _follow(service, "tiny-new", 800)
    took = time.monotonic() - t0
    print(f"onboarding by POST: ready {took:.1f} s after the POST (deploying {seen_at.get('profiling', took):.1f} s, "
          f"profiling {K} anchors {took - seen_at.get('profiling', took):.1f} s); states {states}")
    assert states[-1] == "ready", row
    assert states[0] == "deploying" and [s for s in ("deploying", "profiling", "ready") if s in states] == states  # in this order
    assert row["routable"] and row["progress"] == {"graded": K, "k": K, "resumed": 0} and row["cost"] == pytest.approx(0.002)
    FIRST.update(_check_graded(service, _outcomes(service, "tiny-new")))
    correct = [FIRST[f"anchor-{i}"][1] for i in range(K)]
    assert _registered_profile(service, "tiny-new") == correct  # in anchor order
    assert row["accuracy"] == pytest.approx(sum(correct) / K, abs=1e-9)
    assert not any(correct[1::2]), "an anchor whose gold tiny-new never says was graded right"
    assert any(correct[0::2]), "tiny-new's own answers were graded wrong on every even anchor (does vLLM still give transformers' tokens?)"
    status, p, body = _chat(service)
    assert status == 200 and p.keys() == {"tiny-a", "tiny-new"}, body
    # the ingress routes to a model it has never seen answer only after its background probe (every
    # probe_interval_s) closes the model's circuit: a bounded wait for that, then a routed answer from it
    while http_json(_admin(service, "tiny-new"), key=ADMIN_KEY)[1].get("circuit") != "closed" and time.monotonic() - t0 < 850:
        time.sleep(0.2)
    status, _, body = _chat(service, models=["tiny-new"])
    assert status == 200 and body["model"] == "tiny-new", body
    print(f"onboarding by POST: first routed answer from tiny-new {time.monotonic() - t0:.1f} s after the POST")
    status, out = http_json(_admin(service, "tiny-new"), method="DELETE", key=ADMIN_KEY)  # frees its replica for the next test
    assert status == 200 and out["torn_down"] == "pool-tiny-new" and len(_outcomes(service, "tiny-new")) == K  # outcomes stay


def _replica_actors(deployment: str) -> list:
    import ray

    prefix = f"SERVE_REPLICA::icl-router#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get_actor(n, namespace="serve") for n in names]


@pytest.mark.timeout(900)
def test_cli_onboarding_resumes_after_a_registry_restart_with_the_same_profile(service):
    import ray

    assert FIRST, "needs the uninterrupted onboarding of the test before"
    cli = Path(sys.executable).with_name("icl-router")
    log = service.root / "onboard-cli.log"
    cmd = [str(cli), "onboard", "--config", str(service.config), "--model", "tiny-new2", "--like", "tiny-a",
           "--path", service.serving["path"], "--cost", "0.002", "--timeout", "800"]
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ICL_ROUTER_ADMIN_KEYS": ADMIN_KEY})
        try:
            while not _files(service, "tiny-new2") and proc.poll() is None and time.monotonic() - t0 < 800:  # bounded: the first outcome
                time.sleep(0.05)
            assert proc.poll() is None, f"the CLI ended before the registry could be killed:\n{log.read_text()[-3000:]}"
            killed = _replica_actors("Registry")
            for a in killed:
                ray.kill(a, no_restart=True)
            before = _files(service, "tiny-new2")  # written by the killed replica (a file is renamed into place whole)
            rc = proc.wait(timeout=800)
        finally:
            if proc.poll() is None:
                proc.kill()
    took = time.monotonic() - t0
    text = log.read_text()
    print(text[-2000:])
    print(f"onboarding by CLI with a registry restart: {took:.1f} s")
    assert len(killed) == 1 and rc == 0, text[-3000:]
    result = json.loads(text.strip().splitlines()[-1])
    assert result["state"] == "ready" and result["routable"] and "resumed from written outcomes" in text
    resumed = result["progress"]["resumed"]
    assert 0 < resumed < K and result["progress"]["graded"] == K, result  # the restart found some outcomes, not all
    assert len(before) <= resumed and {p: _files(service, "tiny-new2")[p] for p in before} == before  # never rewritten
    second = _check_graded(service, _outcomes(service, "tiny-new2"))  # each anchor exactly once
    assert second == FIRST  # the same answers, graded the same: the same profile
    assert _registered_profile(service, "tiny-new2") == [FIRST[f"anchor-{i}"][1] for i in range(K)]
    status, p, _ = _chat(service)
    assert status == 200 and p.keys() == {"tiny-a", "tiny-new2"}
