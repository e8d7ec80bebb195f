"""Block-FP8 linear layer on the GPU: y = x W^T with W float8_e4m3fn in bn x bk blocks of
float32 scales, x quantized to FP8 per token and bk-column group at run time (the
checkpoint's `activation_scheme: dynamic`), FP8 tensor-core products accumulated in float32.

One launch per layer: each program quantizes the activation tile it loads (its rows' amax
over one bk group, / 448) instead of a separate quantization kernel writing x_fp8 and its
scales to memory first. The quantization is a few operations per element against BLOCK_N
multiply-adds per element in the product, so repeating it in every program that shares
the rows costs little, and at decode batch sizes (a handful of rows) it saves a launch per
linear layer, which is what a batch-1 step is bound by.

Small batches read the weight once and compute almost nothing (memory bound): the grid then
splits K as well (SPLIT_K partial sums in float32, added by one torch sum), so that every
SM streams part of the weight; larger batches use bigger tiles and no split.

For many rows (prefill) these tiles reach a third of cuBLAS's bf16 rate (docs/benchmarks.md),
so the serving path widens the weight there instead: `dequantize_block_fp8_triton`, one
program per scale block.

The launches read nothing back to the host and size everything from shapes: CUDA graphs
capture them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from stage_worker.layers.block_fp8 import dequantize_block_fp8
from stage_worker.layers.triton_interpreter import fix_loop_bounds_for_numpy_2_4, interpreting

if interpreting():
    fix_loop_bounds_for_numpy_2_4()

FP8_MAX = 448.0
# The smallest activation scale: an all-zero group quantizes to zeros instead of NaN.
MIN_SCALE = 1e-12
# The same two as compile-time constants, the only globals a kernel may read.
_FP8_MAX_C = tl.constexpr(FP8_MAX)
_MIN_SCALE_C = tl.constexpr(MIN_SCALE)


@triton.jit
def _fp8_block_matmul_kernel(
    x_ptr, w_ptr, w_scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_split, stride_om,
    GROUP_N: tl.constexpr,  # weight rows per scale (bn)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K == bk
    K_STEPS_PER_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    first_step = split * K_STEPS_PER_SPLIT
    # [BLOCK_M, BLOCK_K] activation tile and [BLOCK_K, BLOCK_N] weight tile (W is [N, K]).
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (first_step * BLOCK_K + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (first_step * BLOCK_K + offs_k)[:, None]
    # Scale row of each output column: one scale covers GROUP_N rows of W.
    s_ptrs = w_scale_ptr + (offs_n // GROUP_N) * stride_sn + first_step
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first_step, first_step + K_STEPS_PER_SPLIT):
        k_left = K - step * BLOCK_K
        if k_left > 0:
            k_mask = offs_k < k_left
            x = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
            w_scale = tl.load(s_ptrs, mask=mask_n, other=0.0)
            # Dynamic per-token, per-group quantization of the activation tile.
            x_scale = tl.maximum(tl.max(tl.abs(x), axis=1) / _FP8_MAX_C, _MIN_SCALE_C)  # [BLOCK_M]
            x_fp8 = (x / x_scale[:, None]).to(w.dtype)
            acc += tl.dot(x_fp8, w) * (x_scale[:, None] * w_scale[None, :])
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        s_ptrs += 1
    out_ptrs = out_ptr + split * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(
    w_ptr, scale_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # one scale block (bn x bk)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + pid_n * stride_sn + pid_k)
    out = (w.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], out, mask=mask)


def dequantize_block_fp8_triton(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """dequantize_block_fp8 in one launch (one program a scale block): [N, K] in `dtype`."""
    bn, bk = block
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequantize_kernel[grid](
        weight, weight_scale_inv, out, n, k, weight.stride(0), weight_scale_inv.stride(0), out.stride(0),
        BLOCK_N=bn, BLOCK_K=bk,
    )
    return out


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int, n: int, k_steps: int, num_sms: int) -> MatmulConfig:
    """Tiles for an [m, K] x [K, n] product of k_steps K-blocks (measured on H100/H200, see
    benchmarks/fp8_matmul_bench.py and docs/benchmarks.md)."""
    if m <= 16:
        block_m, block_n, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        block_m, block_n, warps, stages = 64, 64, 4, 4
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    tiles = -(-m // block_m) * -(-n // block_n)
    split = 1
    # Memory-bound shapes: split K until about two programs per SM stream the weight, each
    # keeping at least 4 K-blocks so the pipeline has something to overlap.
    while tiles * split < 2 * num_sms and k_steps // (split * 2) >= 4:
        split *= 2
    return MatmulConfig(block_m, block_n, split, warps, stages)


def fp8_block_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int],
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ (weight [N, K] fp8 * scales [cdiv(N, bn), cdiv(K, bk)])^T
    -> [..., N] in x's dtype."""
    bn, bk = block
    assert weight.dtype == torch.float8_e4m3fn and weight_scale_inv.dtype == torch.float32
    assert bk in (16, 32, 64, 128, 256), f"FP8 block of {bk} columns has no kernel tile"
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    k_steps = -(-k // bk)
    num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 8
    cfg = config or choose_config(m, n, k_steps, num_sms)
    steps_per_split = -(-k_steps // cfg.split_k)
    if cfg.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_split = 0
    else:
        # [split_k, M, N] float32 partial sums, added below.
        out = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device)
        stride_split = out.stride(0)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _fp8_block_matmul_kernel[grid](
        x2, weight, weight_scale_inv, out,
        m, n, k,
        x2.stride(0), weight.stride(0), weight_scale_inv.stride(0), stride_split, out.stride(-2),
        GROUP_N=bn, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        K_STEPS_PER_SPLIT=steps_per_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.split_k > 1:
        out = out.sum(dim=0).to(x.dtype)
    return out.reshape(*lead, n)


def reference_fp8_block_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """What the kernel computes, in plain torch float32: x quantized per token and bk-group,
    times the dequantized weight (the kernel's test oracle)."""
    bn, bk = block
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    groups = -(-k // bk)
    padded = torch.nn.functional.pad(x2, (0, groups * bk - k)).view(x2.shape[0], groups, bk)  # [M, groups, bk]
    scale = (padded.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # [M, groups, 1]
    x_q = (padded / scale).to(torch.float8_e4m3fn).float() * scale
    x_dq = x_q.view(x2.shape[0], groups * bk)[:, :k]
    w = dequantize_block_fp8(weight, weight_scale_inv, block, torch.float32)
    return (x_dq @ w.t()).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
