"""Shared fixtures (real data location, a small dataset, the tiny router LM, a local Ray cluster) and
the test tiers: every test carries the marker of its directory (unit, ray, vllm, gpu)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from icl_router import schemas as S
from icl_router.data.dataset import Dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLMROUTER_TRAIN = SHARED_DATA / "routing" / "llmrouter" / "train.jsonl"
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "ray", "vllm", "gpu")  # tests/<tier>/ -> the marker; pyproject registers each


def pytest_collection_modifyitems(config, items):
    """Mark each test with its directory's tier, so `-m unit` selects tests/unit (what make test-fast runs)."""
    for item in items:
        tier = item.path.resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/<tier>/ with a tier of {TIERS}; move it into one")
        if tier == "unit" and "ray_local" in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid}: the unit tier runs without Ray; move the test to tests/ray/")
        item.add_marker(tier)


@pytest.fixture
def real_dataset(tmp_path) -> Dataset:
    """The first 50 queries of the real llmrouter train set with their 9 models' outcomes."""
    if not LLMROUTER_TRAIN.is_file():
        pytest.skip(f"real data {LLMROUTER_TRAIN} is absent (expected ../shared/data beside the repo)")
    with LLMROUTER_TRAIN.open() as f:
        recs = [json.loads(line) for _, line in zip(range(50), f)]
    ds = Dataset(tmp_path / "real")
    ds.write_queries(
        pa.table(
            {
                S.QUERY_ID: [r["id"] for r in recs],
                S.TEXT: [r["question"] for r in recs],
                S.TASK: [r["task"] for r in recs],
                S.SPLIT: ["train"] * len(recs),
            }
        )
    )
    cells = [(r["id"], m, float(v)) for r in recs for m, v in sorted(r["labels"].items())]
    ds.append_outcomes(
        pa.table(
            {
                S.QUERY_ID: [q for q, _, _ in cells],
                S.MODEL_ID: [m for _, m, _ in cells],
                S.SAMPLE: [0] * len(cells),
                S.SCORE: [v for _, _, v in cells],
                S.CORRECT: [v >= S.CORRECT_THRESHOLD for _, _, v in cells],
            }
        )
    )
    return ds


@pytest.fixture
def small_dataset(tmp_path) -> Dataset:
    """60 queries of three llmrouter tasks (two ID, one OOD), 4 models with different skill."""
    tasks = ["mmlu", "gsm8k", "gpqa"]
    n, models = 60, ["m-weak", "m-mid", "m-strong", "m-best"]
    ids = [f"q{i:03d}" for i in range(n)]
    ds = Dataset(tmp_path / "small")
    ds.write_queries(
        pa.table(
            {
                S.QUERY_ID: ids,
                S.TEXT: [f"question {i} about {tasks[i % 3]}" for i in range(n)],
                S.TASK: [tasks[i % 3] for i in range(n)],
                S.SPLIT: ["train"] * n,
            }
        )
    )
    rng = np.random.RandomState(0)
    correct = rng.rand(n, len(models)) < np.array([0.3, 0.5, 0.6, 0.8])  # [Q, M]
    ds.append_outcomes(
        pa.table(
            {
                S.QUERY_ID: [q for q in ids for _ in models],
                S.MODEL_ID: models * n,
                S.SAMPLE: [0] * (n * len(models)),
                S.SCORE: correct.reshape(-1).astype(float),
                S.CORRECT: correct.reshape(-1),
            }
        )
    )
    return ds


@pytest.fixture
def value_setup(tmp_path, small_dataset):
    """(dataset, router dir, base ValueConfig dict): small_dataset with 16-d embeddings (one cluster
    per task) and a tiny vector router with anchor evidence over its first 12 queries; pool: m-weak,
    m-mid (m-strong, m-best: candidates)."""
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir
    from icl_router.model.tiny import build_tiny_router_lm

    K, E, EMBEDDER = 12, 16, "test-embedder"
    ds = small_dataset
    q = ds.read_queries()
    ids, tasks = q.column(S.QUERY_ID).to_pylist(), q.column(S.TASK).to_pylist()
    rng = np.random.default_rng(0)
    centers = {t: rng.normal(size=E) * 2 for t in sorted(set(tasks))}
    emb = np.stack([centers[t] + rng.normal(size=E) for t in tasks]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ds.append_embeddings(pa.table({S.QUERY_ID: ids, S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), E), S.EMBEDDER: [EMBEDDER] * len(ids)}))
    lm, tok = build_tiny_router_lm(q.column(S.TEXT).to_pylist(), vocab_size=600, hidden=64, heads=2, kv_heads=1, layers=1, intermediate=64)
    layout = PromptLayout(tok, query_input="vector", profile_layout="fused")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.from_numpy(emb[:K]), anchor_evidence=True)
    anchors = ids[:K]
    meta = RouterMeta(EMBEDDER, E, "vector", "fused", layout.placeholder_id, layout.yes_id, layout.no_id, anchors, anchor_evidence=True)
    prof = ds.correctness(anchors, ["m-weak", "m-mid"]) >= 0.5
    path = save_router_dir(router, tmp_path / "router", meta=meta, pool={"m-weak": prof[:, 0], "m-mid": prof[:, 1]})
    base = {"router": str(path), "dataset": str(ds.root), "evaluation": {"split": None}, "output": str(tmp_path / "out")}
    return ds, path, base


@pytest.fixture(scope="session")
def tiny_router_lm():
    """(tiny Qwen2 LM in eval mode, its tokenizer): random weights, a byte-level BPE trained on
    SAMPLE_QUERIES. Built once per session and shared, so it is read-only: a test that trains it,
    changes its mode or edits its weights works on ``copy.deepcopy(lm)``. The check at the end of the
    session fails if one did not."""
    import torch

    from icl_router.model.tiny import build_tiny_router_lm
    from icl_router.testing import SAMPLE_QUERIES

    lm, tok = build_tiny_router_lm(SAMPLE_QUERIES * 4, vocab_size=600)
    lm.eval()
    before = {n: p.detach().clone() for n, p in lm.state_dict().items()}
    yield lm, tok
    changed = [n for n, p in lm.state_dict().items() if not torch.equal(p, before[n])]  # bitwise: any write at all
    assert not changed and not lm.training, f"a test changed the shared tiny router LM ({changed[:3]}, training={lm.training})"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster per test session: 4 logical CPUs, its files under a fresh temp dir."""
    import ray

    from icl_router.config import RayConfig
    from icl_router.raycluster import ensure_ray

    # A short path: Ray's socket paths must stay under the 107-byte Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ensure_ray(RayConfig(num_cpus=4, temp_dir=temp_dir))
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
