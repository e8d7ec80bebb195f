"""Split-KV ("flash decoding") paged attention for decode steps, in Triton.

Decode steps (max_query_len == 1, the steps the CUDA graphs replay) take a split-KV ("flash
decoding") kernel instead: one program per (sequence, kv head, split), whose rows are the
GQA group's query heads, walks only its split's share of the context. The split count is
fixed per call from shapes (enough programs to fill the GPU, at most one split per BLOCK_N
tokens of the block table's width); each sequence's context is divided among the splits
on the device, from its context length, in BLOCK_N-multiples, so splits past the context
run no iteration. With one split the program normalises and writes the output itself;
otherwise each writes its float32 partial (max, sum, acc) and a reduce kernel combines a
head's partials (empty splits carry max -inf and weigh nothing). Without it a batch-1
decode step runs num_kv_heads programs that each walk the whole context serially.

Same contract as triton_attention.paged_attention (which calls this for max_query_len 1):
nothing is read back to the host, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from stage_worker.layers.triton_interpreter import fix_loop_bounds_for_numpy_2_4, interpreting
from stage_worker.layers.triton_paged_kv import kv_tile_scores

if interpreting():
    fix_loop_bounds_for_numpy_2_4()

LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    block_tables_ptr,
    scale_log2,
    block_size,
    head_dim,
    num_heads,
    num_splits,
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
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Decode (every sequence has at most one query): program (seq, kv_head, split) attends
    the GQA group's query heads (rows) to its split of the sequence's context."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx_len = tl.load(context_lens_ptr + seq)
    # The one query sits at position ctx_len - 1 and sees every cached key; a sequence with
    # no query this step (q_len 0) sees none.
    has_query = q_len > 0
    key_end = ctx_len * has_query.to(tl.int32)
    # The context divided among the splits in whole tiles; splits past its end get nothing.
    chunk = tl.cdiv(tl.cdiv(key_end, num_splits), BLOCK_N) * BLOCK_N
    split_start = split * chunk
    split_end = tl.minimum(split_start + chunk, key_end)

    r = tl.arange(0, BLOCK_M)
    head = kv_head * QUERIES_PER_KV + r  # [BLOCK_M]
    head_valid = r < QUERIES_PER_KV
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    q_rows = q_start * stride_qt + head * stride_qh  # [BLOCK_M]
    q_mask = (head_valid & has_query)[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :] * stride_qd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(split_start, split_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = k_pos < split_end
        s, v, value_factor = kv_tile_scores(
            q, k_pos, k_valid, table_row, block_size, kv_head, d, d_valid, k_cache_ptr, v_cache_ptr,
            k_scale_ptr, v_scale_ptr, stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb,
            stride_vcs, stride_vch, stride_vcd, stride_sb, stride_ss, stride_sh, scale_log2, KV_FP8,
            DOT_PRECISION,
        )  # [BLOCK_M, BLOCK_N], [BLOCK_N, BLOCK_D], [BLOCK_N]
        s = tl.where(k_valid[None, :], s, float("-inf"))
        # Every tile holds at least one valid key, which every row sees: m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            p = p * value_factor[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        # Rows that saw no key (context_len 0 padding rows) have l = 0 and acc = 0: zeros.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_rows = q_start * stride_ot + head * stride_oh
        tl.store(
            out_ptr + o_rows[:, None] + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        # Partials [num_seqs, num_heads, num_splits] (+ [head_dim] for acc), float32. An empty
        # split writes m = -inf, l = 0, acc = 0.
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [BLOCK_M]
        tl.store(part_m_ptr + part, m_i, mask=head_valid)
        tl.store(part_l_ptr + part, l_i, mask=head_valid)
        tl.store(
            part_acc_ptr + part[:, None] * head_dim + d[None, :],
            acc,
            mask=head_valid[:, None] & d_valid[None, :],
        )


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    query_start_loc_ptr,
    head_dim,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (seq, head): combines the head's split partials into its output row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start

    sp = tl.arange(0, BLOCK_S)
    sp_valid = sp < num_splits
    part = (seq.to(tl.int64) * num_heads + head) * num_splits + sp  # [BLOCK_S]
    m = tl.load(part_m_ptr + part, mask=sp_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=sp_valid, other=0.0)
    # The floor keeps exp2(-inf - -inf) = NaN out when no split saw a key (a context_len 0
    # padding row): every weight is then 0 and the output 0. Real logits are far above it.
    m_max = tl.maximum(tl.max(m, 0), -3.0e38)
    w = tl.exp2(m - m_max)  # [BLOCK_S]; 0 for empty splits
    seen = m > float("-inf")
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    acc = tl.load(
        part_acc_ptr + part[:, None] * head_dim + d[None, :],
        mask=(sp_valid & seen)[:, None] & d_valid[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    l_sum = tl.sum(w * l, 0)
    l_safe = l_sum + (l_sum == 0.0).to(tl.float32)  # (a scalar tl.where trips the interpreter)
    out = tl.sum(w[:, None] * acc, 0) / l_safe  # [BLOCK_D]
    tl.store(
        out_ptr + q_start * stride_ot + head * stride_oh + d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_valid & (q_len > 0),
    )


# The split-KV decode launches about this many programs per SM (when the context allows),
# never more than MAX_DECODE_SPLITS splits per (sequence, kv head).
DECODE_PROGRAMS_PER_SM = 2
MAX_DECODE_SPLITS = 64
# What the interpreter on CPU takes for an SM count (small: each program costs CPU time).
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return _INTERPRETER_SMS
    if index is None:
        index = torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_tile_config(
    element_size: int, queries_per_kv: int, block_d: int, fp8_cache: bool = False
) -> tuple[int, int, int, int | None]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the split-KV decode kernel: the rows are
    one GQA group, padded to the 16 rows tl.dot needs; tiles as the general kernel's decode
    tiles. Two stages for 16-bit caches: on an H200 at the Llama-3-8B shape (bf16, d 128,
    benchmarks/kernel_bench.py sweep) they beat Triton's default of 3 by 13% at batch 256
    and 25-30% at batch 64 (about 4.4 TB/s at batch 256, context 2048), and tie it at batch 1.
    An FP8 cache takes twice the keys per tile (the same bytes as a 16-bit tile; the fastest
    of block_n 32/64/128 x stages 2/3/4 x warps 4/8 on an H100 at batch 256). float32 keeps
    Triton's default (None)."""
    block_m = max(16, triton.next_power_of_2(queries_per_kv))
    if element_size >= 4:
        return block_m, (32 if block_d <= 128 else 16), 4, None
    block_n = 64 if block_d <= 128 else 32
    return block_m, (2 * block_n if fp8_cache else block_n), 4, 2


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device
) -> int:
    """Splits per (sequence, kv head) for the split-KV decode: enough programs for
    DECODE_PROGRAMS_PER_SM per SM, at most one per BLOCK_N tokens of max_context (the block
    table's width in tokens: a shape, never the context lengths themselves)."""
    target = DECODE_PROGRAMS_PER_SM * _sm_count(device.type, device.index)
    splits = triton.cdiv(target, max(num_seqs * num_kv_heads, 1))
    return max(1, min(splits, triton.cdiv(max(max_context, 1), block_n), MAX_DECODE_SPLITS))


