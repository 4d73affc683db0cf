"""The one device rule for the router LM: serving, training and evaluation all resolve through it.

``device: auto`` is cuda when the process sees a GPU (a serving replica that asked for one, a Ray
Train worker with ``use_gpu``, an evaluation on a GPU machine), else cpu; ``dtype: auto`` is
bfloat16 on cuda and float32 on cpu. An explicit cuda where no GPU is visible is an error that says
what to change, never a silent fall back to the CPU (a 7B router on CPU is tens of GB of memory
beside an idle GPU). Pure torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import torch

from icl_router.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(UserError):
    """A device or dtype the process cannot honour."""


def resolve_device(device: str, *, cuda: bool | None = None, where: str = "router.device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> the torch device; ``cuda``: whether a GPU is visible (default: ask torch)."""
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    if device == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        raise DeviceError(f"{where} is cuda but this process sees no GPU: give it one (num_gpus / scaling.use_gpu), or set {where}: auto or cpu")
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"{where} must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, *, where: str = "router.dtype") -> torch.dtype:
    """``auto`` -> bfloat16 on cuda, float32 on cpu; a named dtype as it is."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"{where} must be auto or one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve(device: str = "auto", dtype: str = "auto", *, cuda: bool | None = None, where: str = "router") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the router LM under the rule; ``where`` prefixes the config keys in errors."""
    dev = resolve_device(device, cuda=cuda, where=f"{where}.device")
    return dev, resolve_dtype(dtype, dev, where=f"{where}.dtype")
