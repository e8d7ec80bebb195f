"""The experts of an MoE block on the GPU: tokens grouped by expert, one grouped GEMM launch
per projection (layers/fused_moe.py's Triton path).

A forward is four launches, none reading anything back to the host, every size taken from
tensor shapes (CUDA graphs capture it):

1. align (`moe_align`): the (token, k) pairs, flat index `pair = token * top_k + k`, sorted
   by expert; each expert's segment padded to a multiple of BLOCK_M with a sentinel pair id
   (`num_pairs`), so that every BLOCK_M-row block belongs to one expert. The row count is a
   fixed upper bound, num_pairs + min(num_experts, num_pairs) * (BLOCK_M - 1) (a non-empty
   expert wastes at most BLOCK_M - 1 rows), and blocks past the real ones get expert -1.
   Up to ALIGN_MAX_PAIRS pairs (decode, and CUDA graphs up to 512 sequences at top-8) this
   is one single-program Triton kernel (a sort of expert * P + pair keys in registers): the
   ~15 small torch ops it replaces would cost a launch each (~2 us even in a graph), about as
   much as the expert GEMMs of a batch-1 step (the whole experts path, align included, measured
   38.5 us at Qwen3-30B-A3B's shape on an H100, the align kernel 1.7 us: docs/benchmarks.md).
   Larger batches (prefill; decode graphs of more than 512 sequences) use the same steps in
   torch ops, which need no host sync either.
2. gate/up GEMM with SiluAndMul fused: a program owns one row block and BLOCK_N columns of
   both the gate and the up half of its expert's w13 [2 * I, H], gathers its rows of x
   (token = pair // top_k), and writes silu(gate) * up for its pairs: [num_pairs, I].
3. down GEMM: rows of that intermediate, w2 [H, I], the pair's routing weight multiplied
   in: [num_pairs, H].
4. the sum over each token's top_k rows (torch), in a fixed order: no atomics, so a step's
   output does not depend on scheduling.
A program whose block is padding (expert -1) returns at once; a padded row is masked out of
every load and store.

Numerics follow the reference loop (fused_moe.py) rounding step for rounding step: the
products accumulate in float32 and are rounded to the model dtype as F.linear's output is,
silu and the product with up round as SiluAndMul does, the routing weight multiplies in
float32 and rounds once. What differs is the order of float32 sums (tiles) and the top-k sum,
which the reference adds expert by expert in the model dtype and this adds in float32.

Decode is memory bound: a batch-1 step reads top_k experts' weights and computes with one
row of each BLOCK_M. choose_config then takes the smallest tile in M and narrows BLOCK_N
until the grid has about two programs per SM streaming weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from stage_worker.layers.triton_fused import _exp
from stage_worker.layers.triton_interpreter import fix_loop_bounds_for_numpy_2_4, interpreting

if interpreting():
    fix_loop_bounds_for_numpy_2_4()

# Pairs the single-program align kernel sorts in registers: 512 decode rows at top-8.
ALIGN_MAX_PAIRS = 4096
# Shared memory a GEMM program's pipeline may take, leaving room for the epilogue.
SMEM_BUDGET = 160 * 1024


@dataclass(frozen=True)
class MoeConfig:
    """Tiles of one grouped GEMM. block_m is also the alignment of every expert's segment,
    so both projections of a forward share it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AlignedPairs:
    """The pairs grouped by expert (step 1)."""

    # [num_blocks * block_m] int32: flat pair index of each row, num_pairs on padding rows.
    sorted_pair_ids: torch.Tensor
    # [num_blocks] int32: the expert of each block, -1 past the last real block.
    block_expert: torch.Tensor
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the padded layout, a multiple of block_m: sum over non-empty experts of
    ceil(count / block_m) * block_m <= num_pairs + non-empty * (block_m - 1)."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return bound // block_m * block_m


# ---- step 1: align -----------------------------------------------------------------------


