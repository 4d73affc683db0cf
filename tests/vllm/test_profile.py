"""The profile job with real vLLM on CPU through Ray Data: two tiny models on real GSM8K queries.

One Ray cluster (8 logical CPUs: Ray Data LLM's stages each ask for one) serves the module;
the killed job is a separate `icl-router profile` process joined to it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from icl_router import schemas as S
from icl_router.config import CandidateModelConfig, ProfileConfig, RayConfig, SamplingConfig
from icl_router.data.dataset import Dataset
from icl_router.data.importers import import_dataset
from icl_router.data.profile import _outcome, build_prompt, run_profile
from icl_router.graders import grade

ZEROEVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routing" / "zeroeval" / "matrix.jsonl"
N_FIRST, N_MORE = 24, 12  # queries of the first run; queries added before the killed run
PRICES = {"tiny-a": (1e-6, 3e-6), "tiny-b": (2e-6, 5e-6)}  # (per input token, per output token)


def test_outcome_grades_and_prices_a_row():
    """The postprocess alone (no vLLM): score from the grader, cost from the token counts."""
    row = {S.QUERY_ID: "q", S.GRADER: "gsm8k", S.GOLD: "# 18", "num_input_tokens": 30, "num_generated_tokens": 7, "time_taken_llm": 0.25}
    right = _outcome({**row, "generated_text": '{"reasoning": "16-3-4=9, 9*2", "answer": "18"}'}, model_id="m", cost_in=1e-6, cost_out=3e-6, style="json")
    wrong = _outcome({**row, "generated_text": '{"answer": "19"}'}, model_id="m", cost_in=1e-6, cost_out=3e-6, style="json")
    assert (right[S.CORRECT], wrong[S.CORRECT]) == (True, False)
    # scores are float verdicts and the latency a float copied from the row: compared as values
    assert (right[S.SCORE], wrong[S.SCORE]) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert right[S.COST] == pytest.approx(30 * 1e-6 + 7 * 3e-6)
    assert (right[S.PROMPT_TOKENS], right[S.COMPLETION_TOKENS]) == (30, 7)
    assert right[S.LATENCY_S] == pytest.approx(0.25, abs=1e-12)


def test_prompts_keep_the_question_and_ask_for_what_the_grader_reads():
    question = "Is {x} in {1, 2}?"  # braces in a question must survive
    for grader in ("gsm8k", "math", "multiple_choice", "crux", "exact_match", "f1"):
        prompt = build_prompt(grader, question)
        assert prompt.startswith(question) and '"answer": "' in prompt
    assert "```python" in build_prompt("code", question)


def _gsm_lines(n: int) -> list[str]:
    if not ZEROEVAL.is_file():
        pytest.skip(f"real data {ZEROEVAL} is absent (expected ../shared/data beside the repo)")
    with ZEROEVAL.open() as f:
        return [line for line in f if json.loads(line)["task"] == "gsm"][:n]


@pytest.fixture(scope="module")
def work():
    # A short path: Ray's socket paths must stay under the 107-byte Unix limit.
    root = Path(tempfile.mkdtemp(prefix="prof-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(work):
    """A local Ray cluster whose workers (and their vLLM engines) write temp files under ``work``."""
    import ray

    from icl_router.raycluster import ensure_ray

    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(work / "tmp")  # vLLM writes vllm_dist_* files there; workers inherit it
    (work / "tmp").mkdir()
    if ray.is_initialized():  # e.g. a 4-CPU session cluster of tests/ray: too small for Ray Data LLM
        ray.shutdown()
    ensure_ray(RayConfig(num_cpus=8, temp_dir=str(work / "ray")))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if old_tmp is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = old_tmp


@pytest.fixture(scope="module")
def data(work):
    """Datasets imported from a slice of ZeroEval's GSM8K queries (their 29 published models included)."""
    lines = _gsm_lines(N_FIRST + N_MORE)
    for name, n in (("first", N_FIRST), ("more", N_FIRST + N_MORE)):
        (work / f"{name}.jsonl").write_text("".join(lines[:n]))
        import_dataset("zeroeval", [str(work / f"{name}.jsonl")], work / name)
    return Dataset(work / "first"), Dataset(work / "more")


@pytest.fixture(scope="module")
def models(work, data):
    from icl_router.testing import make_tiny_causal_lm

    texts = data[1].read_queries().column(S.TEXT).to_pylist()
    return {name: str(make_tiny_causal_lm(work / name, seed=seed, texts=texts)) for seed, name in enumerate(PRICES)}


def _config(dataset: Dataset, models: dict[str, str], address: str) -> ProfileConfig:
    return ProfileConfig(
        dataset=str(dataset.root),
        queries="all",
        shard_size=8,
        batch_size=8,
        models=[
            CandidateModelConfig(
                name=name,
                path=path,
                sampling=SamplingConfig(max_tokens=16),
                cost_per_input_token=PRICES[name][0],
                cost_per_output_token=PRICES[name][1],
                engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 1024},
            )
            for name, path in models.items()
        ],
        ray=RayConfig(address=address),
    )


