"""One-call onboarding without a cluster: the onboarding directory (its dataset and the registry's
records), the anchor run (concurrency, retries, grading, shards, resuming), and what the registry
refuses before anything is deployed. The deployment and the model replica themselves are real only
in tests/vllm/test_onboard.py."""

import asyncio
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest

from icl_router import schemas as S
from icl_router.graders import grade
from icl_router.model.router_dir import (
    META_FILE,
    PROFILES_FILE,
    RouterMeta,
    write_anchor_queries,
    write_profiles,
)
from icl_router.serving.onboarding import (
    Answer,
    OnboardingError,
    OnboardingStore,
    RefusedByModel,
    messages,
    run_anchors,
    ungradable,
)
from icl_router.testing import tiny_anchors

K = 8


def _router_dir(path, anchors: pa.Table | None = None):
    ids = [f"anchor-{i}" for i in range(K)]
    meta = RouterMeta("all-MiniLM-L6-v2", 384, "vector", "pairs", 3, 4, 5, ids)
    path.mkdir(exist_ok=True)
    (path / META_FILE).write_text(json.dumps(asdict(meta)))
    write_profiles(path / PROFILES_FILE, {"m-old": np.zeros(K, bool)}, ids)
    if anchors is not None:
        write_anchor_queries(path, anchors)
    return path


def test_ungradable_names_the_anchors_and_the_fix():
    assert ungradable(tiny_anchors(K)) is None
    assert "router-anchors" in ungradable(None)
    no_gold = tiny_anchors(K, golds=[None, *["1"] * (K - 1)])
    assert "1 of the router's 8 anchors cannot be graded" in ungradable(no_gold) and "anchor-0" in ungradable(no_gold)
    assert "8 of the router's 8" in ungradable(tiny_anchors(K, grader="astrology"))


def test_the_onboarding_dataset_holds_the_anchors_and_refuses_another_routers(tmp_path):
    store = OnboardingStore(tmp_path / "onb", tiny_anchors(K))
    store.prepare()
    q = store.ds.read_queries()
    assert q.column(S.QUERY_ID).to_pylist() == store.ids and set(q.column(S.SPLIT).to_pylist()) == {"anchor"}
    store.prepare()  # again: nothing to add
    other = OnboardingStore(tmp_path / "onb", tiny_anchors(K, golds=["0"] * K))
    with pytest.raises(OnboardingError, match="another router"):
        other.prepare()


def _ask_echoing(right: set[str], calls: list[str], fail_first: set[str] = frozenset()):
    """A model that answers the gold (``"1"``, ``"3"``...) on the anchors of ``right`` and "no" elsewhere;
    it raises on its first call for the anchors of ``fail_first``."""
    failed: set[str] = set()

    async def ask(msgs):
        text = msgs[0]["content"]
        i = int(text.split("What is ")[1].split(" ")[0])
        calls.append(f"anchor-{i}")
        if f"anchor-{i}" in fail_first and f"anchor-{i}" not in failed:
            failed.add(f"anchor-{i}")
            raise ConnectionError("replica restarting")
        await asyncio.sleep(0)
        return Answer(str(2 * i + 1) if f"anchor-{i}" in right else "no", 40, 2, 0.01)

    return ask


def _run(store, todo, ask, **kw):
    written = []
    args = dict(model_id="m", cost=0.5, store=store, concurrency=3, shard_size=3, timeout_s=30, retries=1, on_written=written.append)
    asyncio.run(run_anchors(todo, ask=ask, **{**args, **kw}))
    return written


def test_run_anchors_grades_every_anchor_once_in_shards_and_retries(tmp_path):
    anchors = tiny_anchors(K)
    store = OnboardingStore(tmp_path / "onb", anchors)
    right, calls = {"anchor-1", "anchor-4", "anchor-6"}, []
    written = _run(store, anchors.to_pylist(), _ask_echoing(right, calls, fail_first={"anchor-2"}))
    assert sorted(written) == [2, 3, 3] and len(list((store.ds.outcomes_dir / "model_id=m").glob("part-*.parquet"))) == 3
    assert sorted(calls) == sorted([*store.ids, "anchor-2"])  # anchor-2 failed once and was asked again
    assert store.profile("m").tolist() == [q in right for q in store.ids]
    rows = store.ds.read_outcomes(["m"]).to_pylist()
    assert len(rows) == K and all(r[S.COST] == pytest.approx(0.5) and r[S.PROMPT_TOKENS] == 40 for r in rows)
    gold = dict(zip(store.ids, anchors.column(S.GOLD).to_pylist()))
    # graded by the project's grader, the verdict a float: compared as a value
    assert all(r[S.SCORE] == pytest.approx(grade("exact_match", r[S.RESPONSE], gold[r[S.QUERY_ID]]), abs=1e-12) for r in rows)


