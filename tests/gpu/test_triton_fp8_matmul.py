"""The block-FP8 Triton matmul (layers/triton_fp8_matmul.py) against its plain-torch oracle.

Without CUDA the kernel runs in Triton's interpreter, whose float32 -> float8 conversion
does not round as the GPU's does; the CPU tests therefore feed activations that quantize
exactly (every 128-column group of a row holds FP8 values times one scale, one of them
448), so any difference is the kernel's indexing: partial last blocks in N and K, split-K,
several tile shapes, strided rows. On a GPU (`gpu` marker) random bf16 activations at
Llama-3-8B shapes are compared with the oracle at the product's rounding, under a CUDA graph
too.
"""

from __future__ import annotations

import os

import pytest
import torch

from stage_worker.layers.block_fp8 import quantize_block_fp8
from stage_worker.layers.triton_fp8_matmul import (
    FP8_MAX,
    MatmulConfig,
    choose_config,
    fp8_block_linear,
    reference_fp8_block_linear,
)

pytestmark = pytest.mark.timeout(300)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
BLOCK = (128, 128)


def exactly_quantizable(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[m, k] float32 whose per-row, per-128-group quantization is exact in any rounding."""
    values = torch.randn(m, k, generator=gen).mul(100).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    values[:, ::128] = FP8_MAX  # each group's amax is 448: its scale is exactly `scales`
    # Powers of two: amax / 448 gives the scale back exactly, and x / scale the FP8 values.
    scales = 2.0 ** torch.randint(-3, 4, (m, -(-k // 128)), generator=gen).float()
    return values * scales.repeat_interleave(128, dim=1)[:, :k]


def weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_block_fp8(torch.randn(n, k, generator=gen), BLOCK)


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 200, 300, None),
        (3, 256, 512, MatmulConfig(16, 64, 2, 4, 2)),
        (5, 130, 640, MatmulConfig(16, 32, 3, 4, 2)),  # 5 K-blocks over 3 splits: one split short
        (33, 96, 260, MatmulConfig(16, 32, 1, 4, 2)),  # rows over several M tiles
    ],
)
def test_kernel_indexing_matches_reference(m: int, n: int, k: int, config: MatmulConfig | None) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    x = exactly_quantizable(m, k, gen)
    w, s = weight(n, k, gen)
    got = fp8_block_linear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), BLOCK, config).cpu()
    expected = reference_fp8_block_linear(x, w, s, BLOCK)
    assert got.shape == (m, n)
    # float32 sums in another order (split-K adds partial sums): rounding of the largest terms.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_leading_dims_and_strided_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = exactly_quantizable(6, 384, gen)
    x = wide[:, :256].reshape(2, 3, 256)  # rows 384 apart: a view of a fused buffer
    w, s = weight(64, 256, gen)
    got = fp8_block_linear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), BLOCK, MatmulConfig(16, 32, 1, 4, 2)).cpu()
    expected = reference_fp8_block_linear(x, w, s, BLOCK)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_config_splits_k_only_for_small_batches() -> None:
    assert choose_config(1, 4096, 32, 132).split_k > 1
    assert choose_config(1, 28672, 32, 132).split_k == 1
    assert choose_config(2048, 4096, 32, 132).split_k == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
# Llama-3-8B's four products: qkv, o, gate_up, down.
LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 64, 300, 2048])
def test_bf16_matches_reference_on_gpu(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    for n, k in LLAMA3_8B_SHAPES:
        w, s = weight(n, k, gen)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        got = fp8_block_linear(x.cuda(), w.cuda(), s.cuda(), BLOCK).float().cpu()
        expected = reference_fp8_block_linear(x.float(), w, s, BLOCK)
        # float32 accumulation in another order, then one bf16 rounding of the output.
        torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.gpu
@needs_cuda
def test_replays_from_cuda_graph() -> None:
    gen = torch.Generator().manual_seed(0)
    w, s = (t.cuda() for t in weight(4096, 4096, gen))
    x = torch.zeros(4, 4096, dtype=torch.bfloat16, device="cuda")
    fp8_block_linear(x, w, s, BLOCK)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_block_linear(x, w, s, BLOCK)
    new = torch.randn(4, 4096, generator=gen).to(torch.bfloat16)
    x.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, fp8_block_linear(new.cuda(), w, s, BLOCK), rtol=0, atol=0)


def test_dequantize_kernel_matches_reference() -> None:
    from stage_worker.layers.block_fp8 import dequantize_block_fp8
    from stage_worker.layers.triton_fp8_matmul import dequantize_block_fp8_triton

    gen = torch.Generator().manual_seed(2)
    w, s = weight(200, 300, gen)  # partial last blocks in both dimensions
    got = dequantize_block_fp8_triton(w.to(DEVICE), s.to(DEVICE), BLOCK, torch.float32).cpu()
    assert torch.equal(got, dequantize_block_fp8(w, s, BLOCK, torch.float32))
