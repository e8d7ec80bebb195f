"""The Triton MoE experts (layers/triton_fused_moe.py) against the reference loop of
layers/fused_moe.py.

Without CUDA the kernels run in Triton's interpreter on CPU tensors in float32: the align
step (kernel and torch versions) equal to the layout written out in plain Python, and
FusedMoE's forward with kernel_backend "triton" within float32 rounding of the reference at
8 experts, top-2 to top-4, hidden 64 and an intermediate size of 96 (not a multiple of the
tiles), for 1 token (some experts get nothing), 5 and 33 tokens (experts with more pairs
than a block), with the default tiles and with small forced ones (several column tiles,
partial K steps); float16 and bfloat16 within a few ulps (the same roundings, other sum
orders); and the whole sparse block (router, then the Triton experts) against
transformers' Qwen3-MoE and Mixtral blocks. On a GPU the same tests run compiled; the `gpu` tests run bf16 at the Qwen3-30B-A3B shape of one TP rank (128
experts, top-8, hidden 2048, I = 768 / tp) against the reference in bf16 and float32, bf16 at
Mixtral-8x7B's tp-2 shape, float32 (no TF32), and replay the layer from a CUDA graph with
other routing than it was captured with (on a GPU host:
`python3 -m pytest -q tests/gpu/test_triton_fused_moe.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stage_worker.layers.fused_moe import FusedMoE, fused_topk
from stage_worker.layers.kernel_backend import set_kernel_backend
from stage_worker.layers.triton_fused_moe import (
    MoeConfig,
    choose_config,
    fused_moe,
    max_padded_rows,
    moe_align,
)
from stage_worker.layers.triton_fused_moe import fused_topk as triton_fused_topk
from stage_worker.models.sparse_moe import SparseMoeBlock

pytestmark = pytest.mark.timeout(300)

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
NUM_EXPERTS = 8
HIDDEN = 64
INTERMEDIATE = 96


def routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    return fused_topk(logits, top_k, renormalize=True)


def expected_layout(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """The align step's output in plain Python: experts in order, each one's pairs ascending,
    padded with the sentinel (num_pairs) to a multiple of block_m; then sentinel rows up to
    max_padded_rows, whose blocks have expert -1."""
    flat = topk_ids.reshape(-1).tolist()
    num_pairs = len(flat)
    rows: list[int] = []
    experts: list[int] = []
    for e in range(num_experts):
        pairs = [p for p, pe in enumerate(flat) if pe == e]
        if not pairs:
            continue
        blocks = -(-len(pairs) // block_m)
        rows += pairs + [num_pairs] * (blocks * block_m - len(pairs))
        experts += [e] * blocks
    total = max_padded_rows(num_pairs, num_experts, block_m)
    return rows + [num_pairs] * (total - len(rows)), experts + [-1] * (total // block_m - len(experts))


@pytest.mark.parametrize("num_tokens,top_k,block_m", [(1, 2, 16), (5, 3, 16), (33, 4, 16), (33, 4, 32), (40, 8, 16)])
def test_align_matches_plain_layout(num_tokens: int, top_k: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 10 + top_k)
    num_experts = 16 if top_k == 8 else NUM_EXPERTS
    _, ids = routing(num_tokens, num_experts, top_k, gen)
    rows, experts = expected_layout(ids, num_experts, block_m)
    kernel = moe_align(ids.to(DEVICE), num_experts, block_m)
    in_torch = moe_align(ids.to(DEVICE), num_experts, block_m, max_kernel_pairs=0)
    for aligned in (kernel, in_torch):
        assert aligned.sorted_pair_ids.dtype == aligned.block_expert.dtype == torch.int32
        assert aligned.sorted_pair_ids.tolist() == rows
        assert aligned.block_expert.tolist() == experts


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,renormalize,dtype",
    [(1, 8, 2, True, torch.float32), (7, 8, 3, False, torch.float32), (5, 128, 8, True, torch.bfloat16),
     (3, 60, 4, True, torch.float32)],
)
def test_route_kernel_matches_torch_routing(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype
) -> None:
    """The one-launch routing: the same experts in the same order (largest first) as
    fused_moe.fused_topk, and its float32 weights within a few ulps (other sum orders), cast
    to the model dtype as Qwen3-MoE casts them. 60 experts: a padded block of lanes."""
    gen = torch.Generator().manual_seed(num_tokens * 7 + num_experts)
    logits = (3 * torch.randn(num_tokens, num_experts, generator=gen)).to(dtype)
    ref_w, ref_ids = fused_topk(logits, top_k, renormalize)
    weights, ids = triton_fused_topk(logits.to(DEVICE), top_k, renormalize, dtype)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert ids.cpu().tolist() == ref_ids.tolist()
    if dtype == torch.float32:
        torch.testing.assert_close(weights.cpu(), ref_w, rtol=4e-7, atol=0)
    else:
        assert ((weights.cpu().float() - ref_w.to(dtype).float()).abs() <= ref_w.abs() / 128).all()
    empty_w, empty_ids = triton_fused_topk(logits[:0].to(DEVICE), top_k, renormalize, dtype)
    assert empty_w.shape == empty_ids.shape == (0, top_k)


def test_align_when_every_pair_picks_one_expert() -> None:
    """All pairs on the last expert: one long segment, the rest of the bound is padding."""
    ids = torch.full((20, 2), NUM_EXPERTS - 1, dtype=torch.int64)
    ids[:, 1] = NUM_EXPERTS - 2
    rows, experts = expected_layout(ids, NUM_EXPERTS, 16)
    for max_kernel_pairs in (4096, 0):
        aligned = moe_align(ids.to(DEVICE), NUM_EXPERTS, 16, max_kernel_pairs=max_kernel_pairs)
        assert aligned.sorted_pair_ids.tolist() == rows
        assert aligned.block_expert.tolist() == experts == [6, 6, 7, 7] + [-1] * (len(experts) - 4)


def make_experts(top_k: int, seed: int) -> FusedMoE:
    torch.manual_seed(seed)
    moe = FusedMoE(NUM_EXPERTS, top_k, HIDDEN, INTERMEDIATE, torch.float32, DEVICE)
    with torch.no_grad():
        moe.w13_weight.normal_(0.0, 0.2)
        moe.w2_weight.normal_(0.0, 0.2)
    return moe


def run_both(
    moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        set_kernel_backend(moe, "reference")
        ref = moe(x, weights, ids)
        set_kernel_backend(moe, "triton")
        return moe(x, weights, ids), ref


def assert_close_float32(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 1.0
    # float32 sums in another order (tiles; top-k summed in float32 instead of expert by expert).
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("num_tokens,top_k", [(1, 2), (5, 3), (33, 4), (33, 2)])
def test_forward_matches_reference(num_tokens: int, top_k: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens + 100 * top_k)
    moe = make_experts(top_k, seed=top_k)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(DEVICE)
    weights, ids = routing(num_tokens, NUM_EXPERTS, top_k, gen)
    out, ref = run_both(moe, x, weights.to(DEVICE), ids.to(DEVICE))
    assert_close_float32(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype: torch.dtype) -> None:
    """The model-dtype roundings (the products, silu, silu * up, the routing weight) are the
    reference's; what may differ is the float32 summation order inside the products and the
    top-k sum (float32 here, the model dtype expert by expert in the reference)."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    moe = FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, dtype, DEVICE)
    with torch.no_grad():
        moe.w13_weight.normal_(0.0, 0.2)
        moe.w2_weight.normal_(0.0, 0.2)
    x = torch.randn(6, HIDDEN, generator=gen).to(dtype).to(DEVICE)
    weights, ids = routing(6, NUM_EXPERTS, 2, gen)
    out, ref = run_both(moe, x, weights.to(dtype).to(DEVICE), ids.to(DEVICE))
    assert out.dtype == dtype
    # A few ulps of the output's scale: the reference rounds after each expert's add.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=4 * eps, atol=4 * eps * float(ref.abs().max()))