def paged_decode_split_kv(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention for max_query_len == 1 through the split-KV kernels (arguments
    checked by the caller; k_scale/v_scale given for an FP8 cache). num_splits / block_n /
    num_warps / num_stages override the defaults (tests and benchmarks)."""
    fp8 = k_scale is not None
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = context_lens.shape[0]
    queries_per_kv = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, default_n, default_warps, default_stages = _decode_tile_config(
        query.element_size(), queries_per_kv, block_d, fp8_cache=k_scale is not None
    )
    block_n = block_n or default_n
    num_stages = num_stages or default_stages
    assert block_n >= 16, "tl.dot needs tiles of at least 16"
    if num_splits is None:
        num_splits = decode_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1] * block_size, block_n, query.device
        )
    assert num_splits >= 1, num_splits
    single = num_splits == 1
    if single:
        part_m = part_l = part_acc = out  # placeholders, never touched
    else:
        part_ml = torch.empty((2, num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_m, part_l = part_ml[0], part_ml[1]
        part_acc = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
    launch = {"num_warps": num_warps or default_warps}
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _paged_decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        k_scale if fp8 else k_cache,  # placeholders when unused: never touched
        v_scale if fp8 else v_cache,
        out,
        part_m,
        part_l,
        part_acc,
        query_start_loc,
        context_lens,
        block_tables,
        scale * LOG2E,
        block_size,
        head_dim,
        num_heads,
        num_splits,
        *query.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *(k_scale.stride() if fp8 else (0, 0, 0)),
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        SINGLE_SPLIT=single,
        KV_FP8=fp8,
        **launch,
    )
    if not single:
        block_s = triton.next_power_of_2(num_splits)
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_m,
            part_l,
            part_acc,
            query_start_loc,
            head_dim,
            num_heads,
            num_splits,
            *out.stride(),
            BLOCK_S=block_s,
            BLOCK_D=block_d,
            num_warps=4 if block_s * block_d >= 2048 else 1,
        )
    return out


