"""The block-FP8 weight format in plain torch: float8_e4m3fn values with one float32 scale
(`weight_scale_inv`) per bn x bk block, as Hugging Face's fine-grained FP8 checkpoints hold
them. The reference path and the tests use these; layers/triton_fp8_matmul.py does the same
on the GPU."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """float8 [out, in] times its block scales [cdiv(out, bn), cdiv(in, bk)] -> [out, in] in
    `dtype` (the product is taken in float32 and rounded once)."""
    bn, bk = block
    out, inp = weight.shape
    # Each scale repeated over its block, the partial last blocks cut to the weight's size.
    scale = scale_inv.repeat_interleave(bn, dim=0)[:out].repeat_interleave(bk, dim=1)[:, :inp]
    return (weight.to(torch.float32) * scale).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn weight, float32 weight_scale_inv): each block scaled
    so its largest magnitude is float8's largest (448). The inverse of dequantize_block_fp8,
    up to float8 rounding; what checkpoints of this layout hold (and what tests write)."""
    bn, bk = block
    out, inp = weight.shape
    rows, cols = cdiv(out, bn), cdiv(inp, bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    padded[:out, :inp] = weight.float()
    blocks = padded.view(rows, bn, cols, bk)  # [rows, bn, cols, bk]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows, cols]
    scale_inv = amax / torch.finfo(FP8_DTYPE).max
    quantized = (blocks / scale_inv[:, None, :, None]).to(FP8_DTYPE)
    return quantized.view(rows * bn, cols * bk)[:out, :inp].contiguous(), scale_inv
