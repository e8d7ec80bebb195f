"""RMSNorm with the residual add fused in (vLLM's (hidden, residual) convention)."""

from __future__ import annotations

import torch
from torch import nn

from stage_worker.layers.linear import Loaded, check_loaded_shape, new_parameter


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = new_parameter((hidden_size,), dtype, device)
        self.weight.weight_loader = self.weight_loader
        # See layers/kernel_backend.py.
        self.kernel_backend = "reference"

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, (self.hidden_size,), "norm weight")
        param.data.copy_(loaded[:])

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics in float32, the scale in the model dtype: the same rounding steps
        # as transformers' LlamaRMSNorm, so half-precision outputs match it bit for bit.
        input_dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Without residual: norm(x). With residual: s = x + residual; returns (norm(s), s)."""
        if self.kernel_backend == "triton":
            from stage_worker.layers import triton_fused

            if residual is None:
                return triton_fused.rms_norm(x, self.weight, self.eps)
            return triton_fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