def test_a_run_resumed_from_written_outcomes_ends_with_the_uninterrupted_profile(tmp_path):
    anchors = tiny_anchors(K)
    right = {"anchor-0", "anchor-3", "anchor-7"}
    whole = OnboardingStore(tmp_path / "whole", anchors)
    _run(whole, anchors.to_pylist(), _ask_echoing(right, []))
    resumed = OnboardingStore(tmp_path / "resumed", anchors)
    _run(resumed, anchors.to_pylist()[:3], _ask_echoing(right, []))  # a first run stopped after 3 anchors
    assert resumed.profile("m") is None and len(resumed.outcomes("m")) == 3
    calls = []
    todo = [r for r in anchors.to_pylist() if r[S.QUERY_ID] not in resumed.outcomes("m")]
    _run(resumed, todo, _ask_echoing(right, calls))
    assert sorted(calls) == store_ids_after(3) and resumed.profile("m").tolist() == whole.profile("m").tolist()
    assert len(resumed.ds.read_outcomes(["m"])) == K  # each anchor once


def store_ids_after(n: int) -> list[str]:
    return sorted(f"anchor-{i}" for i in range(n, K))


def test_a_failing_anchor_stops_the_run_and_keeps_what_was_graded(tmp_path):
    anchors = tiny_anchors(K)
    store = OnboardingStore(tmp_path / "onb", anchors)
    calls = []
    ask = _ask_echoing(set(), calls, fail_first=set(store.ids))
    with pytest.raises(OnboardingError, match="no answer after 1 tries"):
        _run(store, anchors.to_pylist(), ask, retries=0, concurrency=1)
    assert len(store.ds.read_outcomes(["m"])) < K

    async def refuses(msgs):
        calls.append("refused")
        raise RefusedByModel("m refused an anchor with 400: prompt over the context")

    calls.clear()
    with pytest.raises(RefusedByModel):
        _run(OnboardingStore(tmp_path / "onb2", anchors), anchors.to_pylist()[:1], refuses, retries=3)
    assert calls == ["refused"]  # a 4xx is not retried


def test_prompts_are_the_profile_jobs():
    from icl_router.data.profile import build_prompt

    row = tiny_anchors(K).to_pylist()[2]
    assert messages(row) == [{"role": "user", "content": build_prompt("exact_match", "What is 2 plus 3?")}]


# ---- the registry: what it refuses, and what it takes back after a restart ---------------------


def _registry(tmp_path, anchors: pa.Table | None):
    from icl_router.serving.registry import Registry

    r = _router_dir(tmp_path / "router", anchors)
    return Registry.func_or_class(str(r), costs={"m-old": 1.0}, persist=True, onboarding={"dir": str(tmp_path / "onb")})


def _model_dir(tmp_path):
    """A directory that passes the model-path check (a config of a head size vLLM on CPU serves)."""
    d = tmp_path / "models" / "m-new"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 4}))
    return str(d)


@pytest.mark.parametrize(
    "anchors, body, code, param, text",
    [
        (tiny_anchors(K), {}, "invalid_value", "serving", "neither a profile nor a serving path"),
        (None, {"serving": "model"}, "cannot_grade", "profile", "no anchors.parquet"),
        (tiny_anchors(K, golds=[None] * K), {"serving": "model"}, "cannot_grade", "profile", "cannot be graded"),
        (tiny_anchors(K, grader="astrology"), {"serving": "model"}, "cannot_grade", "profile", "graders are"),
        (tiny_anchors(K), {"serving": "model", "profile": [True] * (K + 1)}, "invalid_value", "profile", "K=8"),
    ],
)
def test_refused_onboardings_change_nothing(tmp_path, anchors, body, code, param, text):
    from icl_router.serving.registry import Refusal

    reg = _registry(tmp_path, anchors)
    before = reg.snapshot()
    serving = {"path": _model_dir(tmp_path)} if body.get("serving") else None
    out = asyncio.run(reg.register("m-new", body.get("profile"), dataset=None, cost=0.1, serving=serving, replace=False))
    assert isinstance(out, Refusal) and (out.status, out.code, out.param) == (400, code, param), out
    assert text in out.message, out.message
    assert reg.snapshot() == before
    assert not (tmp_path / "onb" / "registrations").exists() and not (tmp_path / "onb" / "outcomes").exists()