def _profile_files(ds: Dataset) -> list[Path]:
    return sorted(p for name in PRICES for p in (ds.outcomes_dir / f"{S.MODEL_ID}={name}").glob("part-*.parquet"))


def _pair_counts(ds: Dataset) -> dict[tuple[str, str], int]:
    out = ds.read_outcomes(list(PRICES))
    counts: dict[tuple[str, str], int] = {}
    for pair in zip(out.column(S.QUERY_ID).to_pylist(), out.column(S.MODEL_ID).to_pylist()):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


@pytest.fixture(scope="module")
def profiled(cluster, data, models):
    cfg = _config(data[0], models, cluster)
    return cfg, run_profile(cfg)


@pytest.mark.slow  # with its fixtures: a Ray cluster, two vLLM engines, the profile job
@pytest.mark.timeout(600)
def test_profiles_two_models_grades_every_row_and_a_second_run_adds_nothing(profiled, data):
    cfg, summary = profiled
    ds = data[0]
    queries = ds.read_queries()
    gold = dict(zip(queries.column(S.QUERY_ID).to_pylist(), queries.column(S.GOLD).to_pylist()))
    assert summary["ran"] == 2 * N_FIRST
    assert {m: v["ran"] for m, v in summary["models"].items()} == {m: N_FIRST for m in PRICES}
    assert _pair_counts(ds) == {(q, m): 1 for q in gold for m in PRICES}
    assert len(_profile_files(ds)) == 2 * (N_FIRST // cfg.shard_size)  # one file per shard

    out = ds.read_outcomes(list(PRICES)).to_pylist()
    responses = {m: [r[S.RESPONSE] for r in out if r[S.MODEL_ID] == m] for m in PRICES}
    assert responses["tiny-a"] != responses["tiny-b"]  # two different models answered
    for r in out:
        assert r[S.RESPONSE] and r[S.PROMPT_TOKENS] > 0 and 0 < r[S.COMPLETION_TOKENS] <= 16
        assert r[S.LATENCY_S] > 0 and r[S.SAMPLE] == 0
        cost_in, cost_out = PRICES[r[S.MODEL_ID]]
        assert r[S.COST] == pytest.approx(r[S.PROMPT_TOKENS] * cost_in + r[S.COMPLETION_TOKENS] * cost_out)
        assert 0.0 <= r[S.SCORE] <= 1.0 and r[S.CORRECT] == (r[S.SCORE] >= 0.5)
        assert r[S.SCORE] == pytest.approx(grade("gsm8k", r[S.RESPONSE], gold[r[S.QUERY_ID]]), abs=1e-12)  # a float verdict
    # The imported ZeroEval outcomes are untouched: the new models ran alone.
    assert len(ds.read_outcomes()) == len(queries) * (len(ds.model_ids()) - len(PRICES)) + 2 * N_FIRST

    files = _profile_files(ds)
    again = run_profile(cfg)
    assert again["ran"] == 0 and all(v["skipped"] == N_FIRST for v in again["models"].values())
    assert _profile_files(ds) == files


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_job_keeps_its_shards_and_the_rerun_does_only_the_rest(profiled, data, models, cluster, work):
    # The profiled dataset gains N_MORE new queries: only those run, for both models.
    ds = Dataset(work / "killed")
    shutil.copytree(data[0].root, ds.root)
    ds.write_queries(data[1].read_queries())
    before = {p: p.stat().st_mtime_ns for p in _profile_files(ds)}
    config = work / "killed.yaml"
    config.write_text(yaml.safe_dump(_config(ds, models, cluster).model_dump(mode="json")))

    cli = Path(sys.executable).with_name("icl-router")
    with (work / "killed.log").open("w") as log:
        job = subprocess.Popen([str(cli), "profile", "--config", str(config)], stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while len(_profile_files(ds)) == len(before) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.poll() is None, f"the job ended before it could be killed:\n{(work / 'killed.log').read_text()[-3000:]}"
            assert len(_profile_files(ds)) > len(before), "no shard appeared within 400 s"
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    counts = _pair_counts(ds)
    assert set(counts.values()) == {1}  # whatever was written, nothing twice
    written = len(counts) - 2 * N_FIRST
    assert 0 < written < 2 * N_MORE  # killed half way: some new pairs done, some not

    rerun = run_profile(_config(ds, models, cluster))
    assert rerun["ran"] == 2 * N_MORE - written
    all_ids = ds.read_queries().column(S.QUERY_ID).to_pylist()
    assert _pair_counts(ds) == {(q, m): 1 for q in all_ids for m in PRICES}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # earlier files were never rewritten
    assert len(_profile_files(ds)) > len(before) + 2  # the rerun wrote its own shards


def test_the_head_sizes_refused_on_cpu_are_the_ones_vllm_cannot_serve():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from icl_router.pretrained import VLLM_CPU_HEAD_SIZES

    assert list(VLLM_CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()
