"""Where a mixed step's time goes (a prefill chunk beside hundreds of decode rows), and what
the memory profile reserves, without the serving system around them.

Builds one stage holding the whole model (config only, random weights on the GPU, as
`--load-format dummy`), then:

* the memory profile as a stage runs it at start-up (`ModelRunner.profile`): reserved peak
  and KV blocks at the given utilisation and budgets;
* per mixed shape (prefill tokens + decode rows at a context): the eager forward's host time
  (the call returning) against its device time (CUDA events), the achieved TFLOP/s of the
  step's matrix products (2 x linear-layer parameters x tokens) and attention, and what the
  host called while launching it (torch.profiler's CPU events: kernel launches, and any
  synchronising call: a device-to-host copy or stream/device synchronize).

    python3 benchmarks/mixed_step_profile.py --model docs/model-configs/llama-3-8b \\
        --shapes 2048+0,1792+256,1536+512,8192+0,7680+512 --context 512

Prints figures; asserts nothing. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.one_stage import one_stage_runner  # noqa: E402
from shared.config import ModelConfig  # noqa: E402
from shared.proto import stage_worker_pb2 as pb  # noqa: E402
from shared.sampling_params import SamplingParams  # noqa: E402
from stage_worker.input_batch import build_input_batch  # noqa: E402
from stage_worker.model_runner import ModelRunner  # noqa: E402
from stage_worker.sequence_state import StageSequence  # noqa: E402

BLOCK_SIZE = 16
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "Memcpy DtoH", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def _mixed_batch(runner: ModelRunner, prefill: int, decode: int, context: int):
    """One prompt chunk of `prefill` tokens (sampling) and `decode` sequences of `context`
    tokens each taking their next one."""
    seqs, scheduled = [], []
    vocab = runner.config.vocab_size
    next_block = 0
    for i in range(decode + (1 if prefill else 0)):
        is_prefill = prefill and i == decode
        length = prefill if is_prefill else context
        num_blocks = -(-length // BLOCK_SIZE)
        seqs.append(StageSequence(
            seq_id=i, prompt_token_ids=[int(t) for t in torch.randint(3, vocab, (length,))], output_token_ids=[],
            sampling=SamplingParams().to_proto(), block_table=list(range(next_block, next_block + num_blocks)),
        ))
        next_block += num_blocks
        start = 0 if is_prefill else context - 1
        scheduled.append(pb.ScheduledSequence(seq_id=i, start_position=start, num_tokens=length - start, sample=True))
    return build_input_batch(scheduled, seqs, BLOCK_SIZE, runner.device, True, device_metadata=True)


def _linear_params(runner: ModelRunner) -> int:
    """Parameters of the matrix products a token goes through (embedding excluded, lm_head
    counted per sampled row separately)."""
    return sum(p.numel() for n, p in runner.model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)


def _attention_flops(config: ModelConfig, prefill: int, decode: int, context: int) -> float:
    """QK^T and PV: 4 x heads x head_dim per (query, key) pair, causal for the prompt chunk."""
    pairs = prefill * (prefill + 1) / 2 + decode * context
    return 4 * config.num_attention_heads * config.head_dim * pairs * config.num_hidden_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "docs/model-configs/llama-3-8b"))
    p.add_argument("--shapes", default="2048+0,1792+256,1536+512,8192+0,7680+512",
                   help="prefill tokens + decode rows, comma-separated")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", type=int, default=0, help="also list the N costliest kernels of each shape")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("+")) for s in args.shapes.split(",")]
    runner = one_stage_runner(args.model, kv_cache_dtype=args.kv_cache_dtype)
    config = runner.config

    started = time.perf_counter()
    profile = runner.profile(pb.ProfileRequest(
        block_size=BLOCK_SIZE, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
    ))
    print(f"profile ({time.perf_counter() - started:.1f} s): budget {args.max_num_batched_tokens} tokens / "
          f"{args.max_num_seqs} seqs, util {args.gpu_memory_utilization}: reserve "
          f"{profile.peak_activation_bytes / 2**30:.2f} GiB, {profile.num_blocks} KV blocks of "
          f"{profile.block_bytes / 2**20:.1f} MiB, weights {profile.weight_bytes / 2**30:.2f} GiB")

    # Enough blocks for the largest shape (each step's sequences get their own blocks).
    num_blocks = max(d * -(-args.context // BLOCK_SIZE) + -(-pf // BLOCK_SIZE) for pf, d in shapes) + 8
    runner.init_cache(pb.InitCacheRequest(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=0))
    linear = _linear_params(runner)
    print("\n| prefill + decode rows | tokens | host launch ms | device ms | host/device | TFLOP/s "
          "| kernel launches | synchronising calls |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    kernels: list[tuple[str, Counter[str]]] = []
    with torch.inference_mode():
        for prefill, decode in shapes:
            batch = _mixed_batch(runner, prefill, decode, args.context)
            forward = lambda: runner.model(batch.input_ids, batch.positions, None, batch.attn_metadata)  # noqa: E731
            forward()
            torch.cuda.synchronize()
            hosts, devices = [], []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                t0 = time.perf_counter()
                forward()
                hosts.append((time.perf_counter() - t0) * 1e3)
                end.record()
                end.synchronize()
                devices.append(start.elapsed_time(end))
            host, dev = statistics.median(hosts), statistics.median(devices)
            tokens = batch.num_tokens
            flops = 2 * linear * tokens + _attention_flops(config, prefill, decode, args.context)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                forward()
                torch.cuda.synchronize()
            calls = Counter(e.name for e in prof.events())
            launches = sum(n for name, n in calls.items() if "LaunchKernel" in name)
            syncs = {name: n for name, n in calls.items() if any(s in name for s in SYNC_CALLS)}
            # The profiler's own trailing synchronize is not the forward's.
            syncs["cudaDeviceSynchronize"] = syncs.get("cudaDeviceSynchronize", 1) - 1
            syncs = {k: v for k, v in syncs.items() if v}
            print(f"| {prefill} + {decode} | {tokens} | {host:.1f} | {dev:.1f} | {host / dev:.2f} | "
                  f"{flops / dev / 1e9:.0f} | {launches} | {syncs or '-'} |")
            if args.kernels:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kprof:
                    forward()
                    torch.cuda.synchronize()
                totals: Counter[str] = Counter()
                for event in kprof.events():
                    if event.device_type == torch.autograd.DeviceType.CUDA:
                        totals[event.name[:60]] += event.device_time / 1e3
                kernels.append((f"{prefill} + {decode}", totals))
    for shape, totals in kernels:
        print(f"\n{shape}: kernel time per forward (ms), {sum(totals.values()):.1f} ms in all")
        for name, ms in totals.most_common(args.kernels):
            print(f"  {ms:8.2f}  {name}")


if __name__ == "__main__":
    main()