@pytest.mark.parametrize("config", [MoeConfig(16, 32, 32, 4, 2), MoeConfig(32, 64, 64, 4, 2)])
def test_forced_tiles_and_strided_input(config: MoeConfig) -> None:
    """Column tiles over I = 96 (three of 32, two of 64 the last half empty), K steps of 32
    and 64 (partial over I in the down projection), x a row-strided view."""
    gen = torch.Generator().manual_seed(7)
    moe = make_experts(3, seed=7)
    wide = torch.randn(9, HIDDEN + 16, generator=gen).to(DEVICE)
    x = wide[:, :HIDDEN]  # rows HIDDEN + 16 apart
    weights, ids = routing(9, NUM_EXPERTS, 3, gen)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        out = fused_moe(x, moe.w13_weight, moe.w2_weight, weights, ids, (config, config))
    _, ref = run_both(moe, x, weights, ids)
    assert_close_float32(out, ref)


def test_routing_weights_in_model_dtype_and_no_tokens() -> None:
    """Qwen3-MoE's weights come in the model dtype, Mixtral's in float32: both are read as
    given. An empty batch gives an empty output."""
    gen = torch.Generator().manual_seed(3)
    moe = make_experts(2, seed=3)
    x = torch.randn(4, HIDDEN, generator=gen).to(DEVICE)
    weights, ids = routing(4, NUM_EXPERTS, 2, gen)
    out, ref = run_both(moe, x, weights.to(torch.float64).to(DEVICE), ids.to(DEVICE))
    assert_close_float32(out, ref)
    with torch.no_grad():
        empty = moe(x[:0], weights[:0].to(DEVICE), ids[:0].to(DEVICE))
    assert empty.shape == (0, HIDDEN)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_block_matches_transformers(tmp_path: Path, kind: str) -> None:
    """The whole sparse block (router, routing-weight dtype, experts) on the Triton path
    against transformers' module."""
    try:
        from tests.unit.test_moe_models import _block_case, _load_block
    except ImportError:
        from test_moe_models import _block_case, _load_block

    config, hf_block = _block_case(tmp_path, kind, norm_topk_prob=True)
    ours = SparseMoeBlock(
        config, torch.float32, torch.device("cpu"), reduce_results=True,
        routing_weights_in_model_dtype=kind == "qwen3_moe",
    )
    _load_block(ours, hf_block)
    set_kernel_backend(ours.to(DEVICE), "triton")
    x = torch.randn(9, config.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf_block(x[None])[0]  # [num_tokens, hidden]
        out = ours(x.to(DEVICE)).cpu()
    assert ref.std() > 0.1
    assert (out - ref).abs().max().item() < 1e-5


def test_graph_capture_follows_the_backend() -> None:
    moe = make_experts(2, seed=0)
    assert not moe.supports_cuda_graphs  # the reference loop reads counts on the host
    set_kernel_backend(moe, "triton")
    assert moe.supports_cuda_graphs


def test_config_by_number_of_pairs() -> None:
    # Qwen3-30B-A3B at tp 1: gate/up n = I = 768, k = 2048; 132 SMs.
    decode = choose_config(8, 128, 768, 2048, 132)
    assert decode.block_m == 16 and decode.block_n <= 32
    assert choose_config(64 * 8, 128, 768, 2048, 132).block_m == 16
    prefill = choose_config(4096 * 8, 128, 2048, 768, 132)
    assert prefill.block_m == 128 and prefill.block_n == 128
    assert choose_config(4096 * 8, 128, 768, 2048, 132, gated=True).block_n == 64
    # float32 operands: the pipeline still fits in shared memory.
    for p in (8, 2048, 32768):
        c = choose_config(p, 128, 768, 2048, 132, gated=True, element_size=4)
        assert c.num_stages * c.block_k * (c.block_m + 2 * c.block_n) * 4 <= 160 * 1024
    # Both projections of a forward share block_m (the alignment).
    assert {choose_config(p, 128, n, k, 132).block_m for p in (8, 2048, 32768) for n, k in ((768, 2048), (2048, 768))
            } == {16, 128}


# ---- GPU ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
# Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, moe_intermediate_size 768.
QWEN3_30B = {"experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768}


def qwen3_experts(tp: int, seed: int) -> FusedMoE:
    torch.manual_seed(seed)
    s = QWEN3_30B
    moe = FusedMoE(
        s["experts"], s["top_k"], s["hidden"], s["intermediate"] // tp, torch.bfloat16, torch.device("cuda")
    )
    with torch.no_grad():
        # About the scale of trained expert weights (std ~ 1 / sqrt(fan_in)).
        moe.w13_weight.normal_(0.0, 0.02)
        moe.w2_weight.normal_(0.0, 0.03)
    return moe


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).abs().max() / exact.abs().max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 256, 1000, 4096])
def test_bf16_qwen3_30b_shape_on_gpu(tp: int, num_tokens: int) -> None:
    """bf16 against the reference loop in bf16 (same roundings, other sum orders) and in
    float32 on the same weights: the kernel's error is of the reference's order. 4096 tokens
    (32768 pairs) takes the torch align steps."""
    moe = qwen3_experts(tp, seed=tp)
    s = QWEN3_30B
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, s["hidden"], generator=gen).to(torch.bfloat16).cuda()
    weights, ids = routing(num_tokens, s["experts"], s["top_k"], gen)
    weights = weights.to(torch.bfloat16).cuda()  # Qwen3-MoE rounds them to the model dtype
    ids = ids.cuda()
    out, ref = run_both(moe, x, weights, ids)
    moe32 = FusedMoE(s["experts"], s["top_k"], s["hidden"], s["intermediate"] // tp, torch.float32, torch.device("cuda"))
    with torch.no_grad():
        moe32.w13_weight.copy_(moe.w13_weight)
        moe32.w2_weight.copy_(moe.w2_weight)
        exact = moe32(x.float(), weights.float(), ids)
    err, err_ref = relative_error(out, exact), relative_error(ref, exact)
    assert err <= 2 * err_ref + 2e-3, (err, err_ref)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 300])
