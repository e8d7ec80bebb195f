"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate | up) -> silu(gate) * up, [..., d]."""

    def __init__(self) -> None:
        super().__init__()
        # See layers/kernel_backend.py.
        self.kernel_backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_backend == "triton":
            from stage_worker.layers.triton_fused import silu_and_mul

            return silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
