"""Both training stages as Ray Train + DeepSpeed jobs on real routing data (2 CPU workers, ZeRO-2)."""

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_router.config import AnchorsConfig, SplitConfig, TrainConfig
from icl_router.data.anchors import run_anchors
from icl_router.data.dataset import Dataset
from icl_router.data.embedder import BUNDLED, load_embedder
from icl_router.data.importers import import_dataset
from icl_router.model.router_dir import load_router_dir
from icl_router.routing.scorer import Scorer
from icl_router.train.driver import run_train

LLMROUTER_TRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routing" / "llmrouter" / "train.jsonl"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the tier marker comes from the directory (tests/conftest.py); each test here runs a minute or more

TINY = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1200}


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """240 real LLMRouter queries x 9 models, MiniLM embeddings, 18 anchors."""
    if not LLMROUTER_TRAIN.is_file():
        pytest.skip(f"real data {LLMROUTER_TRAIN} is absent")
    root = tmp_path_factory.mktemp("train")
    lines = LLMROUTER_TRAIN.read_text().splitlines()[::20][:240]  # every 20th: all tasks
    src = root / "train.jsonl"
    src.write_text("\n".join(lines) + "\n")
    ds = import_dataset("llmrouter", [str(src)], root / "data")
    q = ds.read_queries()
    emb = load_embedder(BUNDLED).encode(q.column("text").to_pylist(), batch_size=32, normalize_embeddings=True)
    import pyarrow as pa

    ds.append_embeddings(
        pa.table({"query_id": q.column("query_id"), "embedding": pa.array(list(emb), pa.list_(pa.float32(), 384)), "embedder": [BUNDLED] * len(q)})
    )
    run_anchors(AnchorsConfig(dataset=str(ds.root), k=16, split=SplitConfig(name="given")))
    return ds


def registered_checkpoints(storage: Path) -> list[str]:
    """Checkpoints the Ray Train controller has registered (a folder on disk may not be yet)."""
    try:
        snap = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [c["checkpoint_dir_name"] for c in snap.get("checkpoint_results", [])]


