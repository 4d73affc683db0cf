"""Projector: maps a frozen sentence embedding into the router LM's input-embedding space."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class Projector(nn.Module):
    """RMSNorm -> Linear(in_dim, out_dim) -> residual SwiGLU block.

    The norm makes embedders of different scales interchangeable; the residual
    keeps the linear map as the starting point the SwiGLU refines. ``out_rms``
    sets the initial output scale, e.g. to the LM's token-embedding RMS, so a
    projected vector starts as large as a token (not ~50x larger, which drowns
    the label embedding added in the fused layout and is out of distribution
    for a pretrained LM).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_mult: int = 2, out_rms: float | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = nn.RMSNorm(in_dim)
        self.inp = nn.Linear(in_dim, out_dim)
        self.w1 = nn.Linear(out_dim, hidden_mult * out_dim, bias=False)
        self.w3 = nn.Linear(out_dim, hidden_mult * out_dim, bias=False)
        self.w2 = nn.Linear(hidden_mult * out_dim, out_dim, bias=False)
        if out_rms is not None:
            with torch.no_grad():
                # unit-RMS input -> output RMS ~ ||row|| of the weight; the SwiGLU branch starts at zero
                self.inp.weight.mul_(out_rms / self.inp.weight.norm(dim=1).mean())
                self.inp.bias.zero_()
                self.w2.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_dim] -> [..., out_dim]
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects embeddings of width {self.in_dim}, got {x.shape[-1]}")
        h = self.inp(self.norm(x.to(self.inp.weight.dtype)))  # [..., out]
        return h + self.w2(functional.silu(self.w1(h)) * self.w3(h))  # [..., out]
