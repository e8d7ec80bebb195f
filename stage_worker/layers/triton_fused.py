"""Fused Triton kernels for the small per-layer ops: RMSNorm (with and without the residual
add), rotary embedding and SiluAndMul.

Why: a batch-1 decode step is launch-bound on the GPU. The torch versions of these ops
(layernorm.py, rotary_embedding.py, activation.py, which stay the CPU path and the test
oracle) launch one tiny elementwise kernel per torch op, ~2 us each even inside a CUDA
graph. Each function here is one launch.

Numerics follow the torch modules rounding step for rounding step, so half-precision outputs
equal them (see the tests for what is checked where):
- every elementwise torch op on bf16/fp16 computes in float32 and rounds once to the model
  dtype, so each such op here is `(a.to(f32) OP b.to(f32)).to(dtype)`;
- the kernels are compiled with enable_fp_fusion=False: torch rounds each product before
  the following add, which an FMA contraction would not do;
- exp and 1/sqrt use libdevice on the GPU (what torch's CUDA kernels call, not Triton's
  faster approximations), and divisions are IEEE (tl.math.div_rn).
What cannot match bit for bit is the float32 sum of squares of RMSNorm: torch and Triton add
in different orders, so the variance can differ in its last bits; after rounding to bf16
that shows as at most 1 ulp on a few elements.

All wrappers allocate new outputs, read nothing back to the host and size the grid from
tensor shapes only (one program per token row; SiluAndMul one per row and column block),
so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from stage_worker.layers.triton_interpreter import fix_loop_bounds_for_numpy_2_4, interpreting

if interpreting():
    fix_loop_bounds_for_numpy_2_4()

# Largest chunk of a row one program holds at a time: 4096 elements is a Llama-3-8B hidden
# row in registers at 8 warps; wider rows (8192, the 14336 MLP) loop over chunks.
MAX_BLOCK = 4096


@triton.jit
def _rsqrt(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.rsqrt(x)  # rsqrtf, as torch.rsqrt on CUDA
    return tl.rsqrt(x)  # the interpreter's 1 / sqrt(x), as torch.rsqrt on CPU


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)  # expf; tl.exp on the GPU is a coarser ex2.approx
    return tl.exp(x)


@triton.jit
def _load_row(x_row, res_row, new_res_row, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr):
    """A chunk of the row the norm sees: x, or x + residual rounded to the model dtype."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_row + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        if STORE_RESIDUAL:
            tl.store(new_res_row + offs, x, mask=mask)
    return x


