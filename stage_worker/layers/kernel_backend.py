"""Which kernels a stage's layers run: the plain-torch reference or the Triton fast path.

"reference": every layer in plain torch, on CPU and GPU; it is what the parity tests hold
to transformers, and what the fast path is tested against. "triton": paged attention
(layers/triton_attention.py) and the fused small ops of each layer, RMSNorm with its
residual add, rotary and SiluAndMul (layers/triton_fused.py), one launch each: a decode
step of a large model at small batch is otherwise bound by launching ~40 kernels a layer.
The matrix products stay torch's (cuBLAS) either way.
"""

from __future__ import annotations

import os

import torch
from torch import nn

KERNEL_BACKENDS = ("auto", "reference", "triton")


def resolve_kernel_backend(requested: str, device: torch.device) -> str:
    """"auto" is Triton on CUDA (when Triton is importable) and the reference elsewhere."""
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; choose one of {KERNEL_BACKENDS}")
    if requested == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernel backend needs a CUDA device (or TRITON_INTERPRET=1)")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reference"
    return "triton"


def set_kernel_backend(model: nn.Module, backend: str) -> None:
    """Every module of `model` that has both paths (a `kernel_backend` attribute) takes `backend`."""
    assert backend in ("reference", "triton"), backend
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = backend
