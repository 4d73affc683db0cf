"""Production traffic feeds the profiles, end to end (issue 25): a served run of N routed requests writes N
decision-log rows, feedback names the right answers, and `icl-router reprofile` over the log changes the
served routing without a restart.

The app: a tiny router directory with both tiny models' profiles and a decision layer that keeps p as it
is (random anchor embeddings: a real query's evidence mass is about 0), two tiny vLLM models (random
weights: their text is noise, but greedy and deterministic). For a query the two models answer
differently, the reference sent as feedback is the answer of the model the router does *not* pick;
re-profiling the logged queries through the service grades that model right and the other wrong, the
outcomes join the router directory's evidence store, and the next routed request for that query goes to it.
The same run judges the logged queries without a reference with tiny-a as the judge (through the service, by
its name): a random-weight judge on two calibration answers never opens the gate, so its outcomes stay out.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.vllm

API_KEY, ADMIN_KEY = "sk-traffic-user", "sk-traffic-admin"
K = 8
TASK = "arithmetic"  # the tiny anchors' task: graded with exact_match (anchors.parquet)
TEXTS = ["What is the sum of 17 and 25?", "Who wrote Hamlet?", "Name a prime number.", "What colour is the sky?", "Spell the word cat."]


def _http(url: str, *, body: dict | None = None, key: str | None = API_KEY) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method="POST" if body is not None else "GET")
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, {}, {}
    try:
        out = json.loads(raw)
    except ValueError:
        out = {}
    return status, {k.lower(): v for k, v in headers.items()}, out if isinstance(out, dict) else {}


def _routed(url: str, text: str) -> tuple[int, dict]:
    status, headers, _ = _http(url + "/chat/completions", body={"model": "icl-router", "messages": [{"role": "user", "content": text}],
                                                                "max_tokens": 2, "routing": {"task": TASK}})
    return status, headers


def test_logged_traffic_reprofiled_changes_the_served_routing(monkeypatch):
    from icl_router.config import (
        AuthConfig,
        CandidateModelConfig,
        DecisionLogConfig,
        JudgeConfig,
        RayConfig,
        ReprofileConfig,
        SamplingConfig,
        ScorerServeConfig,
    )
    from icl_router.data.profile import build_prompt
    from icl_router.data.reprofile import run_reprofile
    from icl_router.graders import grade
    from icl_router.routing import evidence_store
    from icl_router.routing.decision import DecisionParams
    from icl_router.serving import decision_log as dl
    from icl_router.serving.app import free_port, start, wait_ready
    from icl_router.testing import make_tiny_router_dir, pool_diagnosis, served_root, tiny_serve_config

    t_start = time.monotonic()
    with served_root("trf-", num_cpus=8) as root:
        decision = DecisionParams(tau=0.1, prior_weight=0.0, min_gain=0.0).to_json()
        router_dir = make_tiny_router_dir(root / "router", k=K, decision=decision, both=True)
        log_dir = root / "log"
        cfg = tiny_serve_config(
            root, router=ScorerServeConfig(path=str(router_dir), num_cpus=1), auth=AuthConfig(api_keys=[API_KEY], admin_keys=[ADMIN_KEY]),
            port=free_port(), first_output_timeout_s=20, router_timeout_s=5, ray=RayConfig(num_cpus=8),
            decision_log=DecisionLogConfig(dir=str(log_dir), log_text=True, flush_interval_s=0.5),
        )
        url = start(cfg)
        wait_ready(url, app_name=cfg.app_name, timeout_s=600)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # both models answering
            rows = _http(url.removesuffix("/v1") + "/admin/models", key=ADMIN_KEY)[2].get("data", [])
            if len(rows) == 2 and all(r["circuit"] == "closed" and r["routable"] for r in rows):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the pool never answered:\n{pool_diagnosis(root)}")
        print(f"service ready after {time.monotonic() - t_start:.0f} s")

        # N routed requests: N rows, one per request id
        ids, chosen = [], {}
        for text in TEXTS:
            for _ in range(2):
                status, headers = _routed(url, text)
                assert status == 200, headers
                ids.append(headers["x-icl-router-request-id"])
                chosen[text] = headers["x-icl-router-chosen"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and dl.read_log(log_dir).num_rows < len(ids):
            time.sleep(0.5)
        log = dl.read_log(log_dir)
        assert sorted(log.column("request_id").to_pylist()) == sorted(ids)  # N requests, N rows
        row = log.to_pylist()[0]
        assert row["task"] == TASK and row["query_text"] in TEXTS and row["model"] in ("tiny-a", "tiny-b") and len(row["p"]) == 2

        # bad feedback changes nothing and names the field
        status, _, body = _http(url + "/feedback", body={"request_id": "req-nope", "correct": True})
        assert status == 404 and body["error"]["param"] == "request_id"
        status, _, body = _http(url + "/feedback", body={"request_id": ids[0], "correct": True, "score": 1.0})
        assert status == 400 and body["error"]["param"] == "score"

        # a query the two models answer differently (asked as reprofile will ask it: greedy, the short style)
        answers = {}
        target = text = None
        for t in TEXTS:
            prompt = build_prompt("exact_match", t, style="short")
            for m in ("tiny-a", "tiny-b"):
                s, _, out = _http(url + "/chat/completions", body={"model": m, "messages": [{"role": "user", "content": prompt}],
                                                                   "max_tokens": 4, "temperature": 0.0})
                assert s == 200
                answers[(t, m)] = out["choices"][0]["message"]["content"] or ""
            other = chosen[t]
            tgt = "tiny-b" if other == "tiny-a" else "tiny-a"
            if answers[(t, tgt)].strip() and grade("exact_match", answers[(t, tgt)], answers[(t, tgt)], plain=True) == 1 and grade(
                    "exact_match", answers[(t, other)], answers[(t, tgt)], plain=True) == 0:
                text, target = t, tgt
                break
        assert text is not None, f"the tiny models answered every query alike: {answers}"
        rid = ids[TEXTS.index(text) * 2]
        status, _, body = _http(url + "/feedback", body={"request_id": rid, "reference": answers[(text, target)]})
        assert status == 200 and body["stored"] == ["reference"], body
        _, before = _routed(url, text)
        assert before["x-icl-router-chosen"] != target

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and dl.read_log(log_dir, "feedback").num_rows < 1:  # the feedback shard is flushed
            time.sleep(0.5)
        monkeypatch.setenv("TRAFFIC_TEST_KEY", API_KEY)
        summary = run_reprofile(ReprofileConfig(
            router=str(router_dir), decision_log=str(log_dir), via="service", service_url=url, service_key_env="TRAFFIC_TEST_KEY",
            models=[CandidateModelConfig(name=m.name, path=m.path) for m in cfg.pool], sample=1.0, prompt_style="short",
            sampling=SamplingConfig(max_tokens=4), concurrency=2, judge=JudgeConfig(enabled=True, model="tiny-a"),
        ))
        print("reprofile:", summary)
        assert summary["sampled"] - summary["sampled_for_judge"] == 1 and summary["store_rows_added"] == 2
        j = summary["judge"]
        assert j["via"] == "service" and j["answers"] == 2 * summary["sampled_for_judge"] > 0 and j["failed_requests"] == 0
        assert j["calibration"]["n"] + j["calibration"]["unparsed"] == 2 and not j["gate"]["passed"] and j["outcomes_added"] == 0
        assert evidence_store.generation(router_dir) == summary["store"]["generation"]

        # the served routing moves, without a restart: the registry sees the store's generation, the router replica reloads it
        deadline, after = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status, after = _routed(url, text)
            assert status == 200
            if after["x-icl-router-chosen"] == target:
                break
            time.sleep(1)
        assert after["x-icl-router-chosen"] == target, (before, after)
        assert after["x-icl-router-p"] != before["x-icl-router-p"]
        print(f"routing moved {before['x-icl-router-chosen']} -> {target} ({before['x-icl-router-p']} -> {after['x-icl-router-p']}); "
              f"{time.monotonic() - t_start:.0f} s in all")
    os.environ.pop("TRAFFIC_TEST_KEY", None)
