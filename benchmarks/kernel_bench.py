"""Decode attention and SiluAndMul kernels, old against new, at the Llama-3-8B shape (bf16).

    python3 benchmarks/kernel_bench.py [--quick] [--budget-s 120]

Needs a CUDA GPU. For each batch (1, 64, 256) and context (512, 2048):

* checks the split-KV decode path (paged_attention's default for max_query_len == 1) and
  the general kernel (split_kv=False) against a float32 torch reference on random data
  with shuffled block tables (block tables as wide as a CUDA graph's, 8192 tokens; context
  lengths a little under the nominal context so they end mid-block), relative error
  ||out - ref|| / ||ref||;
* times both inside a CUDA graph of 32 calls (one per layer; distinct caches per call up
  to 256 MB of them, so small batches do not run from L2), median of replays through
  triton.testing.do_bench, reported per call and per 32-layer step.

Then a sweep of the split kernel's tiles (BLOCK_N, warps, stages) and split counts at a few
shapes (skipped when the time budget is spent), and SiluAndMul, the old one-program-per-row
kernel (a copy, below) against the new (rows x column blocks) grid, bit-compared.
Prints tables; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stage_worker.layers import triton_decode_attention  # noqa: E402
from stage_worker.layers.triton_attention import paged_attention  # noqa: E402
from stage_worker.layers.triton_decode_attention import decode_num_splits, paged_decode_split_kv  # noqa: E402
from stage_worker.layers.triton_fused import _exp, silu_and_mul  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
INTERMEDIATE = 14336
LAYERS = 32
GRAPH_TABLE_TOKENS = 8192  # block-table width of a captured graph (max model length)
DTYPE = torch.bfloat16
ERR_TOL = 1e-2


class Problem:
    """Decode inputs for `batch` sequences of about `context` tokens, `copies` distinct caches."""

    def __init__(self, batch: int, context: int, copies: int, seed: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq + 1
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        self.k_caches = [torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE) for _ in range(copies)]
        self.v_caches = [torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE) for _ in range(copies)]
        width = max(GRAPH_TABLE_TOKENS, context) // BLOCK_SIZE
        perm = torch.randperm(num_blocks - 1, generator=gen, device="cuda").to(torch.int32) + 1
        self.block_tables = torch.zeros((batch, width), dtype=torch.int32, device="cuda")
        self.block_tables[:, :blocks_per_seq] = perm.view(batch, blocks_per_seq)
        # Contexts end 0..31 tokens short of `context`: mid-block and mid-tile ends.
        short = torch.randint(0, 32, (batch,), generator=gen, device="cuda")
        self.context_lens = (context - short).clamp(min=1).to(torch.int32)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        qkv = torch.randn((batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM), generator=gen, device="cuda", dtype=DTYPE)
        self.query = qkv[:, : HEADS * HEAD_DIM].view(batch, HEADS, HEAD_DIM)  # strided, as the model's
        self.batch, self.context, self.blocks_per_seq = batch, context, blocks_per_seq
        self.scale = HEAD_DIM**-0.5

    def kv_bytes(self) -> int:
        return int(self.context_lens.sum().item()) * KV_HEADS * HEAD_DIM * 2 * 2

    def reference(self) -> torch.Tensor:
        """float32 attention of the query over cache copy 0: [batch, heads, head_dim]."""
        b, n = self.batch, self.blocks_per_seq * BLOCK_SIZE
        table = self.block_tables[:, : self.blocks_per_seq].long()
        k = self.k_caches[0][table].view(b, n, KV_HEADS, HEAD_DIM).float()
        v = self.v_caches[0][table].view(b, n, KV_HEADS, HEAD_DIM).float()
        q = self.query.float().view(b, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        s = torch.einsum("bhgd,bnhd->bhgn", q, k) * self.scale
        visible = torch.arange(n, device="cuda")[None, :] < self.context_lens[:, None].long()  # [b, n]
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        out = torch.einsum("bhgn,bnhd->bhgd", s.softmax(-1), v)
        return out.reshape(b, HEADS, HEAD_DIM)

    def call(self, i: int, out: torch.Tensor, **kw) -> torch.Tensor:
        c = i % len(self.k_caches)
        return paged_attention(
            self.query, self.k_caches[c], self.v_caches[c], self.query_start_loc, self.context_lens,
            self.block_tables, 1, self.scale, out=out, **kw,
        )

    def call_split(self, i: int, out: torch.Tensor, **kw) -> torch.Tensor:
        c = i % len(self.k_caches)
        return paged_decode_split_kv(
            self.query, self.k_caches[c], self.v_caches[c], self.query_start_loc, self.context_lens,
            self.block_tables, self.scale, out, **kw,
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


def graph_time_ms(step, calls: int = LAYERS) -> float:
    """Median ms of one replay of a graph holding `calls` calls step(i)."""
    step(0)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph
    return ms


def copies_for(batch: int, context: int) -> int:
    per_layer = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    return max(1, min(LAYERS, math.ceil(256e6 / per_layer)))


# ---------------------------------------------------------------- attention


def attention_table(batches, contexts, failures: list[str]) -> None:
    print("\n== decode attention, Llama-3-8B shape (32 q / 8 kv heads, d 128, bf16, block 16), per call "
          "in a 32-call CUDA graph ==")
    header = (f"{'batch':>5} {'ctx':>5} {'splits':>6} {'err new':>9} {'err old':>9} {'new-old':>9} "
              f"{'old us':>8} {'new us':>8} {'speedup':>7} {'old ms/32L':>10} {'new ms/32L':>10} {'new TB/s':>8}")
    print(header)
    for batch in batches:
        for context in contexts:
            try:
                p = Problem(batch, context, copies_for(batch, context), seed=batch * 7919 + context)
                splits = decode_num_splits(batch, KV_HEADS, p.block_tables.shape[1] * BLOCK_SIZE, 64, p.query.device)
                ref = p.reference()
                out_new = torch.full(p.query.shape, float("nan"), dtype=DTYPE, device="cuda")
                out_old = torch.full_like(out_new, float("nan"))
                p.call(0, out_new)
                p.call(0, out_old, split_kv=False)
                torch.cuda.synchronize()
                e_new, e_old = rel_err(out_new, ref), rel_err(out_old, ref)
                e_diff = rel_err(out_new, out_old.float())
                for name, e in (("new", e_new), ("old", e_old)):
                    if not e <= ERR_TOL:
                        failures.append(f"attention {name} batch {batch} ctx {context}: rel err {e:.2e}")
                outs = [torch.empty(p.query.shape, dtype=DTYPE, device="cuda") for _ in range(2)]
                t_old = graph_time_ms(lambda i: p.call(i, outs[0], split_kv=False)) / LAYERS
                t_new = graph_time_ms(lambda i: p.call(i, outs[1])) / LAYERS
                tbs = p.kv_bytes() / (t_new * 1e-3) / 1e12
                print(f"{batch:>5} {context:>5} {splits:>6} {e_new:>9.2e} {e_old:>9.2e} {e_diff:>9.2e} "
                      f"{t_old * 1e3:>8.1f} {t_new * 1e3:>8.1f} {t_old / t_new:>6.2f}x "
                      f"{t_old * LAYERS:>10.3f} {t_new * LAYERS:>10.3f} {tbs:>8.2f}", flush=True)
                del p, ref, out_new, out_old, outs
                torch.cuda.empty_cache()
            except Exception as exc:  # keep going: one call of the device is all there is
                failures.append(f"attention batch {batch} ctx {context}: {type(exc).__name__}: {exc}")
                print(f"{batch:>5} {context:>5} ERROR {type(exc).__name__}: {exc}", flush=True)


def graph_replay_check(failures: list[str]) -> None:
    """One graph captured at batch 8, replayed with new contents of the same buffers."""
    p = Problem(8, 2048, 1, seed=99)
    out = torch.empty(p.query.shape, dtype=DTYPE, device="cuda")
    p.call(0, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p.call(0, out)
    errs = []
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        p.query.copy_(torch.randn(p.query.shape, generator=gen, device="cuda", dtype=DTYPE))
        p.context_lens.copy_(torch.randint(1, 2048, (8,), generator=gen, device="cuda").to(torch.int32))
        p.context_lens[-2:] = 0  # graph padding rows
        p.k_caches[0].normal_(generator=gen)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        live = p.context_lens > 0
        errs.append(rel_err(out[live], p.reference()[live]))
        if not torch.equal(out[~live], torch.zeros_like(out[~live])):
            failures.append("graph replay: padding rows not zero")
    print(f"\ngraph replay (batch 8, 2 padding rows, new contents): rel err {', '.join(f'{e:.2e}' for e in errs)}")
    if not all(e <= ERR_TOL for e in errs):
        failures.append(f"graph replay rel err {errs}")


SWEEP_TILES = [  # (BLOCK_N, num_warps, num_stages); None: the wrapper's default
    (64, 4, None), (64, 4, 3), (32, 4, 2), (32, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3),
]
SWEEP_SHAPES = [(1, 512), (256, 512), (64, 512), (256, 2048), (1, 2048), (64, 2048)]  # most telling first


def sweep(deadline: float, failures: list[str]) -> None:
    print("\n== split kernel sweep: us per call (32-call graph); rel err vs float32 reference ==")
    for batch, context in SWEEP_SHAPES:
        if time.perf_counter() > deadline:
            print(f"batch {batch} ctx {context}: skipped (time budget)")
            continue
        p = Problem(batch, context, copies_for(batch, context), seed=batch + context)
        ref = p.reference()
        default = decode_num_splits(batch, KV_HEADS, p.block_tables.shape[1] * BLOCK_SIZE, 64, p.query.device)
        split_options = sorted({default, *[s for s in (1, 2, 4, 8, 16, 32, 64) if default / 4 <= s <= default * 4]})
        rows = [(64, 4, None, s) for s in split_options if s != default]
        rows = [(bn, w, st, default) for bn, w, st in SWEEP_TILES] + rows
        cells = []
        for bn, warps, stages, splits in rows:
            if time.perf_counter() > deadline:
                cells.append("(budget)")
                break
            kw = {"block_n": bn, "num_warps": warps, "num_stages": stages, "num_splits": splits}
            try:
                out = torch.full(p.query.shape, float("nan"), dtype=DTYPE, device="cuda")
                p.call_split(0, out, **kw)
                torch.cuda.synchronize()
                err = rel_err(out, ref)
                if not err <= ERR_TOL:
                    failures.append(f"sweep batch {batch} ctx {context} {kw}: rel err {err:.2e}")
                us = graph_time_ms(lambda i: p.call_split(i, out, **kw)) / LAYERS * 1e3
                cells.append(f"n{bn}/w{warps}/s{stages or 'd'}/sp{splits}: {us:.1f} ({err:.0e})")
            except Exception as exc:
                cells.append(f"n{bn}/w{warps}/s{stages or 'd'}/sp{splits}: ERROR {type(exc).__name__}")
                failures.append(f"sweep batch {batch} ctx {context} {kw}: {type(exc).__name__}: {exc}")
        print(f"batch {batch} ctx {context} (default splits {default}):")
        for i in range(0, len(cells), 3):
            print("   " + " | ".join(cells[i : i + 3]), flush=True)
        del p, ref
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- SiluAndMul


@triton.jit
def _old_silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, D: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr
):
    """The previous kernel: one program per row, looping over the columns."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        gate = tl.load(x_row + offs, mask=mask, other=0.0)
        up = tl.load(x_row + D + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = tl.math.div_rn(g, 1.0 + _exp(-g, LIBDEVICE)).to(gate.dtype)
        tl.store(out_row + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def old_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    out = torch.empty((x.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), 4096)
    _old_silu_and_mul_kernel[(x.shape[0],)](
        x, out, x.stride(0), out.stride(0), D=d, BLOCK=block, LIBDEVICE=True,
        num_warps=min(max(block // 512, 1), 8), enable_fp_fusion=False,
    )
    return out


def silu_table(failures: list[str]) -> None:
    print(f"\n== SiluAndMul [rows, 2 x {INTERMEDIATE}] bf16, per call in a 32-call CUDA graph ==")
    print(f"{'rows':>5} {'old==new':>8} {'new==torch':>10} {'old us':>8} {'new us':>8} {'speedup':>7} "
          f"{'old ms/32L':>10} {'new ms/32L':>10}")
    for rows in (1, 64, 256):
        try:
            x = 4 * torch.randn((rows, 2 * INTERMEDIATE), device="cuda", dtype=DTYPE)
            new, old = silu_and_mul(x), old_silu_and_mul(x)
            g, u = x.chunk(2, dim=-1)
            same_old = torch.equal(new, old)
            same_torch = torch.equal(new, torch.nn.functional.silu(g) * u)
            if not same_old:
                failures.append(f"silu rows {rows}: new != old kernel")
            t_old = graph_time_ms(lambda i: old_silu_and_mul(x)) / LAYERS
            t_new = graph_time_ms(lambda i: silu_and_mul(x)) / LAYERS
            print(f"{rows:>5} {str(same_old):>8} {str(same_torch):>10} {t_old * 1e3:>8.2f} {t_new * 1e3:>8.2f} "
                  f"{t_old / t_new:>6.2f}x {t_old * LAYERS:>10.3f} {t_new * LAYERS:>10.3f}", flush=True)
        except Exception as exc:
            failures.append(f"silu rows {rows}: {type(exc).__name__}: {exc}")
            print(f"{rows:>5} ERROR {type(exc).__name__}: {exc}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 256 at context 512 only, no sweep")
    parser.add_argument("--budget-s", type=float, default=120.0, help="the sweep stops past this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    started = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}; "
          f"split target {triton_decode_attention.DECODE_PROGRAMS_PER_SM} programs/SM, max {triton_decode_attention.MAX_DECODE_SPLITS} splits")
    failures: list[str] = []
    torch.manual_seed(0)
    batches, contexts = ((1, 256), (512,)) if args.quick else ((1, 64, 256), (512, 2048))
    attention_table(batches, contexts, failures)
    try:
        graph_replay_check(failures)
    except Exception as exc:
        failures.append(f"graph replay: {type(exc).__name__}: {exc}")
        print(f"graph replay ERROR {type(exc).__name__}: {exc}")
    silu_table(failures)
    if not args.quick:
        sweep(started + args.budget_s, failures)
    print(f"\n{time.perf_counter() - started:.0f} s; " + ("all checks passed" if not failures else "FAILURES:"))
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
