"""The MoE experts of one layer on one GPU at the Qwen3-30B-A3B shape of a TP rank (128
experts, top-8, hidden 2048, moe_intermediate_size 768 / tp), bf16: the reference loop
(layers/fused_moe.py) against the Triton path (layers/triton_fused_moe.py), and torch's
grouped matmul where this torch has one, from decode to prefill batch sizes.

    python3 benchmarks/moe_kernel_bench.py [--tp 1] [--tokens 1,2,4,...,4096] [--configs 1,64]
    python3 benchmarks/moe_kernel_bench.py --step-bytes docs/model-configs/qwen3-30b-a3b \
        --batches 1,64 --context 256,640 --copy-rate 3.0e12      # no GPU needed

Per batch size: the experts the batch touches and their weight bytes; times per MoE layer
(median, triton.testing): the Triton path and torch's grouped mm as CUDA-graph replays (as
decode runs them), the reference loop eagerly (it reads counts on the host and cannot be
captured); the Triton path's achieved rate over the touched expert weights (TB/s) and its
fraction of the roofline, the time to read those bytes at the measured device-copy rate;
the align step alone; and the error, max |out - exact| / max |exact|, exact being the
reference loop in float32 on the same bf16 weights and inputs. "block" columns time the
whole sparse block as a decode step runs it (router gate GEMM, routing, experts; CUDA-graph
replays): routing by torch ops (softmax, topk, sum, divide, cast) and by the one-launch
routing kernel (what the Triton backend runs). Each timed call runs
--layers layers with their own weights in turn, so a batch's experts are not read from L2.
--configs times other tiles of each projection at the listed batch sizes.

--step-bytes MODEL_DIR prints the bytes a decode step must read (the roofline of a serving
run): every dense weight a step uses (attention, norms, router gates, lm_head; one embedding
row per sequence), the experts the batch is expected to touch (uniform routing: a layer's
distinct experts are E * (1 - (1 - k/E)^batch)) and the KV cache at the given mean context.
Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stage_worker.layers.fused_moe import FusedMoE, fused_topk  # noqa: E402
from stage_worker.layers.triton_fused_moe import (  # noqa: E402
    MoeConfig,
    choose_block_m,
    choose_config,
    fused_moe,
    moe_align,
)
from stage_worker.layers.triton_fused_moe import fused_topk as triton_fused_topk  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768
TOKENS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"


def make_layers(n: int, inter: int, dtype: torch.dtype) -> list[FusedMoE]:
    layers = []
    for _ in range(n):
        moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, inter, dtype, torch.device("cuda"))
        with torch.no_grad():
            moe.w13_weight.normal_(0.0, 0.02)
            moe.w2_weight.normal_(0.0, 0.03)
        # The block's router gate [E, hidden] (the bench's own attribute).
        moe.gate_weight = torch.randn(EXPERTS, HIDDEN, device="cuda", dtype=dtype) * 0.05
        layers.append(moe)
    return layers


def block_torch_routing(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """The sparse block as the reference backend routes (Qwen3-MoE: weights in the model dtype)."""
    weights, ids = fused_topk(F.linear(x, moe.gate_weight), TOP_K, True)
    return fused_moe(x, moe.w13_weight, moe.w2_weight, weights.to(x.dtype), ids)


def block_fused_routing(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """The sparse block as the Triton backend runs it (models/sparse_moe.py)."""
    weights, ids = triton_fused_topk(F.linear(x, moe.gate_weight), TOP_K, True, x.dtype)
    return fused_moe(x, moe.w13_weight, moe.w2_weight, weights, ids)


def grouped_mm_path():
    """Experts through torch._grouped_mm (sort by expert with torch ops, two grouped
    products, silu, weights, sum over k), or None where this torch or GPU lacks it."""
    if not hasattr(torch, "_grouped_mm"):
        print("torch._grouped_mm: not in this torch")
        return None

    def run(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        flat = ids.reshape(-1)  # [num_pairs]
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // ids.shape[1]]  # [num_pairs, hidden], expert by expert
        gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [num_pairs, 2I]
        inter = gate_up.shape[1] // 2
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [num_pairs, hidden]
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros(flat.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        out[order] = y.to(x.dtype)
        return out.view(x.shape[0], ids.shape[1], -1).sum(1)

    try:
        moe = make_layers(1, 256, torch.bfloat16)[0]
        x = torch.randn(5, HIDDEN, device="cuda", dtype=torch.bfloat16)
        w, ids = fused_topk(torch.randn(5, EXPERTS, device="cuda"), TOP_K, True)
        run(x, moe.w13_weight, moe.w2_weight, w, ids)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        print(f"torch._grouped_mm unavailable here: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    return run


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).abs().max() / exact.abs().max())


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="TP size: each rank holds I / tp of every expert")
    p.add_argument("--tokens", default=TOKENS)
    p.add_argument("--layers", type=int, default=4, help="layers with their own weights per timed call")
    p.add_argument("--configs", default="", help="batch sizes at which to time other tiles, e.g. 1,64,256")
    p.add_argument("--step-bytes", default="", metavar="MODEL_DIR",
                   help="print a decode step's bytes and roofline for this config.json (no GPU needed)")
    p.add_argument("--batches", default="1,64", help="with --step-bytes")
    p.add_argument("--context", default="256,640", help="with --step-bytes: mean context per batch")
    p.add_argument("--copy-rate", type=float, default=0.0, help="with --step-bytes: bytes/s (0: measure)")
    args = p.parse_args()
    if args.step_bytes:
        rate = args.copy_rate or copy_bandwidth()
        step_bytes(args.step_bytes, [int(v) for v in args.batches.split(",")],
                   [float(v) for v in args.context.split(",")], rate)
        return
    from triton.testing import do_bench, do_bench_cudagraph

    inter = INTERMEDIATE // args.tp
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy {bw / 1e12:.2f} TB/s; Qwen3-30B-A3B experts at tp {args.tp}: "
          f"E {EXPERTS}, top {TOP_K}, hidden {HIDDEN}, I {inter}; {args.layers} layers per timed call")
    layers = make_layers(args.layers, inter, torch.bfloat16)
    expert_bytes = (3 * inter * HIDDEN) * 2  # w13 + w2 of one expert, bf16
    grouped = grouped_mm_path()
    gen = torch.Generator().manual_seed(0)
    header = (f"{'tokens':>6}{'experts':>8}{'MB':>7}{'loop us':>9}{'triton us':>10}{'x loop':>8}{'TB/s':>7}"
              f"{'roofline':>9}{'align us':>9}{'gmm us':>8}{'block torch-route':>18}{'block fused-route':>18}"
              f"{'err triton':>11}{'err loop':>9}  tiles (gate_up | down)")
    print(header)
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16).cuda()
        logits = torch.randn(t, EXPERTS, generator=gen).cuda()
        weights, ids = fused_topk(logits, TOP_K, renormalize=True)
        weights = weights.to(torch.bfloat16)  # Qwen3-MoE rounds them to the model dtype
        touched = int(torch.unique(ids).numel())
        nbytes = touched * expert_bytes

        def triton_all() -> None:
            for moe in layers:
                fused_moe(x, moe.w13_weight, moe.w2_weight, weights, ids)

        def loop_all() -> None:
            for moe in layers:
                moe._forward_reference(x, weights, ids)

        t_triton = do_bench_cudagraph(triton_all, return_mode="median") * 1e3 / len(layers)
        t_loop = do_bench(loop_all, return_mode="median") * 1e3 / len(layers)
        cfg13 = choose_config(t * TOP_K, EXPERTS, inter, HIDDEN, num_sms, gated=True)
        cfg2 = choose_config(t * TOP_K, EXPERTS, HIDDEN, inter, num_sms)
        t_align = do_bench_cudagraph(lambda: moe_align(ids, EXPERTS, cfg13.block_m), return_mode="median") * 1e3
        t_gmm = float("nan")
        if grouped is not None:
            try:
                t_gmm = do_bench_cudagraph(
                    lambda: [grouped(x, m.w13_weight, m.w2_weight, weights, ids) for m in layers], return_mode="median"
                ) * 1e3 / len(layers)
            except Exception as exc:  # noqa: BLE001 - e.g. not capturable: time it eagerly
                print(f"    grouped mm in a CUDA graph: {type(exc).__name__}: {str(exc)[:120]}; timed eagerly")
                t_gmm = do_bench(
                    lambda: [grouped(x, m.w13_weight, m.w2_weight, weights, ids) for m in layers], return_mode="median"
                ) * 1e3 / len(layers)
        t_block = do_bench_cudagraph(lambda: [block_torch_routing(m, x) for m in layers],
                                     return_mode="median") * 1e3 / len(layers)
        t_block_fused = do_bench_cudagraph(lambda: [block_fused_routing(m, x) for m in layers],
                                           return_mode="median") * 1e3 / len(layers)
        moe = layers[0]
        exact = FusedMoE(EXPERTS, TOP_K, HIDDEN, inter, torch.float32, torch.device("cuda"))
        with torch.no_grad():
            exact.w13_weight.copy_(moe.w13_weight)
            exact.w2_weight.copy_(moe.w2_weight)
            ref32 = exact._forward_reference(x.float(), weights.float(), ids)
        del exact
        err_triton = relative_error(fused_moe(x, moe.w13_weight, moe.w2_weight, weights, ids), ref32)
        err_loop = relative_error(moe._forward_reference(x, weights, ids), ref32)
        roofline_us = nbytes / bw * 1e6
        print(f"{t:>6}{touched:>8}{nbytes / 1e6:>7.1f}{t_loop:>9.1f}{t_triton:>10.1f}{t_loop / t_triton:>8.2f}"
              f"{nbytes / (t_triton * 1e-6) / 1e12:>7.2f}{roofline_us / t_triton:>9.2f}{t_align:>9.1f}{t_gmm:>8.1f}"
              f"{t_block:>18.1f}{t_block_fused:>18.1f}"
              f"{err_triton:>11.2e}{err_loop:>9.2e}  {_tiles(cfg13)} | {_tiles(cfg2)}")
        if str(t) in args.configs.split(","):
            sweep(layers, x, weights, ids, cfg13, cfg2, inter)


def _tiles(c: MoeConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"


def sweep(layers: list[FusedMoE], x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
          cfg13: MoeConfig, cfg2: MoeConfig, inter: int) -> None:
    """Other tiles for one projection at a time, the other keeping its default; block_m is
    shared by both (it is the alignment), so it is swept for both together."""
    from triton.testing import do_bench_cudagraph

    def timed(c13: MoeConfig, c2: MoeConfig) -> float:
        def run() -> None:
            for moe in layers:
                fused_moe(x, moe.w13_weight, moe.w2_weight, weights, ids, (c13, c2))
        try:
            return do_bench_cudagraph(run, return_mode="median") * 1e3 / len(layers)
        except Exception as exc:  # noqa: BLE001 - a tile the compiler or the GPU refuses
            print(f"      {_tiles(c13)} | {_tiles(c2)}: {type(exc).__name__}")
            return float("nan")

    base = timed(cfg13, cfg2)
    print(f"    default {_tiles(cfg13)} | {_tiles(cfg2)}: {base:.1f} us")
    bm_default = choose_block_m(x.shape[0] * TOP_K, EXPERTS)
    # Decode (block_m 16, the smallest tl.dot takes): the default alone; prefill: the
    # default and the next smaller block_m.
    for bm in sorted({bm_default, bm_default if bm_default <= 16 else bm_default // 2}):
        if bm <= 32:  # memory bound: how many weight columns a program streams, and how deep
            shapes = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for w, st in ((4, 3), (4, 4))]
        else:
            shapes = [(bn, 64, w, st) for bn in (64, 128) for w, st in ((4, 3), (8, 3))]
        rows = []
        for which in ("gate_up", "down"):
            for bn, bk, warps, stages in shapes:
                c = MoeConfig(bm, bn, bk, warps, stages)
                other = cfg2 if which == "gate_up" else cfg13
                other = MoeConfig(bm, other.block_n, other.block_k, other.num_warps, other.num_stages)
                us = timed(c, other) if which == "gate_up" else timed(other, c)
                rows.append((us, which, c))
        for which in ("gate_up", "down"):
            best = sorted((r for r in rows if r[1] == which and r[0] == r[0]), key=lambda r: r[0])[:4]
            print(f"    block_m {bm}, best {which} (the other at its default): "
                  + "; ".join(f"{_tiles(c)} {us:.1f} us" for us, _, c in best))


def step_bytes(model_dir: str, batches: list[int], contexts: list[float], copy_rate: float) -> None:
    """The bytes one decode step reads (see the module's doc) and the roofline they give."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    e, k, inter = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1) or 1
    moe_layers = [i for i in range(layers) if i not in dense_layers and (i + 1) % step == 0]
    b = 2  # bf16
    attention = (h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h + 2 * head_dim + 2 * h) * b
    gate = e * h * b
    dense_mlp = 3 * h * cfg["intermediate_size"] * b
    expert = 3 * inter * h * b
    lm_head = vocab * h * b
    kv_per_token = layers * 2 * kv_heads * head_dim * b
    print(f"{model_dir}: {layers} layers ({len(moe_layers)} MoE), per layer: attention + norms "
          f"{attention / 1e6:.1f} MB, router gate {gate / 1e6:.2f} MB, one expert {expert / 1e6:.2f} MB; "
          f"lm_head {lm_head / 1e9:.3f} GB; KV {kv_per_token / 1e3:.1f} kB per token; copy rate {copy_rate / 1e12:.2f} TB/s")
    print(f"{'batch':>6}{'context':>8}{'experts/layer':>14}{'dense GB':>9}{'experts GB':>11}{'KV GB':>7}"
          f"{'total GB':>9}{'roofline TPOT ms':>17}{'roofline tok/s':>15}")
    for batch, context in zip(batches, contexts):
        touched = e * (1 - (1 - k / e) ** batch)
        dense = (layers * attention + len(moe_layers) * gate + (layers - len(moe_layers)) * dense_mlp
                 + lm_head + batch * h * b + h * b)  # + the embedding rows and the final norm
        experts = len(moe_layers) * touched * expert
        kv = batch * context * kv_per_token
        total = dense + experts + kv
        tpot = total / copy_rate
        print(f"{batch:>6}{context:>8.0f}{touched:>14.2f}{dense / 1e9:>9.3f}{experts / 1e9:>11.3f}{kv / 1e9:>7.3f}"
              f"{total / 1e9:>9.3f}{tpot * 1e3:>17.3f}{batch / tpot:>15.1f}")


if __name__ == "__main__":
    main()
