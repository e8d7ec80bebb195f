"""One tile of the paged K/V cache as both attention kernels read it (triton_attention.py's
general kernel, triton_decode_attention.py's split-KV decode): the block table maps each key
position to its cache row, masked rows read 0, and an FP8 cache is dequantized on the way
(layer_kv_cache.py: a float32 scale per (token, kv head) row).

K's scale is one factor per key, so it multiplies the Q.K^T column (exact). V's scale is one
factor per key too: the caller multiplies P's columns by it before the P.V dot, which costs
a [rows, keys] product instead of a [keys, head_dim] one. A float16 model cannot hold P
times a small scale, so there the V tile is scaled here instead and its factor is 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from stage_worker.layers.layer_kv_cache import FP8_KV_MAX, FP8_KV_MIN_SCALE

# layer_kv_cache's constants, as the kernels read them.
KV_FP8_MAX = tl.constexpr(FP8_KV_MAX)
KV_FP8_MIN_SCALE = tl.constexpr(FP8_KV_MIN_SCALE)


@triton.jit
def kv_tile_scores(
    q,
    k_pos,
    k_valid,
    table_row,
    block_size,
    kv_head,
    d,
    d_valid,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_sb,
    stride_ss,
    stride_sh,
    scale_log2,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The keys at positions k_pos [BLOCK_N] (k_valid masking them) of the sequence whose
    block-table row starts at table_row, for kv head kv_head, against q [BLOCK_M, BLOCK_D] ->
    (s [BLOCK_M, BLOCK_N]: base-2 logits, not yet masked; v [BLOCK_N, BLOCK_D] in q's dtype;
    the factor of each key's column of P before the P.V dot [BLOCK_N], FP8 caches only)."""
    # Position -> cache row: the block table maps the position's block to a physical block.
    block_ids = tl.load(table_row + k_pos // block_size, mask=k_valid, other=0).to(tl.int64)
    within = k_pos % block_size
    kv_mask = k_valid[:, None] & d_valid[None, :]  # [BLOCK_N, BLOCK_D]
    k_rows = block_ids * stride_kcb + within * stride_kcs + kv_head * stride_kch  # [BLOCK_N]
    # Masked rows load 0 so stale or non-finite cache contents never reach the dots.
    k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :] * stride_kcd, mask=kv_mask, other=0.0)
    v_rows = block_ids * stride_vcb + within * stride_vcs + kv_head * stride_vch
    v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :] * stride_vcd, mask=kv_mask, other=0.0)
    if KV_FP8:
        scale_rows = block_ids * stride_sb + within * stride_ss + kv_head * stride_sh  # [BLOCK_N]
        key_scale = tl.load(k_scale_ptr + scale_rows, mask=k_valid, other=0.0)
        value_scale = tl.load(v_scale_ptr + scale_rows, mask=k_valid, other=0.0)
        if q.dtype == tl.float16:
            v = (v.to(tl.float32) * value_scale[:, None]).to(q.dtype)
            value_scale = tl.where(k_valid, 1.0, 0.0)
        else:
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * (key_scale * scale_log2)[None, :]
        return s, v, value_scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        return s, v, scale_log2  # no factor: the caller applies none
