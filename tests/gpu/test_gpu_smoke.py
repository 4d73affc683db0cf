"""GPU smoke tests: what the device rule promises, run where a GPU is (skipped without CUDA).

- a few training steps of stage 2 on Ray Train with ``use_gpu`` (bfloat16 under the rule), with the
  rank-0 worker's keep-or-not check on its GPU; the router LM is a real pretrained LM when
  ``icl-router models`` has converted one into runs/models/ (else the tiny LM);
- the trained router served with ``router.num_gpus: 1``: its replica loads on cuda in bfloat16, and a
  routed chat request through the OpenAI API is answered by a pool model.

`pytest --collect-only -m gpu` lists them on any machine; they run only where torch sees CUDA.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "runs" / "models"  # where `icl-router models` converts the pretrained LMs from PyPI
LLMROUTER_TRAIN = REPO.parent / "shared" / "data" / "routing" / "llmrouter" / "train.jsonl"

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device rule's GPU side"),
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]


def pretrained_router_lm() -> str | None:
    """A converted pretrained LM (SmolLM2-135M-Instruct first), or None: the tiny LM then stands in."""
    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "gemma-3-270m"):
        if (MODELS / name / "config.json").is_file():
            return str(MODELS / name)
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 real LLMRouter queries with their 9 models' outcomes, MiniLM embeddings, 16 anchors."""
    import pyarrow as pa

    from icl_router.config import AnchorsConfig, SplitConfig
    from icl_router.data.anchors import run_anchors
    from icl_router.data.embedder import BUNDLED, load_embedder
    from icl_router.data.importers import import_dataset

    if not LLMROUTER_TRAIN.is_file():
        pytest.skip(f"real data {LLMROUTER_TRAIN} is absent")
    root = tmp_path_factory.mktemp("gpu")
    (root / "train.jsonl").write_text("\n".join(LLMROUTER_TRAIN.read_text().splitlines()[::40][:120]) + "\n")
    ds = import_dataset("llmrouter", [str(root / "train.jsonl")], root / "data")
    q = ds.read_queries()
    emb = load_embedder(BUNDLED, device="cuda").encode(q.column("text").to_pylist(), batch_size=32, normalize_embeddings=True)
    ds.append_embeddings(pa.table({"query_id": q.column("query_id"), "embedding": pa.array(list(emb), pa.list_(pa.float32(), 384)),
                                   "embedder": [BUNDLED] * len(q)}))
    run_anchors(AnchorsConfig(dataset=str(ds.root), k=16, split=SplitConfig(name="given")))
    return ds


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Stage 2 for a few steps on one GPU worker: the router directory it writes."""
    import ray

    from icl_router.config import TrainConfig
    from icl_router.train.driver import run_train

    out = tmp_path_factory.mktemp("router") / "r"
    router = {"query_input": "vector", "profile_layout": "pairs", "anchor_evidence": True}
    lm = pretrained_router_lm()
    if lm is not None:
        router["name_or_path"] = lm
    else:
        router["tiny"] = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    cfg = TrainConfig.model_validate({
        "stage": 2, "dataset": str(data.root), "output": str(out), "router": router, "split": {"name": "given"},
        "phases": [{"epochs": 1, "lr_projector": 1e-4, "lr_router": 1e-5}], "batch_size": 8, "max_steps": 3, "checkpoint_every": 100,
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1}, "ray": {"num_cpus": 4},
    })
    assert cfg.train_dtype == "bfloat16"  # the rule: GPU workers train in bf16
    summary = run_train(cfg)
    ray.shutdown()
    assert summary["steps"] == 3 and summary["kept"] in ("trained", "untrained") and summary["final_loss"] == summary["final_loss"]  # not NaN
    return out


def test_a_few_training_steps_on_the_gpu_write_a_router(trained):
    from icl_router.model.router_dir import load_router_dir

    loaded = load_router_dir(trained, device="cuda", dtype=torch.bfloat16)
    assert next(loaded.router.lm.parameters()).device.type == "cuda" and loaded.router.lm.dtype == torch.bfloat16
    assert loaded.meta.decision is not None  # fitted on the rank-0 worker, not in the driver


def test_a_served_routed_request_with_the_router_on_its_gpu(trained):
    from icl_router.config import AuthConfig, ScorerServeConfig
    from icl_router.serving.app import free_port, start
    from icl_router.testing import served_root, tiny_serve_config

    with served_root("icl-gpu-") as root:
        router = ScorerServeConfig(path=str(trained), num_cpus=1, num_gpus=1)  # device/dtype auto: cuda, bfloat16
        cfg = tiny_serve_config(root, router=router, auth=AuthConfig(api_keys=["sk-gpu"], admin_keys=["sk-gpu-admin"]), port=free_port())
        base = start(cfg).removesuffix("/v1")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 900:  # bounded wait for the pool and the router
            try:
                with urllib.request.urlopen(base + "/ready", timeout=10) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = json.dumps({"model": "icl-router", "messages": [{"role": "user", "content": "What is 17 + 25?"}], "max_tokens": 4}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json", "authorization": "Bearer sk-gpu"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.headers["x-icl-router-route"] == "routed"
            assert json.loads(r.read())["choices"][0]["message"]["content"] is not None