def test_bf16_mixtral_shape_on_gpu(num_tokens: int) -> None:
    """Mixtral-8x7B at tp 2 (8 experts, top-2, hidden 4096, I 14336 / 2): long K loops, few
    experts, routing weights in float32 (Mixtral does not round them)."""
    torch.manual_seed(1)
    moe = FusedMoE(8, 2, 4096, 7168, torch.bfloat16, torch.device("cuda"))
    with torch.no_grad():
        moe.w13_weight.normal_(0.0, 0.015)
        moe.w2_weight.normal_(0.0, 0.012)
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 4096, generator=gen).to(torch.bfloat16).cuda()
    weights, ids = routing(num_tokens, 8, 2, gen)
    out, ref = run_both(moe, x, weights.cuda(), ids.cuda())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.gpu
@needs_cuda
def test_float32_on_gpu() -> None:
    """float32 models take exact float32 products (not TF32)."""
    moe = make_experts(4, seed=5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, HIDDEN, generator=gen).cuda()
    weights, ids = routing(37, NUM_EXPERTS, 4, gen)
    out, ref = run_both(moe, x, weights.cuda(), ids.cuda())
    assert_close_float32(out, ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 16, 512, 1024])
def test_replays_from_cuda_graph(num_tokens: int) -> None:
    """Captured with one routing, replayed with another: the grouping happens on the device.
    1024 tokens (8192 pairs) capture the torch align steps (a decode graph of more than 512
    sequences would)."""
    moe = qwen3_experts(2, seed=0)
    set_kernel_backend(moe, "triton")
    s = QWEN3_30B
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.zeros(num_tokens, s["hidden"], dtype=torch.bfloat16, device="cuda")
    weights = torch.full((num_tokens, s["top_k"]), 1.0 / s["top_k"], dtype=torch.bfloat16, device="cuda")
    ids = torch.arange(s["top_k"], device="cuda").repeat(num_tokens, 1)  # every token on experts 0..7
    with torch.no_grad():
        moe(x, weights, ids)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(x, weights, ids)
        new_w, new_ids = routing(num_tokens, s["experts"], s["top_k"], gen)
        new_x = torch.randn(num_tokens, s["hidden"], generator=gen).to(torch.bfloat16)
        x.copy_(new_x)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        eager = moe(new_x.cuda(), new_w.to(torch.bfloat16).cuda(), new_ids.cuda())
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
