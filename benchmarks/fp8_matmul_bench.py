"""Block-FP8 linear layers on one GPU: speed and error of the Triton kernel
(layers/triton_fp8_matmul.py) against bf16 cuBLAS and, where this torch has it, torch's
block-scaled FP8 matmul, at Llama-3-8B's four matmul shapes and batch sizes from decode to
prefill.

    python3 benchmarks/fp8_matmul_bench.py [--m 1,16,64,256,1024,4096]

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), as the serving path runs
them. Error: max |out - exact| / max |exact| over the output, where exact is float32 on the
dequantized weight and the unrounded activation; bf16's figure is cuBLAS on the same
dequantized weight in bf16. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stage_worker.layers.block_fp8 import dequantize_block_fp8, quantize_block_fp8  # noqa: E402
from stage_worker.layers.triton_fp8_matmul import (  # noqa: E402
    FP8_MAX,
    MatmulConfig,
    choose_config,
    fp8_block_linear,
)

BLOCK = (128, 128)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def torch_block_scaled_mm():
    """torch's block-scaled FP8 matmul (1x128 activations, 128x128 weights), or None where
    this torch or GPU lacks it. The activation is quantized by separate torch ops first."""

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        groups = x.float().view(m, k // 128, 128)
        scale = (groups.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [m, k/128]
        return (groups / scale[..., None]).to(torch.float8_e4m3fn).view(m, k), scale

    def run(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize(x)
        # cuBLAS wants the activation scales outer-dim-major ([k/128, m] storage).
        return torch._scaled_mm(
            xq, w.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16
        )

    try:
        w, ws = quantize_block_fp8(torch.randn(256, 256), BLOCK)
        run(torch.randn(128, 256, device="cuda", dtype=torch.bfloat16), w.cuda(), ws.cuda())
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        print(f"torch block-scaled _scaled_mm unavailable here: {type(exc).__name__}: {str(exc)[:160]}")
        return None
    return run


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).abs().max() / exact.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,4,16,64,256,1024,4096")
    p.add_argument("--configs-m", default="", help="batch sizes at which to also time other tile configs")
    args = p.parse_args()
    from triton.testing import do_bench_cudagraph

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    scaled_mm = torch_block_scaled_mm()
    copy_bw = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy {copy_bw / 1e12:.2f} TB/s")
    header = f"{'shape':<8}{'M':>6}{'bf16 us':>9}{'fp8 us':>9}{'x bf16':>8}{'fp8 TB/s':>9}{'torch us':>9}{'err fp8':>9}{'err bf16':>9}  config"
    print(header)
    weights = {}
    for name, (n, k) in SHAPES.items():
        w, ws = quantize_block_fp8(torch.randn(n, k, generator=gen) * 0.02, BLOCK)
        weights[name] = (w.to(dev), ws.to(dev), dequantize_block_fp8(w, ws, BLOCK, torch.float32).to(dev))
    for m in [int(v) for v in args.m.split(",")]:
        for name, (n, k) in SHAPES.items():
            w, ws, w32 = weights[name]
            w16 = w32.to(torch.bfloat16)
            x32 = torch.randn(m, k, generator=gen).to(dev)
            x = x32.to(torch.bfloat16)
            exact = x.float() @ w32.t()
            t_bf16 = do_bench_cudagraph(lambda: F.linear(x, w16)) * 1e3
            cfg = choose_config(m, n, -(-k // 128), torch.cuda.get_device_properties(0).multi_processor_count)
            t_fp8 = do_bench_cudagraph(lambda: fp8_block_linear(x, w, ws, BLOCK)) * 1e3
            t_torch = float("nan")
            if scaled_mm is not None:
                try:
                    t_torch = do_bench_cudagraph(lambda: scaled_mm(x, w, ws)) * 1e3
                except RuntimeError as exc:  # cuBLAS refuses some shapes: reported, not hidden
                    print(f"    torch block-scaled _scaled_mm at this shape: {str(exc)[:100]}")
                    scaled_mm = None
            err_fp8 = relative_error(fp8_block_linear(x, w, ws, BLOCK), exact)
            err_bf16 = relative_error(F.linear(x, w16), exact)
            tbps = (w.numel() + ws.numel() * 4 + x.numel() * 2 + m * n * 2) / (t_fp8 * 1e-6) / 1e12
            print(
                f"{name:<8}{m:>6}{t_bf16:>9.1f}{t_fp8:>9.1f}{t_bf16 / t_fp8:>8.2f}{tbps:>9.2f}{t_torch:>9.1f}"
                f"{err_fp8:>9.2e}{err_bf16:>9.2e}  {cfg.block_m}x{cfg.block_n} split {cfg.split_k}"
            )
            if str(m) in args.configs_m.split(","):
                for bm, bn, split, warps, stages in _candidates(m):
                    c = MatmulConfig(bm, bn, split, warps, stages)
                    try:
                        t = do_bench_cudagraph(lambda: fp8_block_linear(x, w, ws, BLOCK, c)) * 1e3
                    except Exception as exc:  # noqa: BLE001 - a tile the compiler refuses
                        print(f"    {c}: {type(exc).__name__}")
                        continue
                    print(f"    {bm}x{bn} split {split} warps {warps} stages {stages}: {t:.1f} us")


def _candidates(m: int) -> list[tuple[int, int, int, int, int]]:
    if m <= 16:
        return [(16, bn, s, 4, 4) for bn in (16, 32, 64) for s in (1, 2, 4)]
    if m <= 64:
        return [(bm, bn, s, w, 4) for bm in (32, 64) for bn in (64, 128) for s in (1, 2, 4) for w in (4, 8)]
    return [(bm, bn, 1, w, st) for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for st in (3, 4)]


def _copy_bandwidth() -> float:
    from triton.testing import do_bench

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3)


if __name__ == "__main__":
    main()