# The pair and row counts change with every batch size: specializing on them (a value of 1,
# divisibility by 16) would compile more variants for nothing.
@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _moe_align_kernel(
    topk_ids_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    num_pairs,
    num_rows,  # max_padded_rows
    NUM_EXPERTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= num_pairs, a power of 2
    BLOCK_E: tl.constexpr,  # > NUM_EXPERTS, a power of 2 (bin NUM_EXPERTS holds the lanes past num_pairs)
    FILL: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_P)
    valid = offs < num_pairs
    experts = tl.load(topk_ids_ptr + offs, mask=valid, other=NUM_EXPERTS).to(tl.int32)
    # Unique keys: sorting them orders pairs by expert, then by pair (stable), and puts the
    # lanes past num_pairs (expert NUM_EXPERTS) last.
    keys = tl.sort(experts * BLOCK_P + offs)
    sorted_expert = keys // BLOCK_P
    sorted_pair = keys % BLOCK_P

    e = tl.arange(0, BLOCK_E)
    counts = tl.where(e < NUM_EXPERTS, tl.histogram(experts, BLOCK_E), 0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    count_end = tl.cumsum(counts, axis=0)
    # Sorted position i of expert e's j-th pair is count_start[e] + j; its padded row is
    # padded_start[e] + j, i.e. i shifted by the padding of the experts before e.
    shift = (padded_end - padded) - (count_end - counts)  # [BLOCK_E]
    rows = offs + tl.gather(shift, tl.minimum(sorted_expert, NUM_EXPERTS), 0)

    # Every row the sort leaves empty is padding and every block past the real ones has no
    # expert: fill all with the sentinel and -1 first, then write the pairs over them.
    num_blocks = num_rows // BLOCK_M
    for start in range(0, num_rows, FILL):
        r = start + tl.arange(0, FILL)
        tl.store(sorted_pair_ptr + r, tl.zeros([FILL], tl.int32) + num_pairs, mask=r < num_rows)
        tl.store(block_expert_ptr + r, tl.zeros([FILL], tl.int32) - 1, mask=r < num_blocks)
    tl.debug_barrier()
    tl.store(sorted_pair_ptr + rows, sorted_pair, mask=valid)
    # A block's first row always holds a pair (an expert's padding comes after all its pairs,
    # and fills less than a block), whose expert is the block's.
    tl.store(block_expert_ptr + rows // BLOCK_M, sorted_expert, mask=valid & (rows % BLOCK_M == 0))


def _align_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, sorted_pair_ids: torch.Tensor, block_expert: torch.Tensor
) -> None:
    """The align kernel's steps in torch ops (no host sync), for more pairs than it holds."""
    flat = topk_ids.reshape(-1)  # [num_pairs]
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)  # flat pair ids, expert by expert
    # bincount would read its input's max back to the host; a scatter_add does not.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    shift = (padded_end - padded) - (torch.cumsum(counts, 0) - counts)  # [num_experts], see the kernel
    rows = torch.arange(num_pairs, device=flat.device) + shift[flat[order]]
    sorted_pair_ids.fill_(num_pairs)
    sorted_pair_ids[rows] = order.to(torch.int32)
    first_rows = torch.arange(block_expert.numel(), device=flat.device) * block_m
    expert = torch.searchsorted(padded_end, first_rows, right=True)
    block_expert.copy_(torch.where(expert < num_experts, expert, -1))


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, *, max_kernel_pairs: int = ALIGN_MAX_PAIRS
) -> AlignedPairs:
    """topk_ids [num_tokens, top_k] -> the pairs grouped by expert in block_m-row blocks.
    max_kernel_pairs: above it the torch steps run instead of the kernel (tests lower it)."""
    num_pairs = topk_ids.numel()
    num_rows = max_padded_rows(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pair_ids = torch.empty(num_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_rows // block_m, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return AlignedPairs(sorted_pair_ids, block_expert, block_m)
    if num_pairs > max_kernel_pairs:
        _align_torch(topk_ids, num_experts, block_m, sorted_pair_ids, block_expert)
    else:
        block_p = max(triton.next_power_of_2(num_pairs), 16)
        _moe_align_kernel[(1,)](
            topk_ids.contiguous(),
            sorted_pair_ids,
            block_expert,
            num_pairs,
            num_rows,
            NUM_EXPERTS=num_experts,
            BLOCK_M=block_m,
            BLOCK_P=block_p,
            BLOCK_E=triton.next_power_of_2(num_experts + 1),
            # One fill iteration for decode batches (num_rows 128 at batch 1, top-8 of 128).
            FILL=256,
            num_warps=4 if block_p <= 1024 else 8,
        )
    return AlignedPairs(sorted_pair_ids, block_expert, block_m)


# ---- step 0: routing -----------------------------------------------------------------------


@triton.jit
def _moe_route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    stride_lm,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= NUM_EXPERTS, a power of 2
    BLOCK_K: tl.constexpr,  # >= TOP_K, a power of 2
):
    # One token a program: softmax over its experts in float32, then TOP_K rounds of
    # "take the largest", as fused_moe.fused_topk computes them with torch ops.
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < NUM_EXPERTS
    x = tl.load(logits_ptr + token * stride_lm + e, mask=valid, other=-float("inf")).to(tl.float32)
    p = tl.where(valid, _exp(x - tl.max(x, 0), LIBDEVICE), 0.0)  # [BLOCK_E]
    probs = tl.math.div_rn(p, tl.sum(p, 0))  # torch's softmax: exp(x - max) / sum
    remaining = tl.where(valid, probs, -1.0)
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_id = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, 0)
        # The lowest index among equal probabilities.
        best_id = tl.min(tl.where(remaining == best, e, BLOCK_E), 0)
        top_w = tl.where(kk == j, best, top_w)
        top_id = tl.where(kk == j, best_id, top_id)
        remaining = tl.where(e == best_id, -1.0, remaining)
    if RENORMALIZE:
        top_w = tl.math.div_rn(top_w, tl.sum(top_w, 0))  # the lanes past TOP_K hold 0
    out = token * TOP_K + kk
    tl.store(weights_ptr + out, top_w.to(weights_ptr.dtype.element_ty), mask=kk < TOP_K)
    tl.store(ids_ptr + out, top_id.to(tl.int64), mask=kk < TOP_K)


def fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_moe.fused_topk in one launch (its torch ops are ~5: softmax, topk, sum, divide,
    the cast), router_logits [num_tokens, num_experts] -> (weights [num_tokens, top_k] in
    weights_dtype, expert ids int64 [num_tokens, top_k]), largest first. The softmax and
    the renormalization are the same float32 formulas (sums in another order; an exact tie
    picks the lower expert id)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=weights_dtype, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    block_e = triton.next_power_of_2(num_experts)
    _moe_route_kernel[(num_tokens,)](
        router_logits,
        weights,
        ids,
        router_logits.stride(0),
        NUM_EXPERTS=num_experts,
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        LIBDEVICE=router_logits.is_cuda and not interpreting(),
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=1 if block_e <= 256 else 4,
    )
    return weights, ids


# ---- steps 2 and 3: the grouped GEMMs --------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    routing_ptr,
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    A_ROW_DIVISOR: tl.constexpr,  # pair -> row of a: top_k for x (a token per pair), 1 for the intermediate
    GATED: tl.constexpr,  # w13: columns n (gate) and N + n (up) of w, out = silu(gate) * up
    MUL_ROUTING: tl.constexpr,
    PRECISION: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,  # the interpreter's tl.dot gets bf16 wrong: exact float32 products instead
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 the row blocks: consecutive programs share an expert's weight tile (L2 reuse
    # when one expert has many blocks, in prefill).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return  # padding block: past the real rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)  # [BLOCK_M]
    row_ok = pair < num_pairs  # padding rows of the expert's segment hold num_pairs
    a_rows = (pair // A_ROW_DIVISOR).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # [BLOCK_M, BLOCK_K] gathered rows of a; [BLOCK_K, BLOCK_N] tile of the expert's w [*, K].
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FLOAT32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_IN_FLOAT32:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    # F.linear rounds its output to the model dtype.
    y = acc.to(dtype).to(tl.float32)
    if GATED:
        # SiluAndMul: silu in float32 rounded once, then the product with up rounded again.
        silu = tl.math.div_rn(y, 1.0 + _exp(-y, LIBDEVICE)).to(dtype).to(tl.float32)
        y = silu * acc_up.to(dtype).to(tl.float32)
    if MUL_ROUTING:
        y = y * tl.load(routing_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block from the mean pairs per expert: decode (a few pairs per expert) wastes
    the least on padding with the smallest tile tl.dot takes (16)."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return 16
    if per_expert <= 48:
        return 32
    if per_expert <= 128:
        return 64
    return 128


def choose_config(
    num_pairs: int, num_experts: int, n: int, k: int, num_sms: int, gated: bool = False, element_size: int = 2
) -> MoeConfig:
    """Tiles of one projection: output columns n (per half, for the gated w13, whose programs
    compute block_n columns of each half), reduction k, operands of element_size bytes."""
    block_m = choose_block_m(num_pairs, num_experts)
    if block_m >= 64:
        # Many pairs per expert: big tiles, each weight tile read by few programs. A gated
        # program holds two accumulators, so half the columns of each.
        block_n, block_k, warps, stages = (64 if gated else 128), 64, (8 if block_m == 128 else 4), 3
    else:
        # Memory bound: each program streams BLOCK_N rows of the expert's weight. Narrow the
        # tile until about two programs per SM stream weights (the blocks that hold pairs: at
        # most one per pair, and the pairs' blocks themselves).
        busy_blocks = min(num_pairs, num_experts) + num_pairs // block_m
        block_n = 64
        while block_n > 16 and busy_blocks * triton.cdiv(n, block_n) < 2 * num_sms:
            block_n //= 2
        block_k, warps, stages = (128 if k >= 128 else 64), 4, 4
    # The pipeline's buffers in shared memory (228 KB an SM on H100): float32 operands get
    # fewer stages, then shorter K steps.
    def smem(bk: int, st: int) -> int:
        return st * bk * (block_m + (2 if gated else 1) * block_n) * element_size

    while smem(block_k, stages) > SMEM_BUDGET and stages > 2:
        stages -= 1
    while smem(block_k, stages) > SMEM_BUDGET and block_k > 32:
        block_k //= 2
    return MoeConfig(block_m, block_n, block_k, warps, stages)


def _launch_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    aligned: AlignedPairs,
    routing: torch.Tensor,
    num_pairs: int,
    n: int,
    a_row_divisor: int,
    gated: bool,
    cfg: MoeConfig,
) -> None:
    assert cfg.block_m == aligned.block_m, "both projections use the align step's block_m"
    grid = (aligned.block_expert.numel(), triton.cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        aligned.sorted_pair_ids,
        aligned.block_expert,
        routing,
        num_pairs,
        n,
        w.shape[2],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        A_ROW_DIVISOR=a_row_divisor,
        GATED=gated,
        MUL_ROUTING=not gated,
        # float32 models: exact float32 products, not TF32 (what F.linear does by default).
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        LIBDEVICE=a.is_cuda and not interpreting(),
        DOT_IN_FLOAT32=interpreting() and a.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=False,
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    configs: tuple[MoeConfig, MoeConfig] | None = None,
) -> torch.Tensor:
    """FusedMoE's expert computation (before any TP reduction): x [num_tokens, hidden],
    w13 [E, 2 * I, hidden] (gate rows, then up rows), w2 [E, hidden, I], topk_weights
    [num_tokens, top_k] (any float dtype), topk_ids [num_tokens, top_k] -> [num_tokens, hidden]
    in x's dtype. configs: (gate/up, down) tiles, by default choose_config's."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    assert w13.shape[2] == hidden and w2.shape == (num_experts, hidden, inter), (w13.shape, w2.shape)
    assert w13.stride(2) == 1 and w2.stride(2) == 1, "expert weights need contiguous rows"
    if num_pairs == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if configs is None:
        num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 8
        configs = (
            choose_config(num_pairs, num_experts, inter, hidden, num_sms, gated=True, element_size=x.element_size()),
            choose_config(num_pairs, num_experts, hidden, inter, num_sms, element_size=x.element_size()),
        )
    cfg13, cfg2 = configs
    aligned = moe_align(topk_ids, num_experts, cfg13.block_m)
    routing = topk_weights.reshape(-1).contiguous()  # [num_pairs], indexed by pair
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # silu(gate) * up, by pair
    _launch_gemm(x, w13, h, aligned, routing, num_pairs, inter, top_k, True, cfg13)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # weighted expert outputs, by pair
    _launch_gemm(h, w2, y, aligned, routing, num_pairs, hidden, 1, False, cfg2)
    # Pair token * top_k + k is row k of the token's [top_k, hidden] slab; torch sums a
    # half-precision slab in float32 and rounds once.
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
