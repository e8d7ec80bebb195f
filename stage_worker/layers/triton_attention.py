"""Paged attention on the GPU in Triton: the KV-cache write and the attention itself.

Same semantics as the reference in attention.py (which stays the CPU path and the test
oracle): sequence i owns query rows [query_start_loc[i], query_start_loc[i+1]); they are the
LAST q_len positions of its context_lens[i] cached tokens, and query j (position
context_len - q_len + j) sees keys 0..its own position. One kernel therefore serves prefill,
chunked prefill after a cached prefix, decode and mixed batches.

Design of the attention kernel: one program per (query tile, kv head), a tile being a block
of BLOCK_M rows of one sequence, a row a (query token, query head of this kv head's GQA group)
pair, token-major. The tiles of all sequences are numbered in one flat range: sequence i's
start at (query_start_loc[i] * QUERIES_PER_KV) // BLOCK_M + i, which leaves it at least the
cdiv(q_len * QUERIES_PER_KV, BLOCK_M) tiles it needs, and a program finds its sequence by a
binary search over those starts. So a step's grid grows with its tokens plus its sequences,
not with sequences x its longest query: a mixed step (a long prompt chunk beside hundreds of
decode rows) launches no program per (decode row, tile of the chunk's length).
Each K/V tile is thus loaded once for the whole GQA group, so a decode step reads each
cached K/V row once. The program walks the context in BLOCK_N-token tiles, gathering each
tile's rows through the block table, with an online softmax in float32 (base 2, log2(e)
folded into the scale) and tl.dot accumulating in float32; it stops at the last key any of
its rows can see.

Decode steps (max_query_len == 1, the steps the CUDA graphs replay) take the split-KV
kernel of triton_decode_attention.py instead.

All wrappers read nothing back to the host: the grids and the split count depend only on
tensor shapes, the max_query_len argument and the device, so a call can be captured in a
CUDA graph and replayed with new buffer contents (the split path's scratch is a
torch.empty of a shape-derived size, which a capture takes from the graph's pool).
CUDA-graph padding rows (slot -1, context_len 0) are skipped by the cache write and
produce zeros in the attention.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from stage_worker.layers.layer_kv_cache import FP8_KV_DTYPE
from stage_worker.layers.triton_decode_attention import paged_decode_split_kv
from stage_worker.layers.triton_interpreter import fix_loop_bounds_for_numpy_2_4, interpreting
from stage_worker.layers.triton_paged_kv import KV_FP8_MAX, KV_FP8_MIN_SCALE, kv_tile_scores

if interpreting():
    fix_loop_bounds_for_numpy_2_4()

LOG2E = 1.4426950408889634


@triton.jit
def _round_to_e4m3(x):
    """x float32 within +-448 -> the nearest float8_e4m3fn value (ties to even), still float32.
    Rounded here so that the cast to FP8 which follows is exact, on the GPU and in the
    interpreter alike (the interpreter's cast drops the carry of a mantissa that rounds up)."""
    # Normal range: round the float32 mantissa to its top 3 bits (the carry may bump the
    # exponent, as it should); -1048576 is 0xFFF00000 as an int32.
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal, a fixed step of 2**-9: adding 1.5 * 2**23 to |x| * 2**9
    # leaves a float32 whose ulp is 1, so the sum rounds to an integer (ties to even). The
    # sign is put back from the bits, so a small negative value rounds to -0 as torch's cast does.
    subnormal = ((tl.abs(x) * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    subnormal = (subnormal.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _store_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_mapping_ptr,
    block_size,
    num_kv_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
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
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    # int64: block_id * stride_kcb overflows int32 for caches past 2**31 elements.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block_id = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # Negative slots are padding rows: every access is masked off, nothing is read or written.
    mask = (slot >= 0) & (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]

    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask, other=0.0)
    k_row = block_id * stride_kcb + offset * stride_kcs  # the slot's row of the flattened cache
    v_row = block_id * stride_vcb + offset * stride_vcs
    k_dst = k_cache_ptr + k_row + h[:, None] * stride_kch + d[None, :] * stride_kcd
    v_dst = v_cache_ptr + v_row + h[:, None] * stride_vch + d[None, :] * stride_vcd
    if KV_FP8:
        # layer_kv_cache.quantize_rows, op for op: a scale per (token, kv head) row.
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        k_scale = tl.maximum(tl.max(tl.abs(k), 1) / KV_FP8_MAX, KV_FP8_MIN_SCALE)  # [BLOCK_H]
        v_scale = tl.maximum(tl.max(tl.abs(v), 1) / KV_FP8_MAX, KV_FP8_MIN_SCALE)
        k = _round_to_e4m3(tl.clamp(k / k_scale[:, None], -KV_FP8_MAX, KV_FP8_MAX))
        v = _round_to_e4m3(tl.clamp(v / v_scale[:, None], -KV_FP8_MAX, KV_FP8_MAX))
        scale_row = block_id * stride_sb + offset * stride_ss + h * stride_sh  # [BLOCK_H]
        head_mask = (slot >= 0) & (h < num_kv_heads)
        tl.store(k_scale_ptr + scale_row, k_scale, mask=head_mask)
        tl.store(v_scale_ptr + scale_row, v_scale, mask=head_mask)
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches
    [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping [num_tokens] (int32 or
    int64; slot = block_id * block_size + offset). Rows with a negative slot are skipped.
    With k_scale/v_scale [num_blocks, block_size, num_kv_heads] float32 the caches are FP8
    and each row is quantized with its own scale (layer_kv_cache.py)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, (k_cache.shape, v_cache.shape)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert key.dtype == value.dtype and k_cache.dtype == v_cache.dtype
    fp8 = _check_scales(k_cache, k_scale, v_scale, key.dtype)
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        k_scale if fp8 else k_cache,  # placeholders when unused: never touched
        v_scale if fp8 else v_cache,
        slot_mapping,
        k_cache.shape[1],
        num_kv_heads,
        head_dim,
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *(k_scale.stride() if fp8 else (0, 0, 0)),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=fp8,
    )


def _check_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, dtype: torch.dtype
) -> bool:
    """Whether the caches are FP8 with per-row scales (asserting the pieces agree); otherwise
    they must be in `dtype`, the activations' dtype."""
    if k_scale is None:
        assert v_scale is None
        assert k_cache.dtype == dtype, (k_cache.dtype, dtype)
        return False
    assert v_scale is not None and k_cache.dtype == FP8_KV_DTYPE, k_cache.dtype
    assert k_scale.shape == v_scale.shape == k_cache.shape[:3], (k_scale.shape, k_cache.shape)
    assert k_scale.stride() == v_scale.stride() and k_scale.dtype == v_scale.dtype == torch.float32
    return True


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    block_tables_ptr,
    scale_log2,
    block_size,
    head_dim,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
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
    stride_bt,
    num_seqs,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # The last sequence whose first tile is <= this one (see the module docstring).
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_first = (tl.load(query_start_loc_ptr + mid) * QUERIES_PER_KV) // BLOCK_M + mid
        if mid_first <= tile:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    m_block = tile - ((tl.load(query_start_loc_ptr + seq) * QUERIES_PER_KV) // BLOCK_M + seq)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx_len = tl.load(context_lens_ptr + seq)

    # Row r of this program is query token r // QUERIES_PER_KV of the sequence, query head
    # kv_head * QUERIES_PER_KV + r % QUERIES_PER_KV (the heads sharing this kv head).
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // QUERIES_PER_KV  # [BLOCK_M]
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV  # [BLOCK_M]
    row_valid = tok < q_len
    # The step's tokens are the last q_len positions of the context.
    q_pos = ctx_len - q_len + tok  # [BLOCK_M]

    # The last key any valid row sees is that of its last valid token; a program with no
    # valid row (a tile past its sequence's last, or past the last sequence) skips the loop.
    first_tok = (m_block * BLOCK_M) // QUERIES_PER_KV
    last_tok = tl.minimum((m_block * BLOCK_M + BLOCK_M - 1) // QUERIES_PER_KV, q_len - 1)
    key_end = tl.minimum(ctx_len - q_len + last_tok + 1, ctx_len)
    key_end = key_end * (first_tok < q_len).to(tl.int32)  # (a scalar tl.where trips the interpreter)

    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    q_rows = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh  # [BLOCK_M, 1]
    q = tl.load(q_ptr + q_rows + d[None, :] * stride_qd, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(0, key_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = k_pos < key_end
        s, v, value_factor = kv_tile_scores(
            q, k_pos, k_valid, table_row, block_size, kv_head, d, d_valid, k_cache_ptr, v_cache_ptr,
            k_scale_ptr, v_scale_ptr, stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb,
            stride_vcs, stride_vch, stride_vcd, stride_sb, stride_ss, stride_sh, scale_log2, KV_FP8,
            DOT_PRECISION,
        )  # [BLOCK_M, BLOCK_N], [BLOCK_N, BLOCK_D], [BLOCK_N]
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out (alpha and p are then 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            p = p * value_factor[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows that saw no key (context_len 0 padding rows) have l = 0 and acc = 0: write zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(
        out_ptr + o_rows + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def _tile_config(element_size: int, rows_per_seq: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the attention kernel.

    Sized so that sm_90 compiles without register spills (checked with cuobjdump): decode
    (a few rows per GQA group) takes the smallest tile tl.dot allows, prefill 64 rows so each
    K/V tile serves many queries. float32 runs its dots exactly on the FMA units, which need
    smaller tiles than the bf16/fp16 tensor-core path.
    """
    if element_size >= 4:
        return (16 if rows_per_seq <= 16 else 32), (32 if block_d <= 128 else 16), 4
    block_m = 16 if rows_per_seq <= 16 else 64
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m == 64 and block_d > 128 else 4
    return block_m, block_n, num_warps


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    split_kv: bool | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of query [num_tokens, num_heads, head_dim] over the paged caches
    [num_blocks, block_size, num_kv_heads, head_dim] -> out [num_tokens, num_heads, head_dim].

    query_start_loc [num_seqs + 1] int32, context_lens [num_seqs] int32 (cached tokens
    including this step's, already stored), block_tables [num_seqs, max_blocks] int32 (row
    padding is never read), all on query's device. max_query_len bounds every sequence's
    query count; it sizes the grid. Rows past query_start_loc[-1] are left untouched.
    block_m / block_n override the tile sizes (tests use them to cover several tiles).

    max_query_len == 1 (decode) runs the split-KV kernels (GQA groups up to 64 heads),
    anything else the general kernel; split_kv=False forces the general kernel for decode too (benchmarks compare the
    two), split_kv=True needs max_query_len == 1. num_splits overrides the split count of the
    split-KV path, which ignores block_m (its rows are one GQA group).
    k_scale / v_scale [num_blocks, block_size, num_kv_heads] float32: the caches are FP8 with
    a scale per row (layer_kv_cache.py), dequantized as they are read.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert cache_head_dim == head_dim and num_heads % num_kv_heads == 0, (query.shape, k_cache.shape)
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    fp8 = _check_scales(k_cache, k_scale, v_scale, query.dtype)
    num_seqs = context_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,), (query_start_loc.shape, num_seqs)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, (block_tables.shape, num_seqs)
    if out is None:
        # Contiguous whatever query's strides (often a view of a fused qkv), so callers can
        # .view it to [num_tokens, num_heads * head_dim].
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    assert out.shape == query.shape and out.dtype == query.dtype, (out.shape, out.dtype)
    if num_seqs == 0 or max_query_len <= 0 or num_tokens == 0:
        return out

    queries_per_kv = num_heads // num_kv_heads
    if split_kv is None:
        split_kv = max_query_len == 1 and queries_per_kv <= 64
    if split_kv:
        if max_query_len != 1:
            raise ValueError(f"the split-KV kernel is for decode (max_query_len 1), not {max_query_len}")
        return paged_decode_split_kv(
            query, k_cache, v_cache, query_start_loc, context_lens, block_tables, scale, out,
            num_splits=num_splits, block_n=block_n, k_scale=k_scale, v_scale=v_scale,
        )

    block_d = max(16, triton.next_power_of_2(head_dim))
    rows_per_seq = max_query_len * queries_per_kv
    default_m, default_n, num_warps = _tile_config(query.element_size(), rows_per_seq, block_d)
    block_m = block_m or default_m
    block_n = block_n or default_n
    assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    # Every sequence's tiles fit below (num_tokens * queries_per_kv) // block_m + num_seqs.
    grid = ((num_tokens * queries_per_kv) // block_m + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        query,
        k_cache,
        v_cache,
        k_scale if fp8 else k_cache,  # placeholders when unused: never touched
        v_scale if fp8 else v_cache,
        out,
        query_start_loc,
        context_lens,
        block_tables,
        scale * LOG2E,
        block_size,
        head_dim,
        *query.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *(k_scale.stride() if fp8 else (0, 0, 0)),
        block_tables.stride(0),
        num_seqs,
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        # float32 inputs would otherwise run the dots in TF32 (~1e-3 error) on tensor cores.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=fp8,
        num_warps=num_warps,
    )
    return out
