"""The ingress's decision-log rows and feedback checks (serving/traffic.py), without Ray."""

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from icl_router.config import DecisionLogConfig
from icl_router.routing.policy import Decision, Policy
from icl_router.serving import decision_log as dl
from icl_router.serving.api_errors import ApiError
from icl_router.serving.protocol import FeedbackBody
from icl_router.serving.traffic import Traffic

pytestmark = pytest.mark.unit


def plan():
    d = Decision(model="a", order=["a", "b"], p={"a": 0.7, "b": 0.5}, policy=Policy("highest"), default="a")
    return SimpleNamespace(decision=d, mass=2.0, scored_by="router", params=object(), task_layer=False, skipped=[], scoring_ms=1.5, embedding=None)


def record(t: Traffic, rid: str, *, task="gsm8k", model="a", text="What is 2 + 2?"):
    t.record(request_id=rid, started=0.0, text=text, task=task, plan=plan(), route="routed", kind="chat", stream=False, model=model,
             status="ok" if model else "unavailable", skipped=[("a", "timeout")] if model == "b" else [],
             usage=SimpleNamespace(prompt_tokens=7, completion_tokens=3), cost=0.01, key="team-a", pool=("e", 3), policy="highest")


def test_rows_are_written_with_text_only_when_allowed(tmp_path):
    for log_text in (False, True):
        d = tmp_path / str(log_text)
        t = Traffic(DecisionLogConfig(dir=str(d), log_text=log_text))
        record(t, "req-1")
        asyncio.run(t.flush(force=True))
        row = dl.read_log(d).to_pylist()[0]
        assert row["query_hash"] == dl.query_hash("What is 2 + 2?") and row["chosen"] == "a" and row["p"] == [0.7, 0.5]
        assert row["query_text"] == ("What is 2 + 2?" if log_text else None)
        assert row["prompt_tokens"] == 7 and row["pool_version"] == "e:3" and row["evidence_mass"] == 2.0


def feedback(t, **body):
    return asyncio.run(t.feedback(FeedbackBody(**body), "team-a"))


def refused(t, **body) -> ApiError:
    with pytest.raises(ApiError) as e:
        feedback(t, **body)
    return e.value


def test_feedback_is_checked_and_stored(tmp_path):
    t = Traffic(DecisionLogConfig(dir=str(tmp_path)), graders={"gsm8k": "gsm8k"})
    record(t, "req-1")
    record(t, "req-2", task=None)
    record(t, "req-3", model=None)
    assert feedback(t, request_id="req-1", correct=True)["stored"] == ["correct"]
    assert feedback(t, request_id="req-1", reference="4")["model"] == "a"
    e = refused(t, request_id="req-9", correct=True)
    assert (e.status, e.param, e.code) == (404, "request_id", "request_not_found")
    assert refused(t, request_id="req-1", correct=True, score=0.5).param == "score"
    assert refused(t, request_id="req-1").param == "correct"
    e = refused(t, request_id="req-2", reference="4")
    assert (e.status, e.param) == (400, "reference") and "no task" in e.message
    assert refused(t, request_id="req-3", correct=False).status == 409
    with pytest.raises(ValidationError) as v:
        FeedbackBody(request_id="req-1", score=1.5)
    assert v.value.errors()[0]["loc"] == ("score",)
    asyncio.run(t.flush(force=True))
    fb = dl.read_log(tmp_path, "feedback").to_pylist()
    assert [(r["request_id"], r["correct"], r["reference"]) for r in fb] == [("req-1", True, None), ("req-1", None, "4")]  # refusals stored nothing


def test_feedback_finds_flushed_and_expired_requests(tmp_path):
    cfg = DecisionLogConfig(dir=str(tmp_path), feedback_ttl_s=60)
    t = Traffic(cfg)
    record(t, "req-1")
    asyncio.run(t.flush(force=True))
    other = Traffic(cfg)  # another ingress replica: reads the shards
    assert feedback(other, request_id="req-1", score=0.25)["stored"] == ["score"]
    t.recent["req-1"]["time"] -= timedelta(seconds=120)
    e = refused(t, request_id="req-1", correct=True)
    assert (e.status, e.code, e.param) == (410, "request_expired", "request_id")


def test_no_log_means_no_feedback(tmp_path):
    t = Traffic(DecisionLogConfig())
    record(t, "req-1")  # a no-op
    assert refused(t, request_id="req-1", correct=True).status == 404


def test_import_decisions_makes_a_routing_dataset(tmp_path):
    from icl_router.cli import main
    from icl_router.data.dataset import Dataset

    log_dir = tmp_path / "log"
    t = Traffic(DecisionLogConfig(dir=str(log_dir), log_text=True), graders={"gsm8k": "gsm8k"})
    record(t, "req-1", text="What is 2 + 2?")
    record(t, "req-2", text="What is 3 + 3?", task=None)
    feedback(t, request_id="req-1", reference="4")
    feedback(t, request_id="req-2", correct=False)
    asyncio.run(t.flush(force=True))
    main(["import", "--format", "decisions", "--input", str(log_dir), "--output", str(tmp_path / "ds")])
    ds = Dataset(tmp_path / "ds")
    q = {r["query_id"]: r for r in ds.read_queries().to_pylist()}
    assert q["req-1"]["gold"] == "4" and q["req-1"]["grader"] == "gsm8k" and q["req-2"]["task"] == "unknown" and q["req-1"]["split"] == "traffic"
    out = ds.read_outcomes().to_pylist()
    assert [(r["query_id"], r["model_id"], r["correct"], r["prompt_tokens"]) for r in out] == [("req-2", "a", False, 7)]
