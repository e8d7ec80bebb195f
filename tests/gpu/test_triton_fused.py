"""The fused Triton kernels (RMSNorm, add + RMSNorm, rotary, SiluAndMul) against the torch
modules they replace on the GPU (layernorm.py, rotary_embedding.py, activation.py).

Without CUDA the kernels run in Triton's interpreter on CPU tensors: float32 (exact, or
within float32 rounding where torch and the kernel sum or exponentiate differently) and
float16 (within 1 ulp, rotary exact), hidden sizes 64 / 96 (not a power of 2) / 128, 1, 7 and
33 tokens, the chunk loop (RMSNorm) and several column blocks (SiluAndMul) forced with a
small block, rotary on row-strided q/k views of a fused qkv buffer at shuffled positions.
The `gpu` tests repeat this in bf16 at a Llama-3-8B shape and replay all four from a CUDA
graph (on a GPU host:
`python3 -m pytest -q tests/gpu/test_triton_fused.py`).
"""

from __future__ import annotations

import os

import pytest
import torch

from stage_worker.layers import triton_fused
from stage_worker.layers.activation import SiluAndMul
from stage_worker.layers.layernorm import RMSNorm
from stage_worker.layers.rotary_embedding import RotaryEmbedding
from stage_worker.layers.triton_fused import (
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)

pytestmark = pytest.mark.timeout(300)

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
EPS = 1e-5
TOKENS = (1, 7, 33)
HIDDENS = (64, 96, 128)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two 16-bit float tensors."""
    assert a.dtype == b.dtype and a.element_size() == 2

    def ordered(t: torch.Tensor) -> torch.Tensor:
        # Sign-magnitude bits -> integers in the order of the floats (+0 and -0 both 0).
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        magnitude = bits & 0x7FFF
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int) -> None:
    """max_ulp 0: bit-equal. Otherwise float32: relative max_ulp * 2**-23; 16-bit: at most
    max_ulp ulps apart, and at most 1% of the elements not equal."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(expected).all()
    if max_ulp == 0:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    elif actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=max_ulp * 2.0**-23, atol=1e-7)
    else:
        distance = ulp_distance(actual, expected)
        assert int(distance.max()) <= max_ulp
        # Differences come only from the rare last-bit float32 discrepancies (sum order, exp);
        # a missing or extra rounding step shows on a quarter of the elements or more.
        assert float((distance > 0).float().mean()) <= 0.01, float((distance > 0).float().mean())


def make_norm(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, EPS, dtype, DEVICE)
    # Around 1 like trained norm weights, never 0 (a zero weight hides the normalised value).
    norm.weight.data.copy_((1.0 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype))
    return norm


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)


# ---- CPU (interpreter) or GPU ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_rms_norm_matches_module(hidden: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hidden)
    norm = make_norm(hidden, dtype, gen)
    # float32: the sums of squares add in another order, ~1e-6 relative; float16: 1 ulp.
    max_ulp = 8 if dtype == torch.float32 else 1
    for n in TOKENS:
        # A per-row scale, so rows differ in magnitude as hidden states do.
        x = randn((n, hidden), dtype, gen) * randn((n, 1), dtype, gen, 3.0).abs().add(0.1).to(dtype)
        residual = randn((n, hidden), dtype, gen, 2.0)
        x_before, residual_before = x.clone(), residual.clone()
        # max_block 32 forces the two-pass chunk loop (2 to 4 chunks, the last one partial at 96).
        for max_block in (4096, 32):
            assert_close(rms_norm(x, norm.weight, EPS, max_block=max_block), norm(x), max_ulp=max_ulp)
            out, new_residual = fused_add_rms_norm(x, residual, norm.weight, EPS, max_block=max_block)
            expected_out, expected_residual = norm(x, residual)
            assert_close(new_residual, expected_residual, max_ulp=0)
            assert_close(out, expected_out, max_ulp=max_ulp)
        assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_keeps_leading_dims_and_empty_batches() -> None:
    gen = torch.Generator().manual_seed(7)
    norm = make_norm(64, torch.float32, gen)
    x = randn((2, 3, 64), torch.float32, gen)
    assert_close(rms_norm(x, norm.weight, EPS), norm(x), max_ulp=8)
    empty = torch.empty((0, 64), device=DEVICE)
    assert rms_norm(empty, norm.weight, EPS).shape == (0, 64)
    out, residual = fused_add_rms_norm(empty, empty, norm.weight, EPS)
    assert out.shape == residual.shape == (0, 64)


def make_rope(head_dim: int, dtype: torch.dtype, max_position: int = 4096) -> RotaryEmbedding:
    rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    rope = RotaryEmbedding(head_dim, max_position, rope_parameters, None, dtype, DEVICE)
    rope._build_cache()
    return rope


