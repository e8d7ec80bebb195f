"""Host time of building one decode step's input batch on a stage, and of its parts.

A stage prepares step n+1 while the device runs step n, so this host time is hidden only
while it stays under the device step. This times `build_input_batch` for N decode
sequences at a given context (deferred tokens gathered on the device, as under
asynchronous scheduling), and the pieces a GPU adds to it (pinned staging, the queued copy,
the sampler's host copy), with the device idle and with it busy on queued work (as when
serving). Prints figures; asserts nothing.

    python3 benchmarks/input_batch_bench.py --seqs 256 --context 640 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.proto import stage_worker_pb2 as pb  # noqa: E402
from shared.sampling_params import SamplingParams  # noqa: E402
from stage_worker.host_upload import upload_packed  # noqa: E402
from stage_worker.input_batch import build_input_batch  # noqa: E402
from stage_worker.layers.sampler import SamplerOutput  # noqa: E402
from stage_worker.sampled_tokens import PLACEHOLDER, SampledToken, SampledTokens, SamplerHostCopy  # noqa: E402
from stage_worker.sequence_state import StageSequence  # noqa: E402


def _median_ms(fn: Callable[[], object], before: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    device = torch.device(args.device)
    n, ctx, bs = args.seqs, args.context, args.block_size
    blocks = -(-ctx // bs)
    prompt = ctx // 2
    seqs = [
        StageSequence(seq_id=i, prompt_token_ids=list(range(prompt)), output_token_ids=list(range(ctx - prompt)),
                      sampling=SamplingParams().to_proto(), block_table=list(range(i * blocks, (i + 1) * blocks)))
        for i in range(n)
    ]
    scheduled = [pb.ScheduledSequence(seq_id=i, start_position=ctx - 1, num_tokens=1, sample=True) for i in range(n)]
    previous = SampledTokens(torch.arange(n, device=device), host_copy=None)

    def defer_last_tokens() -> None:
        # As under asynchronous scheduling: each sequence's last token is the previous step's
        # sample, not known on the host yet.
        for row, seq in enumerate(seqs):
            seq.output_token_ids[-1] = PLACEHOLDER
            seq.deferred = {len(seq.output_token_ids) - 1: SampledToken(previous, row)}

    busy_a = torch.randn(4096, 4096, device=device) if device.type == "cuda" else None

    def idle() -> None:
        defer_last_tokens()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def busy() -> None:
        defer_last_tokens()
        if busy_a is not None:
            torch.cuda.synchronize()
            for _ in range(40):  # ~ tens of ms of queued device work, like a step in flight
                busy_a @ busy_a

    longs = [np.arange(n, dtype=np.int64)] * 4 + [np.arange(n, dtype=np.int64)] * 2
    ints = [np.arange(n + 1, dtype=np.int32), np.arange(n, dtype=np.int32), np.zeros((n, blocks), np.int32)]
    packed = np.zeros(sum(a.nbytes for a in longs + ints), np.uint8)
    output = SamplerOutput(
        token_ids=torch.zeros(n, dtype=torch.long, device=device), logprobs=torch.zeros(n, device=device),
        top_token_ids=torch.zeros(n, 0, dtype=torch.long, device=device),
        top_logprobs=torch.zeros(n, 0, device=device),
    )
    parts: dict[str, Callable[[], object]] = {
        "build_input_batch (whole)": lambda: build_input_batch(scheduled, seqs, bs, device, True, device_metadata=True),
        "upload_packed of its arrays": lambda: upload_packed(longs + ints, device),
    }
    if device.type == "cuda":
        pinned = torch.from_numpy(packed).pin_memory()
        parts |= {
            f"pin_memory() of {packed.nbytes} B": lambda: torch.from_numpy(packed).pin_memory(),
            "pinned .to(device, non_blocking)": lambda: pinned.to(device, non_blocking=True),
            "fill a kept pinned buffer + .to": lambda: (np.copyto(pinned.numpy(), packed),
                                                        pinned.to(device, non_blocking=True)),
            "SamplerHostCopy (sampler's host copy)": lambda: SamplerHostCopy(output),
        }
    print(f"{n} decode sequences at context {ctx} (block size {bs}), {args.device}, median of {args.repeats}")
    print("| part | device idle ms | device busy ms |")
    print("| --- | --- | --- |")
    for name, fn in parts.items():
        for _ in range(3):
            idle()
            fn()
        print(f"| {name} | {_median_ms(fn, idle, args.repeats):.3f} | {_median_ms(fn, busy, args.repeats):.3f} |")
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
