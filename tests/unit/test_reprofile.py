"""icl-router reprofile via an OpenAI-compatible service (a stub on loopback): logged queries with a reference
are asked of every pool model, graded, and join the router directory's evidence store (data/reprofile.py); the
others are judged by a judge model (a stub too), whose outcomes join the store only past the agreement gate."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from icl_router.config import CandidateModelConfig, DecisionLogConfig, ReprofileConfig, SamplingConfig
from icl_router.routing import evidence_store
from icl_router.serving.traffic import Traffic

pytestmark = pytest.mark.unit

ANSWERS = {"tiny-a": "4", "tiny-b": "5"}  # what each stub model answers to anything
# the stub judges: "fair" calls an answer of 4 correct (what the grader says of "What is 2 + 2?"), "yes-man" everything,
# "mumbler" never gives a verdict
JUDGES = {"fair": lambda p: "Yes." if "Answer: 4" in p else "No, it is wrong.", "yes-man": lambda p: "Yes", "mumbler": lambda p: "Hmm, hard to say."}
ASKED: list[str] = []


class Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert self.headers["authorization"] == "Bearer sk-x"
        prompt = body["messages"][0]["content"]
        ASKED.append(body["model"])
        reply = JUDGES[body["model"]](prompt) if body["model"] in JUDGES else ANSWERS[body["model"]]
        out = {"choices": [{"message": {"content": reply}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        raw = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


def _logged_traffic(tmp_path):
    """A tiny router and a decision log of three routed queries: req-0 with a reference ("4"), req-1 with feedback
    (tiny-b was wrong), req-2 with nothing."""
    from types import SimpleNamespace

    from icl_router.routing.policy import Decision, Policy
    from icl_router.testing import make_tiny_router_dir

    router = make_tiny_router_dir(tmp_path / "router", k=8, both=True)
    log = tmp_path / "log"
    t = Traffic(DecisionLogConfig(dir=str(log), log_text=True), graders={"arithmetic": "exact_match"})
    plan = SimpleNamespace(decision=Decision("tiny-b", ["tiny-b", "tiny-a"], {"tiny-a": 0.4, "tiny-b": 0.6}, Policy("highest")), mass=0.0,
                           scored_by="router", params=None, task_layer=False, skipped=[], scoring_ms=1.0, embedding=None)
    for i, text in enumerate(["What is 2 + 2?", "What is 1 + 1?", "Hello"]):
        t.record(request_id=f"req-{i}", started=0.0, text=text, task="arithmetic", plan=plan, route="routed", kind="chat", stream=False,
                 model="tiny-b", status="ok", skipped=[], usage=None, cost=None, key="k", pool=("e", 1), policy="highest")
    asyncio.run(t.feedback(SimpleNamespace(request_id="req-0", correct=None, score=None, reference="4"), "k"))
    asyncio.run(t.feedback(SimpleNamespace(request_id="req-1", correct=False, score=None, reference=None), "k"))
    asyncio.run(t.flush(force=True))
    return router, log


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ASKED.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def _config(router, log, url, *, pool=tuple(ANSWERS), **fields):
    return ReprofileConfig(router=str(router), decision_log=str(log), via="service", service_url=url, service_key_env="STUB_KEY",
                           models=[CandidateModelConfig(name=m, path="unused") for m in pool], sample=1.0, prompt_style="short",
                           sampling=SamplingConfig(max_tokens=4), **fields)


def test_reprofile_via_a_service_fills_the_store(tmp_path, monkeypatch, stub):
    from icl_router.data.reprofile import run_reprofile

    router, log = _logged_traffic(tmp_path)
    monkeypatch.setenv("STUB_KEY", "sk-x")
    cfg = _config(router, log, stub)
    out = run_reprofile(cfg)
    again = run_reprofile(cfg)  # nothing new: the store keeps what it has
    assert out["gradable"] == 1 and out["sampled"] == 1 and out["ungraded_no_reference"] == 2
    assert out["store_rows_added"] == 3  # both models on req-0, and req-1's feedback on tiny-b
    assert again["sampled"] == 0 and again["store_rows_added"] == 0
    rows = {(r["query_id"], r["model_id"]): (r["score"], r["source"]) for r in evidence_store.read_table(router).to_pylist()}
    assert rows == {("req-0", "tiny-a"): (1.0, "reprofile"), ("req-0", "tiny-b"): (0.0, "reprofile"), ("req-1", "tiny-b"): (0.0, "feedback")}
    ev = evidence_store.load(router, dim=384)
    assert ev.n == 2 and ev.generation == out["store"]["generation"]
    assert out["judge"] == {"enabled": False} and not any(m in JUDGES for m in ASKED)


def test_a_fair_judge_passes_the_gate_and_its_outcomes_join_the_store(tmp_path, monkeypatch, stub, capsys):
    from icl_router.data.reprofile import run_reprofile

    router, log = _logged_traffic(tmp_path)
    monkeypatch.setenv("STUB_KEY", "sk-x")
    judge = {"enabled": True, "endpoint": {"base_url": stub, "model": "fair", "api_key_env": "STUB_KEY"}, "min_calibration": 2}
    out = run_reprofile(_config(router, log, stub, judge=judge))
    j = out["judge"]
    assert out["sampled"] == 3 and out["sampled_for_judge"] == 2
    # calibration: the two graded answers to req-0 (tiny-a right, tiny-b wrong), judged without the reference
    assert j["calibration"]["n"] == 2 and j["calibration"]["accuracy"] == 1.0 and j["calibration"]["kappa"] == 1.0
    assert j["calibration"]["confusion"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}
    assert j["gate"]["passed"] and j["answers"] == 4 and j["unparsed"] == 0 and j["outcomes_added"] == 4 and j["via"] == "endpoint"
    rows = {(r["query_id"], r["model_id"], r["source"]): r["score"] for r in evidence_store.read_table(router).to_pylist()}
    assert rows == {("req-0", "tiny-a", "reprofile"): 1.0, ("req-0", "tiny-b", "reprofile"): 0.0, ("req-1", "tiny-a", "judge"): 1.0,
                    ("req-1", "tiny-b", "judge"): 0.0, ("req-2", "tiny-a", "judge"): 1.0, ("req-2", "tiny-b", "judge"): 0.0,
                    ("req-1", "tiny-b", "feedback"): 0.0}
    assert evidence_store.load(router, dim=384).n == 3
    asked = len(ASKED)
    again = run_reprofile(_config(router, log, stub, judge=judge))  # judged queries are done: nothing is asked again
    assert again["sampled"] == 0 and again["store_rows_added"] == 0 and len(ASKED) == asked


@pytest.mark.parametrize("who, why", [("yes-man", "kappa 0.0 < judge.min_agreement 0.6 on 3"), ("mumbler", "only 0 calibration answers")])
def test_an_untrusted_judge_is_measured_and_its_outcomes_dropped(tmp_path, monkeypatch, stub, capsys, who, why):
    from icl_router.data.reprofile import run_reprofile

    router, log = _logged_traffic(tmp_path)
    monkeypatch.setenv("STUB_KEY", "sk-x")
    # a pool model as the judge, asked through the service by its name (it answers the queries too: "Yes" / a mumble, both wrong)
    out = run_reprofile(_config(router, log, stub, pool=(*ANSWERS, who), judge={"enabled": True, "model": who, "min_calibration": 2}))
    j = out["judge"]
    assert j["via"] == "service" and j["answers"] == 6 and j["unparsed"] == (6 if who == "mumbler" else 0)
    assert not j["gate"]["passed"] and why in j["gate"]["why"] and j["outcomes_added"] == 0
    assert {r["source"] for r in evidence_store.read_table(router).to_pylist()} == {"reprofile", "feedback"}
    assert capsys.readouterr().err.count("judged outcomes dropped") == (1 if who == "yes-man" else 0)


def test_a_judge_that_is_not_in_the_pool_is_a_config_error(tmp_path, stub):
    from icl_router.config import ConfigError
    from icl_router.data.reprofile import run_reprofile

    router, log = _logged_traffic(tmp_path)
    with pytest.raises(ConfigError, match="judge.model 'nobody' is not a pool model"):
        run_reprofile(_config(router, log, stub, judge={"enabled": True, "model": "nobody"}))