def check_rotary(n: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rope = make_rope(head_dim, dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn((n, q_size + 2 * kv_size), dtype, gen)
    query, key, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)  # row stride q_size + 2 * kv_size
    assert not query.is_contiguous() or n == 1
    # Unsorted, repeated and large positions, as in a mixed batch.
    positions = torch.randint(0, rope.max_position, (n,), generator=gen).to(DEVICE)
    qkv_before = qkv.clone()
    q_out, k_out = rotary_embedding(positions, query, key, rope._cos, rope._sin, head_dim)
    expected_q, expected_k = rope(positions, query, key)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_close(q_out, expected_q, max_ulp=0)
    assert_close(k_out, expected_k, max_ulp=0)
    assert torch.equal(qkv, qkv_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(4, 2, 16), (3, 1, 32), (2, 2, 48)],  # GQA 2, GQA 3 (non power of 2 heads), half dim 24
)
def test_rotary_matches_module(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    for n in TOKENS:
        check_rotary(n, heads, kv_heads, head_dim, dtype, seed=n * 100 + head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", HIDDENS)
def test_silu_and_mul_matches_module(d: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(d)
    # The interpreter's exp is numpy's, torch's on CPU is Sleef's: they differ in the last bit
    # of float32 now and then, which can flip the float16 rounding of silu by 1 ulp, and the
    # product with up then by up to 2 (near a binade edge). On the GPU both call expf.
    max_ulp = 4 if dtype == torch.float32 else 2
    for n in TOKENS:
        # Scale 4 reaches both tails of silu (exp overflowing to inf for very negative gates).
        x = randn((n, 2 * d), dtype, gen, 4.0)
        # One column block, blocks of 64 (the last one half empty at d 96) and of 32.
        for max_block in (4096, 64, 32):
            assert_close(silu_and_mul(x, max_block=max_block), SiluAndMul()(x), max_ulp=max_ulp)


def test_silu_and_mul_wide_rows_with_leading_dims() -> None:
    """Rows wider than SILU_BLOCK spread over several column blocks, the last one partial,
    with leading dims kept."""
    gen = torch.Generator().manual_seed(9)
    d = triton_fused.SILU_BLOCK * 2 + 300
    x = randn((3, 2, 2 * d), torch.float32, gen, 4.0)
    out = silu_and_mul(x)
    assert out.shape == (3, 2, d)
    assert_close(out, SiluAndMul()(x), max_ulp=4)
    assert silu_and_mul(x[:0]).shape == (0, 2, d)


def test_silu_and_mul_reads_row_strided_input() -> None:
    gen = torch.Generator().manual_seed(3)
    wide = randn((5, 3 * 64), torch.float32, gen)
    x = wide[:, :128]  # [5, 128] with row stride 192
    assert_close(silu_and_mul(x), SiluAndMul()(x), max_ulp=4)


# ---- GPU ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
LLAMA3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 14336}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hidden", [4096, 8192])
@pytest.mark.parametrize("n", [1, 33, 512])
def test_bf16_rms_norm_matches_module_on_gpu(hidden: int, n: int) -> None:
    """Bit-equal except where the float32 sum of squares rounds differently: the normalised
    value then differs by 1 ulp, and its product with the weight by up to 2 (seen on an H200
    at hidden 8192, n 512)."""
    gen = torch.Generator().manual_seed(n)
    norm = make_norm(hidden, torch.bfloat16, gen)
    x = randn((n, hidden), torch.bfloat16, gen)
    residual = randn((n, hidden), torch.bfloat16, gen, 4.0)
    assert_close(rms_norm(x, norm.weight, EPS), norm(x), max_ulp=2)
    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, EPS)
    expected_out, expected_residual = norm(x, residual)
    assert_close(new_residual, expected_residual, max_ulp=0)
    assert_close(out, expected_out, max_ulp=2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 33, 512])
def test_bf16_rotary_and_silu_match_modules_on_gpu(n: int) -> None:
    check_rotary(n, LLAMA3_8B["heads"], LLAMA3_8B["kv_heads"], LLAMA3_8B["head_dim"], torch.bfloat16, seed=n)
    gen = torch.Generator().manual_seed(n)
    x = randn((n, 2 * LLAMA3_8B["intermediate"]), torch.bfloat16, gen, 4.0)
    assert_close(silu_and_mul(x), SiluAndMul()(x), max_ulp=0)


@pytest.mark.gpu
@needs_cuda
def test_kernels_replay_from_cuda_graph() -> None:
    """Capture all four once, replay with new contents in the same buffers."""
    hidden, heads, kv_heads, head_dim = (LLAMA3_8B[k] for k in ("hidden", "heads", "kv_heads", "head_dim"))
    n, dtype = 8, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    norm = make_norm(hidden, dtype, gen)
    rope = make_rope(head_dim, dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    x = torch.empty((n, hidden), dtype=dtype, device=DEVICE)
    residual = torch.empty_like(x)
    qkv = torch.empty((n, q_size + 2 * kv_size), dtype=dtype, device=DEVICE)
    positions = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    gate_up = torch.empty((n, 2 * LLAMA3_8B["intermediate"]), dtype=dtype, device=DEVICE)

    def fill(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for buffer in (x, residual, qkv, gate_up):
            buffer.copy_(randn(tuple(buffer.shape), dtype, g))
        positions.copy_(torch.randint(0, rope.max_position, (n,), generator=g))

    def step() -> tuple[torch.Tensor, ...]:
        query, key, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (
            rms_norm(x, norm.weight, EPS),
            *fused_add_rms_norm(x, residual, norm.weight, EPS),
            *rotary_embedding(positions, query, key, rope._cos, rope._sin, head_dim),
            silu_and_mul(gate_up),
        )

    fill(0)
    step()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for seed in (1, 2):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        query, key, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
        expected = (norm(x), *norm(x, residual), *rope(positions, query, key), SiluAndMul()(gate_up))
        for got, want in zip(outputs, expected, strict=True):
            assert_close(got, want, max_ulp=1)