def test_a_restarted_registry_takes_back_its_records(tmp_path):
    """Failed stays failed with its reason; an onboarding in flight is not routable until it is ready,
    even with a profile from before in profiles.parquet; a record of a config pool model is ignored."""
    anchors = tiny_anchors(K)
    store = OnboardingStore(tmp_path / "onb", anchors)
    serving = {"path": _model_dir(tmp_path), "engine_kwargs": {"max_model_len": 512}}
    for i, (model, extra) in enumerate((("m-failed", {"error": "deploying: no such model"}), ("m-half", {}), ("m-old", {}))):
        store.write_record({"model": model, "serving": serving, "cost": 0.25, "app": f"pool-{model}", "profile": None, "created": i, **extra})
    reg = _registry(tmp_path, anchors)
    write_profiles(reg.router_dir / PROFILES_FILE, {"m-old": np.zeros(K, bool), "m-half": np.ones(K, bool)}, store.ids)
    reg = _registry(tmp_path, anchors)  # built again: it reads the profiles written above
    snap = reg.snapshot()
    assert snap.models["m-failed"].state == "failed" and snap.models["m-failed"].error == "deploying: no such model"
    assert snap.models["m-half"].state == "deploying" and snap.models["m-half"].cost == pytest.approx(0.25)
    assert snap.routable == ["m-old"] and snap.models["m-old"].app is None
    assert [m for m, *_ in reg._resuming] == ["m-half"]


def test_a_registry_restarted_mid_profiling_resumes_and_ends_with_the_same_profile(tmp_path, monkeypatch):
    """The registry's own path with the deployment and the replica stood in for: the first replica grades 3
    anchors and stops (killed: never answers again); a new replica built from the same directories resumes
    on its own, asks only the other anchors, and registers the profile an uninterrupted run gives. Until
    then the model is not routable."""
    from icl_router.model.router_dir import read_profiles
    from icl_router.serving import registry as R

    anchors, right = tiny_anchors(K), {"anchor-1", "anchor-2", "anchor-5"}
    want = [f"anchor-{i}" in right for i in range(K)]
    asked: list[list[str]] = [[], []]
    killed = asyncio.Event()  # never set: the first replica's later calls hang, as a dead replica's would

    async def deploy(self, model_id, entry, cfg, *, adopt):
        assert adopt == (self is not first)  # the restarted replica adopts the app
        assert model_id not in self.snapshot().routable

    async def teardown(self, app):
        raise AssertionError("nothing fails here: nothing is torn down")

    async def ask(handle, msgs, *, model_id, sampling):
        i = int(msgs[0]["content"].split("What is ")[1].split(" ")[0])
        life = asked[handle]
        if handle == 0 and len(life) == 3:
            await killed.wait()
        life.append(f"anchor-{i}")
        return Answer(str(2 * i + 1) if f"anchor-{i}" in right else "no", 30, 2, 0.01)

    lives = iter([0, 1])
    monkeypatch.setattr(R.Registry.func_or_class, "_deploy", deploy)
    monkeypatch.setattr(R.Registry.func_or_class, "_teardown", teardown)
    monkeypatch.setattr(R, "ask_chat", ask)
    monkeypatch.setattr(R.serve, "get_deployment_handle", lambda *a, **kw: next(lives))  # the handle says which life asks
    onboarding = {"dir": str(tmp_path / "onb"), "concurrency": 1, "shard_size": 1}
    router = _router_dir(tmp_path / "router", anchors)

    async def until(cond, what):
        for _ in range(2000):  # bounded by steps of the event loop, not by the clock
            if cond():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never: {what}")

    async def scenario():
        nonlocal first
        first = R.Registry.func_or_class(str(router), costs={"m-old": 1.0}, persist=True, onboarding=onboarding)
        out = await first.register("m-new", None, dataset=None, cost=0.1, serving={"path": _model_dir(tmp_path)}, replace=False)
        assert out["state"] == "deploying" and out["accuracy"] is None
        await until(lambda: first.models["m-new"].graded == 3 and len(asked[0]) == 3, "3 anchors graded")
        snap = first.snapshot()
        assert snap.models["m-new"].state == "profiling" and "m-new" not in snap.routable
        first.models["m-new"].task.cancel()  # the replica dies; its Ray actor would take the task with it
        second = R.Registry.func_or_class(str(router), costs={"m-old": 1.0}, persist=True, onboarding=onboarding)
        assert second.snapshot().models["m-new"].state == "deploying" and "m-new" not in second.snapshot().routable
        await until(lambda: second.models["m-new"].task is None, "the resumed onboarding ends")
        return second.snapshot()

    first = None
    snap = asyncio.run(scenario())
    e = snap.models["m-new"]
    assert (e.state, e.graded, e.resumed, e.error) == ("ready", K, 3, None) and "m-new" in snap.routable
    assert list(snap.profiles["m-new"]) == want and e.cost == pytest.approx(0.1)
    assert len(asked[0]) == 3 and sorted(asked[1]) == sorted({f"anchor-{i}" for i in range(K)} - set(asked[0]))  # each asked once
    assert read_profiles(router / PROFILES_FILE, [f"anchor-{i}" for i in range(K)])["m-new"].tolist() == want  # persisted
    assert len(OnboardingStore(tmp_path / "onb", anchors).ds.read_outcomes(["m-new"])) == K  # each anchor once