def train_workers_of_this_cluster():
    """RayTrainWorker processes under this session's raylet (other Ray clusters may run on the machine)."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    raylets = [p for p in psutil.process_iter(["cmdline"]) if any("raylet" in c for c in (p.info["cmdline"] or [])[:1])
               and any(session in c for c in p.info["cmdline"] or [])]
    return [c for r in raylets for c in r.children(recursive=True) if "RayTrainWorker" in " ".join(c.cmdline())]


def config(ds: Dataset, out, *, stage, **kw) -> TrainConfig:
    base = {
        "stage": stage,
        "dataset": str(ds.root),
        "output": str(out),
        "router": {"tiny": TINY, "query_input": "vector", "profile_layout": "pairs"},
        "split": {"name": "given"},
        "phases": [{"epochs": 1, "lr_projector": 1e-3, "lr_router": 0.0}, {"epochs": 1, "lr_projector": 1e-3, "lr_router": 1e-3}],
        "batch_size": 16,
        "max_text_tokens": 32,
        "scaling": {"num_workers": 2},
        "deepspeed": {"zero_stage": 2},
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_both_stages_write_a_loadable_router(ray_local, real_data, tmp_path):
    s1 = run_train(config(real_data, tmp_path / "r1", stage=1, checkpoint_every=100))
    assert s1["steps"] > 0 and s1["workers"] == 2 and s1["zero_stage"] == 2
    first = load_router_dir(tmp_path / "r1")
    s2 = run_train(config(real_data, tmp_path / "r2", stage=2, init_from=str(tmp_path / "r1"), max_steps=12, checkpoint_every=100,
                          phases=[{"epochs": 2, "lr_projector": 1e-3, "lr_router": 1e-3}],
                          router={"tiny": TINY, "query_input": "vector", "profile_layout": "pairs", "anchor_evidence": True}))
    assert s2["steps"] == 12 and np.isfinite(s2["final_loss"])
    loaded = load_router_dir(tmp_path / "r2")
    meta = json.loads((tmp_path / "r2" / "icl_router.json").read_text())
    assert meta["stage"] == 2 and meta["extra"]["steps"] == 12 and len(meta["anchor_query_ids"]) == 16
    # the pool holds every model with its real outcomes on the anchors
    anchors = meta["anchor_query_ids"]
    want = real_data.correctness(anchors, sorted(loaded.pool)) >= 0.5  # [K, M]
    assert sorted(loaded.pool) == real_data.model_ids() and len(loaded.pool) == 9
    np.testing.assert_array_equal(np.stack([loaded.pool[m] for m in sorted(loaded.pool)], 1), want)
    # stage 2 started from stage 1 and trained on: weights moved, both stages' projectors differ
    trained = load_router_dir(Path(s2["checkpoint"]) / "router")  # what training exported, before the held-out check
    p1 = first.router.projector.inp.weight
    p2 = trained.router.projector.inp.weight
    assert (p1 - p2).abs().max().item() > 1e-5  # Adam steps move weights far more than float noise
    # the anchor-evidence head trained under ZeRO-2 with the projector and was exported with it
    moved = (trained.router.evidence.weight - torch.tensor([0.0, 1.0, 0.0, 0.0])).abs().max().item()
    assert meta["anchor_evidence"] and moved > 1e-5  # by more than float noise
    # the better of the trained and the untrained router on held-out queries was kept, with its decision layer
    assert s2["kept"] in ("trained", "untrained") and set(s2["val_acc"]) == {"trained", "untrained"}
    assert meta["decision"]["tau"] > 0 and meta["decision"]["fitted"]["rows"] > 0
    if s2["kept"] == "untrained":
        assert loaded.router.evidence.lm_silent and meta["extra"]["kept"] == "untrained"
    p = Scorer(loaded.router, loaded.pool).score(["What is 2+2?"], query_emb=torch.randn(1, 384))
    assert p.shape == (1, 9) and bool(((p > 0) & (p < 1)).all())


def test_killed_worker_resumes_from_checkpoint_and_ends_at_the_same_step(ray_local, real_data, tmp_path):
    cfg = config(real_data, tmp_path / "r", stage=2, max_steps=24, checkpoint_every=6, max_failures=2,
                 phases=[{"epochs": 3, "lr_projector": 1e-3, "lr_router": 1e-3}])
    storage = tmp_path / "r.runs" / "stage2"
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if registered_checkpoints(storage):  # the controller holds one: a restart can resume from it
                workers = train_workers_of_this_cluster()
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed["pid"] = workers[-1].pid
                    return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_train(cfg)
    t.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert summary["steps"] == 24
    assert summary["resumed_from"] >= 6 and summary["resumed_from"] % 6 == 0
    assert load_router_dir(tmp_path / "r").meta.extra["steps"] == 24
    # both ranks' ZeRO-2 optimizer shards are in the one checkpoint folder a resume reads
    assert len(list((Path(summary["checkpoint"]) / "ds").glob("*optim_states.pt"))) == 2


def test_deepspeed_zero2_keeps_a_part_at_rate_zero_frozen_for_its_phase(monkeypatch, tiny_router_lm):
    """The Ray Train workers' engine (ZeRO-2, torch AdamW from make_optimizer) on one rank, in this
    process: the part a phase gives rate 0 computes no gradient and stays put, then trains.
    Both cases share one process group: DeepSpeed caches its groups for the process."""
    import socket

    import deepspeed
    import torch.distributed as dist

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.testing import SAMPLE_QUERIES as Q
    from icl_router.train.data import TrainData
    from icl_router.train.loop import make_optimizer, train_steps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)  # as train_loop does
    lm, tok = tiny_router_lm  # trained below on deep copies only
    g = torch.Generator().manual_seed(0)
    data = TrainData(
        items=np.array([[q, m, int(torch.rand(1, generator=g) < 0.5)] for q in range(len(Q)) for m in range(2)]),
        texts=Q,
        embeddings=torch.randn(len(Q), 24, generator=g).numpy(),
        anchor_emb=torch.randn(6, 24, generator=g).numpy(),
        profiles=(torch.rand(2, 6, generator=g) < 0.5).numpy(),
        models=["a", "b"],
    )
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 2}, "steps_per_print": 1 << 30}
    try:
        for frozen in ("lm", "projector"):
            router = ICLRouter(copy.deepcopy(lm), PromptLayout(tok, query_input="vector"), anchor_emb=torch.as_tensor(data.anchor_emb), anchor_evidence=True)
            router.train()  # the shared LM is in eval mode; training runs in train mode
            with torch.no_grad():  # an LM that speaks: at lm_weight 0 (a fresh head) the LM gets no gradient to move by
                router.evidence.lm_weight.fill_(1.0)
            first = {"lr_projector": 0.0, "lr_router": 1e-2} if frozen == "projector" else {"lr_projector": 1e-2, "lr_router": 0.0}
            cfg = TrainConfig(stage=2, dataset="<in-memory>", output="<unused>", batch_size=4,
                              phases=[{"epochs": 2, **first}, {"epochs": 1, "lr_projector": 1e-2, "lr_router": 1e-2}])
            engine, *_ = deepspeed.initialize(model=router, optimizer=make_optimizer(router, cfg), config=ds_config)
            frozen_names = {n for n, _ in router.named_parameters() if n.startswith("lm.") == (frozen == "lm")}
            before = {n: p.detach().clone() for n, p in router.named_parameters()}
            phases = []
            for r in train_steps(cfg, engine, data):
                phases.append(r.phase)
                moved = {n for n, p in router.named_parameters() if not torch.equal(p.detach(), before[n])}
                if r.phase == 1:
                    assert moved and not moved & frozen_names, (frozen, r.step, sorted(moved & frozen_names))
                    assert not any(p.requires_grad for n, p in router.named_parameters() if n in frozen_names)
            assert phases.count(1) >= 2 and phases.count(2) >= 1
            assert moved >= frozen_names, frozen  # phase 2 trained the part phase 1 froze
    finally:
        dist.destroy_process_group()
