"""Where a decode step's GPU time goes, without the serving system around it.

Builds one stage holding the whole model (config only, random weights on the GPU, as
`--load-format dummy`), its KV cache and decode CUDA graphs, then for each batch size:

* the graph replay alone (CUDA events, median of many replays) against the roofline of the
  step (weight bytes + the batch's KV bytes over the copy rate);
* lm_head + sampler + the device-to-host copy, as the stage runs them after the replay;
* the kernels inside one replay by total time (torch.profiler), grouped by name.

    python3 benchmarks/decode_step_profile.py --model docs/model-configs/llama-3-8b \\
        --batch-sizes 1,64 --context 512

Prints figures; asserts nothing. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.one_stage import one_stage_runner  # noqa: E402
from shared.proto import stage_worker_pb2 as pb  # noqa: E402
from shared.sampling_params import SamplingParams  # noqa: E402
from stage_worker.input_batch import build_input_batch  # noqa: E402
from stage_worker.kv_cache import bytes_per_block  # noqa: E402
from stage_worker.model_runner import ModelRunner  # noqa: E402
from stage_worker.sampled_tokens import SamplerHostCopy  # noqa: E402
from stage_worker.sequence_state import StageSequence  # noqa: E402

BLOCK_SIZE = 16


def _time_ms(fn, repeats: int) -> float:
    """Median of `repeats` timings of fn() by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _decode_batch(runner: ModelRunner, batch_size: int, context: int):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    seqs, scheduled = [], []
    for i in range(batch_size):
        prompt = [int(t) for t in torch.randint(3, runner.config.vocab_size, (context,))]
        seqs.append(StageSequence(
            seq_id=i, prompt_token_ids=prompt, output_token_ids=[], sampling=SamplingParams().to_proto(),
            block_table=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
        ))
        scheduled.append(pb.ScheduledSequence(seq_id=i, start_position=context - 1, num_tokens=1, sample=True))
    return build_input_batch(scheduled, seqs, BLOCK_SIZE, runner.device, True, device_metadata=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "docs/model-configs/llama-3-8b"))
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--hbm-bytes-per-s", type=float, default=4.15e12)
    p.add_argument("--top-kernels", type=int, default=12)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = p.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    runner = one_stage_runner(args.model, kv_cache_dtype=args.kv_cache_dtype)
    config = runner.config
    num_blocks = max(sizes) * -(-args.context // BLOCK_SIZE) + 8
    runner.init_cache(pb.InitCacheRequest(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max(sizes)))
    weight_bytes = runner.model.parameter_bytes()
    kv_bytes_per_token = bytes_per_block(
        config, runner.model.num_local_kv_heads, config.num_hidden_layers, BLOCK_SIZE, runner.cache_dtype
    ) / BLOCK_SIZE
    print(f"weights {weight_bytes / 1e9:.2f} GB, KV {kv_bytes_per_token / 1024:.0f} KiB/token "
          f"({str(runner.cache_dtype).removeprefix('torch.')}), "
          f"copy rate {args.hbm_bytes_per_s / 1e12:.2f} TB/s, context {args.context}")
    print("| batch | roofline ms | graph replay ms | vs roofline | lm_head+sampler+D2H ms | eager forward ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    profiles = {}
    with torch.inference_mode():
        for size in sizes:
            batch = _decode_batch(runner, size, args.context)
            graphs = runner.graphs
            assert graphs is not None and graphs.covers(batch)
            roofline = (weight_bytes + kv_bytes_per_token * size * args.context) / args.hbm_bytes_per_s * 1e3
            replay = _time_ms(lambda: graphs.run(batch, None), 50)
            hidden = graphs.run(batch, None)

            def tail() -> None:
                SamplerHostCopy(runner._sample(hidden, batch)).values()

            tail_ms = _time_ms(tail, 50)
            eager = _time_ms(lambda: runner.model(batch.input_ids, batch.positions, None, batch.attn_metadata), 10)
            print(f"| {size} | {roofline:.2f} | {replay:.2f} | {roofline / replay:.2f} | {tail_ms:.2f} | {eager:.2f} |")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    graphs.run(batch, None)
                torch.cuda.synchronize()
            totals: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    totals[event.name[:70]] += event.device_time / 3 / 1e3
                    counts[event.name[:70]] += 1
            profiles[size] = (totals, counts)
    for size, (totals, counts) in profiles.items():
        print(f"\nbatch {size}: kernels in one replay (ms per step, launches per step), {sum(totals.values()):.2f} ms total")
        for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top_kernels]:
            print(f"  {ms:7.3f}  {counts[name] // 3:4d}  {name}")


if __name__ == "__main__":
    main()
