"""The one device rule (model/device.py) and where it applies: the serving router, training, evaluation.

On this CPU machine the tests check the rule itself (with a GPU pretended visible), the configs that
carry it, a router loaded in bfloat16 scoring like float32, and that the training driver never
loads a router LM. tests/gpu runs the same paths on a GPU when one is there."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_router.config import ConfigError, ServeConfig, TrainConfig, load_config
from icl_router.model.device import DeviceError, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "device, dtype, cuda, want",
    [
        ("auto", "auto", True, ("cuda", torch.bfloat16)),  # a replica or worker with a GPU: cuda in bf16
        ("auto", "auto", False, ("cpu", torch.float32)),
        ("cpu", "auto", True, ("cpu", torch.float32)),  # asked for on purpose
        ("auto", "float32", True, ("cuda", torch.float32)),
        ("cpu", "bfloat16", False, ("cpu", torch.bfloat16)),
    ],
)
def test_the_rule(device, dtype, cuda, want):
    dev, dt = resolve(device, dtype, cuda=cuda)
    assert (dev.type, dt) == want


def test_cuda_without_a_gpu_is_refused_not_moved_to_the_cpu():
    with pytest.raises(DeviceError, match=r"^router\.device is cuda but this process sees no GPU.*router\.device: auto or cpu"):
        resolve("cuda", "auto", cuda=False)
    with pytest.raises(DeviceError, match=r"router\.dtype must be auto or one of"):
        resolve("cpu", "int8", cuda=False)


def test_training_configs_follow_the_rule():
    gpu = [load_config(TrainConfig, REPO / f"jobs/train-stage{s}/config.gpu.yaml") for s in (1, 2)]
    cpu = [load_config(TrainConfig, REPO / f"jobs/train-stage{s}/config.yaml") for s in (1, 2)]
    assert [c.train_dtype for c in gpu] == ["bfloat16", "bfloat16"] and [c.train_dtype for c in cpu] == ["float32", "float32"]
    base = {"stage": 2, "dataset": "/d", "output": "/o"}
    bad = {
        "router.device is cuda but scaling.use_gpu is false": {"router": {"device": "cuda"}},
        "router.device is cpu with scaling.use_gpu: true": {"router": {"device": "cpu"}, "scaling": {"use_gpu": True}},
        "bfloat16 training .* needs scaling.use_gpu=true": {"router": {"dtype": "bfloat16"}},
        "router.dtype float16 is for serving": {"router": {"dtype": "float16"}, "scaling": {"use_gpu": True}},
        r"deepspeed.bf16=False disagrees with router.dtype='bfloat16'": {"deepspeed": {"bf16": False}, "router": {"dtype": "bfloat16"}, "scaling": {"use_gpu": True}},
    }
    for msg, extra in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config(TrainConfig, None, [f"{k}={v}" for k, v in base.items()] + [f"{k}={v}" for k, v in _flat(extra).items()])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_the_production_router_replica_loads_on_its_gpu_in_bf16():
    prod = load_config(ServeConfig, REPO / "serve" / "production.yaml")
    assert prod.router.num_gpus >= 1 and (prod.router.device, prod.router.dtype) == ("auto", "auto")
    dev, dt = resolve(prod.router.device, prod.router.dtype, cuda=True)  # what its replica, which sees its GPU, resolves
    assert (dev.type, dt) == ("cuda", torch.bfloat16)
    demo = load_config(ServeConfig, REPO / "serve" / "demo.yaml")
    assert resolve(demo.router.device, demo.router.dtype, cuda=False)[0].type == "cpu"
    with pytest.raises(ConfigError, match="router.device is cuda but router.num_gpus is 0"):
        load_config(ServeConfig, REPO / "serve" / "demo.yaml", ["router.device=cuda"])


def test_evaluation_trains_where_the_rule_says(monkeypatch):
    from icl_router.config import EvalRouterConfig
    from icl_router.evaluation.run import train_config

    assert train_config(EvalRouterConfig(), seed=0).train_dtype == "float32"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = train_config(EvalRouterConfig(), seed=0)
    assert cfg.scaling.use_gpu and cfg.train_dtype == "bfloat16"


def test_a_router_loaded_in_bf16_scores_like_float32(tmp_path):
    """The serving path under dtype bfloat16 (here on the CPU): LM weights in bf16, the evidence head kept in
    float32, p within bf16's rounding of the float32 router's."""
    import os

    from icl_router.model.router_dir import load_router_dir
    from icl_router.routing.online import OnlineRouter
    from icl_router.testing import make_tiny_router_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = make_tiny_router_dir(tmp_path / "router", k=8)
    loaded = load_router_dir(path, dtype=torch.bfloat16)
    assert loaded.router.lm.dtype == torch.bfloat16 and loaded.router.evidence.weight.dtype == torch.float32
    prof = {"tiny-a": [bool(i % 2) for i in range(8)], "tiny-b": [bool(i % 3) for i in range(8)]}
    out = {}
    for dtype in ("float32", "bfloat16"):
        r = OnlineRouter(path, scoring="full", device="cpu", dtype=dtype)
        assert (r.device.type, r.dtype) == ("cpu", getattr(torch, dtype))
        r.sync(prof)
        out[dtype] = r.score(["What is 17 + 25?", "Name a prime."]).p
    # bf16 keeps 8 bits of mantissa: p moves by a few hundredths at most on a random tiny router
    assert np.abs(out["float32"] - out["bfloat16"]).max() < 0.05


def test_the_training_driver_never_loads_a_router_lm():
    """run_train (the driver) builds no router and loads no LM: the export and the keep-or-not check run in
    the rank-0 worker (train_loop, through report_checkpoint), on its device."""
    from icl_router.train import driver

    def called(fn) -> set[str]:
        tree = ast.parse(inspect.getsource(fn))
        return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "") for n in ast.walk(tree) if isinstance(n, ast.Call)}

    loads = {"load_router_dir", "load_router_lm", "build_router", "keep_and_fit_decision", "from_pretrained", "Scorer"}
    assert not called(driver.run_train) & loads
    assert "build_router" in called(driver.train_loop) and "report_checkpoint" in called(driver.train_loop)
    assert "keep_and_fit_decision" in called(driver.report_checkpoint)