@triton.jit
def _store_normed(s, scale, w_ptr, out_row, offs, mask):
    # torch: weight * (x32 * rsqrt).to(dtype): the normalised value is rounded to the model
    # dtype first, then the product with the weight is rounded again.
    normed = (s.to(tl.float32) * scale).to(s.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_row + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(s.dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_new_res,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_res
    out_row = out_ptr + row * stride_out
    new_res_row = new_res_ptr + row * stride_new_res
    if HIDDEN <= BLOCK:
        # The whole row stays in registers between the statistics and the scaling.
        offs = tl.arange(0, BLOCK)
        mask = offs < HIDDEN
        s = _load_row(x_row, res_row, new_res_row, offs, mask, HAS_RESIDUAL, True)
        s32 = s.to(tl.float32)
        variance = tl.math.div_rn(tl.sum(s32 * s32, axis=0), HIDDEN * 1.0)
        _store_normed(s, _rsqrt(variance + eps, LIBDEVICE), w_ptr, out_row, offs, mask)
    else:
        # Two passes over the row; the second reloads (from cache) and redoes the add rather
        # than reading back the residual this program just stored.
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HIDDEN
            s32 = _load_row(x_row, res_row, new_res_row, offs, mask, HAS_RESIDUAL, True).to(tl.float32)
            acc += s32 * s32
        variance = tl.math.div_rn(tl.sum(acc, axis=0), HIDDEN * 1.0)
        scale = _rsqrt(variance + eps, LIBDEVICE)
        for start in range(0, HIDDEN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HIDDEN
            s = _load_row(x_row, res_row, new_res_row, offs, mask, HAS_RESIDUAL, False)
            _store_normed(s, scale, w_ptr, out_row, offs, mask)


def _launch_config(width: int, max_block: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `width` elements: about 16 elements per thread."""
    block = min(triton.next_power_of_2(width), triton.next_power_of_2(max_block))
    return block, min(max(block // 512, 1), 8)


def _use_libdevice(x: torch.Tensor) -> bool:
    return x.is_cuda and not interpreting()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit stride along the last dim (a view where possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])  # [rows, width]


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, everything else] with a unit stride along the last dim."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(x.shape[0], -1)  # [tokens, heads * head_dim]


def _rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, max_block: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit x [..., {hidden}] {x.dtype}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} differs from x {tuple(x.shape)}")
        res2 = _rows(residual)
        new_res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        res2, new_res = x2, out  # placeholders, never touched (HAS_RESIDUAL is off)
    if x2.shape[0] > 0:
        block, num_warps = _launch_config(hidden, max_block)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            res2,
            weight.contiguous(),
            out,
            new_res,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            new_res.stride(0),
            eps,
            HIDDEN=hidden,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            LIBDEVICE=_use_libdevice(x),
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    out = out.view(x.shape)
    return out, (new_res.view(x.shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """RMSNorm.forward(x): x [..., hidden], weight [hidden] in x's dtype -> [..., hidden].
    max_block caps the chunk a program holds (tests lower it to exercise the chunk loop)."""
    return _rms_norm(x, None, weight, eps, max_block)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, max_block: int = MAX_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward(x, residual): s = x + residual (in x's dtype); returns (norm(s), s), both
    new tensors (x and residual are left as they are)."""
    out, new_res = _rms_norm(x, residual, weight, eps, max_block)
    assert new_res is not None
    return out, new_res


@triton.jit
def _rotate_heads(src_row, dst_row, cos, sin, j, j_mask, NUM_HEADS, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates one token's heads (contiguous, HEAD_DIM apart) into dst_row, NeoX halves."""
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < NUM_HEADS) & j_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
    offs = h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(src_row + offs, mask=mask, other=0.0)
    x2 = tl.load(src_row + offs + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # Each torch op rounds to the model dtype: x1*cos, x2*sin, then their difference.
    x1_cos = (x1 * cos[None, :]).to(dt).to(tl.float32)
    x2_sin = (x2 * sin[None, :]).to(dt).to(tl.float32)
    x2_cos = (x2 * cos[None, :]).to(dt).to(tl.float32)
    x1_sin = (x1 * sin[None, :]).to(dt).to(tl.float32)
    tl.store(dst_row + offs, (x1_cos - x2_sin).to(dt), mask=mask)
    tl.store(dst_row + offs + HALF, (x2_cos + x1_sin).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_q,
    stride_k,
    stride_q_out,
    stride_k_out,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_k_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # Positions past the tables read out of bounds (torch would raise); checking would need
    # a host sync, so the caller guarantees positions < max_position.
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HEAD_DIM // 2
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=j_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + j, mask=j_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q, q_out_ptr + token * stride_q_out, cos, sin, j, j_mask,
                  num_q_heads, HEAD_DIM, BLOCK_HQ)
    _rotate_heads(k_ptr + token * stride_k, k_out_ptr + token * stride_k_out, cos, sin, j, j_mask,
                  num_k_heads, HEAD_DIM, BLOCK_HK)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RotaryEmbedding.forward: positions [n] (any order), query [n, heads * head_dim], key
    [n, kv_heads * head_dim] (may be row-strided views, e.g. splits of the fused qkv output),
    cos/sin tables [max_position, head_dim // 2] in the model dtype. Returns new contiguous
    (q_out, k_out); query and key are not modified."""
    if head_dim % 2 or query.shape[-1] % head_dim or key.shape[-1] % head_dim:
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} not whole heads of {head_dim}")
    if not (query.dtype == key.dtype == cos_table.dtype == sin_table.dtype):
        raise ValueError("query, key and the cos/sin tables must share the model dtype")
    if cos_table.shape[-1] != head_dim // 2 or sin_table.shape[-1] != head_dim // 2:
        raise ValueError(f"cos/sin tables {tuple(cos_table.shape)} are not [max_position, {head_dim // 2}]")
    q2, k2 = _token_rows(query), _token_rows(key)  # [n, heads * head_dim], [n, kv_heads * head_dim]
    positions = positions.contiguous()
    cos_t, sin_t = _rows(cos_table), _rows(sin_table)
    q_out = torch.empty(q2.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(k2.shape, dtype=key.dtype, device=key.device)
    num_tokens = q2.shape[0]
    if num_tokens > 0:
        num_q_heads, num_k_heads = q2.shape[1] // head_dim, k2.shape[1] // head_dim
        block_half = triton.next_power_of_2(head_dim // 2)
        block_hq = triton.next_power_of_2(num_q_heads)
        _rotary_kernel[(num_tokens,)](
            positions,
            q2,
            k2,
            cos_t,
            sin_t,
            q_out,
            k_out,
            q2.stride(0),
            k2.stride(0),
            q_out.stride(0),
            k_out.stride(0),
            cos_t.stride(0),
            sin_t.stride(0),
            num_q_heads,
            num_k_heads,
            HEAD_DIM=head_dim,
            BLOCK_HQ=block_hq,
            BLOCK_HK=triton.next_power_of_2(num_k_heads),
            BLOCK_HALF=block_half,
            num_warps=min(max(block_hq * block_half // 512, 1), 8),
            enable_fp_fusion=False,
        )
    return q_out.view(query.shape), k_out.view(key.shape)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, D: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr
):
    # Program (row, column block): a single row (batch-1 decode) spreads over many programs.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + offs, mask=mask, other=0.0)
    up = tl.load(x_row + D + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # F.silu: x / (1 + exp(-x)) in float32, rounded once; then the multiply rounds again.
    silu = tl.math.div_rn(g, 1.0 + _exp(-g, LIBDEVICE)).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


# Columns per SiluAndMul program: 1024 is 8 elements (16 bytes of bf16) per thread at 4 warps;
# a [1, 2 * 14336] Llama-3-8B row is 14 programs.
SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor, *, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """SiluAndMul: x [..., 2 * d] (gate | up) -> silu(gate) * up, a new [..., d] tensor.
    max_block caps the columns a program handles (tests lower it to cover several blocks)."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim {x.shape[-1]} of x is not 2 * d")
    d = x.shape[-1] // 2
    x2 = _rows(x)  # [rows, 2 * d]
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(triton.next_power_of_2(d), triton.next_power_of_2(max_block), SILU_BLOCK)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            D=d,
            BLOCK=block,
            LIBDEVICE=_use_libdevice(x),
            num_warps=min(max(block // 256, 1), 4),
            enable_fp_fusion=False,
        )
    return out.view(*x.shape[:-1], d)
