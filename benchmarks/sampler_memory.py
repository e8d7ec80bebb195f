"""Time and peak memory of one sampler call at the profile's shape.

The stage's memory profile runs the sampler over max_num_seqs rows with temperature 1,
top_p 0.9 and a seed per row (model_runner.py, `_profile_sample`); this runs the same call on
random logits, once per logits dtype, each dtype in a fresh process so that one variant's
allocations do not hide another's peak. Reported per variant: the median and the fastest
time of a call (the fastest is the steadier figure on a shared machine), and the peak
memory above what was held before the call: on CUDA from the allocator's statistics, on the
CPU from the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before
each call). Prints figures; asserts nothing.

    python3 benchmarks/sampler_memory.py --rows 512 --vocab 128256 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.sampling_params import SamplingParams  # noqa: E402
from stage_worker.layers.sampler import Sampler  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current resident set (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _one(rows: int, vocab: int, dtype: str, device: torch.device, repeats: int, top_p: float) -> dict[str, float]:
    """One variant in this process: median and fastest ms per call, the worst peak above the
    baseline."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g) * 3.0).to(device=device, dtype=_DTYPES[dtype])
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i).to_proto() for i in range(rows)]
    prompts, outputs = [[0]] * rows, [[]] * rows
    sampler = Sampler()
    sampler(logits, params, prompts, outputs)  # warm-up: caches the vocab hash, faults in pages
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            _reset_peak_rss()
            before = _proc_status_kib("VmRSS") * 1024
        started = time.perf_counter()
        out = sampler(logits, params, prompts, outputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        else:
            peaks.append(_proc_status_kib("VmHWM") * 1024 - before)
        del out
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "peak_mib": max(peaks) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtypes", nargs="+", default=list(_DTYPES), choices=list(_DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", action="store_true", help="run the first dtype in this process, print JSON")
    args = p.parse_args()
    if args.one:
        result = _one(args.rows, args.vocab, args.dtypes[0], torch.device(args.device), args.repeats, args.top_p)
        print(json.dumps(result))
        return
    print(f"sampler, {args.rows} x {args.vocab}, top_p {args.top_p}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} calls")
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--one", "--dtypes", dtype, "--rows", str(args.rows),
               "--vocab", str(args.vocab), "--top-p", str(args.top_p), "--device", args.device,
               "--repeats", str(args.repeats)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"  {dtype:>8} logits: median {result['ms']:8.1f} ms, fastest {result['min_ms']:8.1f} ms per call, "
              f"peak {result['peak_mib']:7.0f} MiB above the inputs")


if __name__ == "__main__":
    main()
