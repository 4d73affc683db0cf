"""icl-router reprofile via an OpenAI-compatible service (a stub on loopback): logged queries with a reference
are asked of every pool model, graded, and join the router directory's evidence store (data/reprofile.py)."""

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


class Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert self.headers["authorization"] == "Bearer sk-x"
        out = {"choices": [{"message": {"content": ANSWERS[body["model"]]}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        raw = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


def test_reprofile_via_a_service_fills_the_store(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from icl_router.data.reprofile import run_reprofile
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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STUB_KEY", "sk-x")
    cfg = ReprofileConfig(router=str(router), decision_log=str(log), via="service", service_url=f"http://127.0.0.1:{server.server_port}/v1",
                          service_key_env="STUB_KEY", models=[CandidateModelConfig(name=m, path="unused") for m in ANSWERS], sample=1.0,
                          prompt_style="short", sampling=SamplingConfig(max_tokens=4))
    try:
        out = run_reprofile(cfg)
        again = run_reprofile(cfg)  # nothing new: the store keeps what it has
    finally:
        server.shutdown()
    assert out["gradable"] == 1 and out["sampled"] == 1 and out["ungraded_no_reference"] == 2
    assert out["store_rows_added"] == 3  # both models on req-0, and req-1's feedback on tiny-b
    assert again["sampled"] == 0 and again["store_rows_added"] == 0
    rows = {(r["query_id"], r["model_id"]): (r["score"], r["source"]) for r in evidence_store.read_table(router).to_pylist()}
    assert rows == {("req-0", "tiny-a"): (1.0, "reprofile"), ("req-0", "tiny-b"): (0.0, "reprofile"), ("req-1", "tiny-b"): (0.0, "feedback")}
    ev = evidence_store.load(router, dim=384)
    assert ev.n == 2 and ev.generation == out["store"]["generation"]
