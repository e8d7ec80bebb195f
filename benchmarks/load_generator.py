"""Load generator for a running router: N concurrent streaming clients over the public gRPC
API, random-token prompts of fixed or sampled lengths, and a report of TTFT, time per output
token (TPOT) and output tokens/s, each also as a ratio to

* the memory-bandwidth roofline of the serving layout: a decode step reads every weight of
  a stage once plus the KV cache of the batch at the mean context, per TP rank, at the
  device copy rate (--hbm-bytes-per-s, or --measure-bandwidth); and
* `transformers` `generate` at the same batch, prompt and output length, greedy, in the
  same run (--hf-baseline DIR; random weights made on the device if DIR has none).

    stageserve up --model docs/model-configs/llama-3-8b --load-format dummy \\
        --gpu-memory-utilization 0.6 &     # room left on the GPU for the transformers baseline
    python3 benchmarks/load_generator.py --addr 127.0.0.1:50051 --concurrency 64 \\
        --requests 256 --prompt-len 512 --output-len 256 \\
        --measure-bandwidth --hf-baseline docs/model-configs/llama-3-8b --json report.json

Every ratio reads "higher is better for stageserve": its speed over the reference's (for
times, reference time / our time), so against the roofline it is the fraction of the
bound reached. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import queue
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.grpc_options import channel_options  # noqa: E402
from shared.proto import generation_pb2 as gen  # noqa: E402
from shared.proto import generation_pb2_grpc as gen_grpc  # noqa: E402

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
ROOFLINE_NOTE = (
    "one decode step of the layout: each stage reads its weights (bytes per TP rank, from the stages) and "
    "the batch's KV at the mean context once, at the copy rate; pp stages run in series for one token, so "
    "the roofline TPOT is the sum over stages, and roofline tok/s is concurrency / that TPOT"
)


@dataclass
class RequestTiming:
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    # Mean gap between output tokens after the first.
    tpot_s: float = 0.0
    error: str = ""


@dataclass
class Report:
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    client_processes: int = 1
    first_error: str = ""


def _length(spec: str, rng: random.Random) -> int:
    """'512' or '128-1024' (uniform)."""
    if "-" in spec:
        low, high = (int(x) for x in spec.split("-"))
        return rng.randint(low, high)
    return int(spec)


def _mean_length(spec: str) -> float:
    if "-" in spec:
        low, high = (int(x) for x in spec.split("-"))
        return (low + high) / 2
    return float(spec)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the load ----------------------------------------------------------------------------------


def finish_timing(timing: RequestTiming, start: float, first: float | None, last: float | None) -> RequestTiming:
    """Fills TTFT (from `start` to the first token) and the mean gap after it."""
    if first is not None:
        timing.ttft_s = first - start
        if timing.output_tokens > 1 and last is not None:
            timing.tpot_s = (last - first) / (timing.output_tokens - 1)
    return timing


async def timed_generate(stub: gen_grpc.GenerationStub, request: gen.GenerateRequest,
                         prompt_len: int = 0) -> RequestTiming:
    """One streamed Generate, timed from the call to each message that carries tokens."""
    timing = RequestTiming(prompt_len=prompt_len)
    start = time.perf_counter()
    first = last = None
    try:
        async for msg in stub.Generate(request):
            if msg.token_ids:
                now = time.perf_counter()
                first = first or now
                last = now
                timing.output_tokens += len(msg.token_ids)
            if msg.finish_reason == gen.FINISH_REASON_ERROR:
                timing.error = msg.error_message
    except grpc.aio.AioRpcError as exc:
        timing.error = f"{exc.code().name}: {exc.details()}"
    return finish_timing(timing, start, first, last)


async def _one(stub: gen_grpc.GenerationStub, prompt: list[int], output_len: int) -> RequestTiming:
    request = gen.GenerateRequest(
        prompt_token_ids=gen.TokenIds(ids=prompt),
        sampling=gen.SamplingParams(max_new_tokens=output_len, ignore_eos=True),
    )
    return await timed_generate(stub, request, len(prompt))


async def _drive(stub: gen_grpc.GenerationStub, work: list[tuple[list[int], int]],
                 concurrency: int) -> tuple[list[RequestTiming], float, float]:
    """`concurrency` clients taking requests off `work` until none is left; their timings and
    the load's start and end (time.monotonic, comparable across this host's processes)."""
    pending: asyncio.Queue = asyncio.Queue()
    for item in work:
        pending.put_nowait(item)
    timings: list[RequestTiming] = []

    async def client() -> None:
        while not pending.empty():
            p, out = pending.get_nowait()
            timings.append(await _one(stub, p, out))

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, start, time.monotonic()


def _client_process(addr: str, work: list[tuple[list[int], int]], concurrency: int,
                    barrier: Any, results: Any) -> None:
    """One client process: connects, waits for the others, then drives its share of the load."""

    async def run() -> tuple[list[RequestTiming], float, float]:
        async with grpc.aio.insecure_channel(addr, options=channel_options()) as channel:
            await channel.channel_ready()
            barrier.wait(timeout=300)  # a sibling that never gets here breaks it, not hangs it
            return await _drive(gen_grpc.GenerationStub(channel), work, concurrency)

    timings, start, end = asyncio.run(run())
    results.put(([asdict(t) for t in timings], start, end))


def _drive_in_processes(addr: str, work: list[tuple[list[int], int]], concurrency: int,
                        processes: int) -> tuple[list[RequestTiming], float, float]:
    """The load split over `processes` client processes that start together: one Python
    process reading hundreds of streams would itself bound the figures it reports."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_client_process, args=(
            addr, work[i::processes], concurrency // processes + (i < concurrency % processes), barrier, results,
        ), daemon=True)
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    parts = []
    while len(parts) < processes:
        try:
            parts.append(results.get(timeout=1.0))
        except queue.Empty:
            # A client process that died (its traceback is on stderr) must not hang the rest.
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if failed:
                for worker in workers:
                    worker.terminate()
                raise RuntimeError(f"{len(failed)} client process(es) failed (exit codes {failed})") from None
    for worker in workers:
        worker.join()
    timings = [RequestTiming(**t) for part in parts for t in part[0]]
    return timings, min(part[1] for part in parts), max(part[2] for part in parts)


def auto_client_processes(concurrency: int) -> int:
    """One client process per 32 streams, leaving most of the host's cores to the server."""
    return max(1, min(-(-concurrency // 32), (os.cpu_count() or 1) // 4))


async def run_load(addr: str, concurrency: int, requests: int, prompt_len: str, output_len: str,
                   seed: int, warmup_requests: int = 0, client_processes: int = 1) -> tuple[Report, gen.ModelInfo]:
    async with grpc.aio.insecure_channel(addr, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(gen.GetModelInfoRequest())
        rng = random.Random(seed)

        def prompt() -> list[int]:
            return [rng.randrange(3, info.vocab_size) for _ in range(_length(prompt_len, rng))]

        # Untimed: first-use costs (kernel compilation, CUDA graph capture, allocator growth)
        # stay out of the figures.
        if warmup_requests > 0:
            await asyncio.gather(*(_one(stub, prompt(), 2) for _ in range(warmup_requests)))
        work = [(prompt(), _length(output_len, rng)) for _ in range(requests)]
        processes = max(1, min(client_processes, concurrency))
        if processes == 1:
            timings, start, end = await _drive(stub, work, concurrency)
        else:
            timings, start, end = await asyncio.get_running_loop().run_in_executor(
                None, _drive_in_processes, addr, work, concurrency, processes
            )
        wall = end - start
        # The layout as it served (the pool and stages are filled in once it serves).
        info = await stub.GetModelInfo(gen.GetModelInfoRequest())
    ok = [t for t in timings if not t.error]
    tokens = sum(t.output_tokens for t in ok)
    report = Report(
        concurrency=concurrency, requests=requests, failed=len(timings) - len(ok), wall_s=wall,
        output_tokens=tokens, output_tok_s=tokens / wall,
        ttft_p50_ms=percentile([t.ttft_s for t in ok], 0.5) * 1e3,
        ttft_p99_ms=percentile([t.ttft_s for t in ok], 0.99) * 1e3,
        tpot_p50_ms=percentile([t.tpot_s for t in ok if t.tpot_s], 0.5) * 1e3,
        tpot_p99_ms=percentile([t.tpot_s for t in ok if t.tpot_s], 0.99) * 1e3,
        client_processes=processes,
        first_error=next((t.error for t in timings if t.error), ""),
    )
    return report, info


# ---- the roofline ------------------------------------------------------------------------------


def measure_copy_bandwidth(device: str, num_bytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy of `num_bytes` (read + write counted), median of
    `repeats` timed with CUDA events (perf_counter on CPU) after a warm-up."""
    import torch

    dev = torch.device(device)
    src = torch.ones(num_bytes, dtype=torch.uint8, device=dev)  # touched, so no page faults on CPU
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * num_bytes / statistics.median(seconds)


def roofline(info: gen.ModelInfo, batch: int, mean_context: float, bytes_per_s: float) -> dict[str, Any]:
    """The layout's decode-step bound; see ROOFLINE_NOTE."""
    stages = []
    for s in info.stages:
        kv_per_token = s.kv_block_bytes / max(1, info.block_size)
        kv = kv_per_token * batch * mean_context
        stages.append({
            "stage": s.stage_index, "layers": [s.first_layer, s.last_layer],
            "weight_bytes_per_rank": s.weight_bytes, "kv_bytes_per_rank": kv,
            "step_s": (s.weight_bytes + kv) / bytes_per_s,
        })
    tpot_s = sum(s["step_s"] for s in stages)
    return {
        "copy_bytes_per_s": bytes_per_s, "batch": batch, "mean_context": mean_context, "stages": stages,
        "tpot_ms": tpot_s * 1e3, "tok_s": batch / tpot_s if tpot_s else None, "note": ROOFLINE_NOTE,
    }


# ---- the transformers baseline -----------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TokenClock:
    """A transformers streamer that notes when each put reaches it: the prompt first, then each
    step's new tokens (moved to the host, so the step has finished)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed_generate(model: Any, prompt: Any, new_tokens: int, pad_token_id: int) -> tuple[float, float, float, Any]:
    """A greedy generate that makes exactly `new_tokens` per row: (seconds to the first new
    token, seconds per later token (0 for one token), seconds in all, the output). Both
    latencies come from this one run, so they cannot disagree with each other."""
    import torch

    clock = _TokenClock()
    _sync(prompt.device)
    t0 = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, pad_token_id=pad_token_id, streamer=clock,
    )
    _sync(prompt.device)
    total = time.perf_counter() - t0
    steps = clock.times[1:]  # [new_tokens]
    per_token = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else 0.0
    return steps[0] - t0, per_token, total, out


def hf_baseline(model_dir: str, device: str, dtype_name: str, batch: int, prompt_len: int, output_len: int,
                seed: int) -> dict[str, Any]:
    """transformers `generate` at `batch` rows: greedy, every row makes all `output_len`
    tokens. TTFT and TPOT from the times its steps' tokens reach the host, in one run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device(device)
    dtype = getattr(torch, dtype_name)
    has_weights = any((Path(model_dir) / f).is_file() for f in WEIGHT_FILES)
    started = time.perf_counter()
    if has_weights:
        if importlib.util.find_spec("accelerate") is not None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(dev))
        else:  # transformers places weights on a device only through accelerate
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev)
    else:
        # Random weights made on the device itself: no CPU copy of 16 GB to move over.
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - started
    gen_cpu = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen_cpu).to(dev)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    with torch.no_grad():
        _timed_generate(model, ids[:, : min(8, prompt_len)], 2, pad)  # warm-up
        ttft_s, tpot_s, wall_s, out = _timed_generate(model, ids, output_len, pad)
    made = out.shape[1] - prompt_len
    result = {
        "model_dir": model_dir, "device": str(dev), "dtype": dtype_name, "batch": batch, "prompt_len": prompt_len,
        "output_len": output_len, "weights": "checkpoint" if has_weights else "random (config.json only)",
        "load_s": load_s, "wall_s": wall_s, "tokens_made": int(made) * batch,
        "tok_s": batch * made / wall_s, "ttft_ms": ttft_s * 1e3,
        "tpot_ms": tpot_s * 1e3 if made > 1 else None,
    }
    del model, out, ids
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- the report --------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator or numerator != numerator or denominator != denominator:
        return None  # missing, zero or NaN
    return numerator / denominator


def ratios(report: Report, bound: dict | None, hf: dict | None) -> dict[str, float | None]:
    """Higher is better for stageserve: its speed over the reference's."""
    out: dict[str, float | None] = {}
    if bound is not None:
        out["tok_s_vs_roofline"] = _ratio(report.output_tok_s, bound["tok_s"])
        out["tpot_p50_vs_roofline"] = _ratio(bound["tpot_ms"], report.tpot_p50_ms)
        out["tpot_p99_vs_roofline"] = _ratio(bound["tpot_ms"], report.tpot_p99_ms)
    if hf is not None and "tok_s" in hf:
        out["tok_s_vs_transformers"] = _ratio(report.output_tok_s, hf["tok_s"])
        out["tpot_p50_vs_transformers"] = _ratio(hf["tpot_ms"], report.tpot_p50_ms)
        out["tpot_p99_vs_transformers"] = _ratio(hf["tpot_ms"], report.tpot_p99_ms)
        out["ttft_p50_vs_transformers"] = _ratio(hf["ttft_ms"], report.ttft_p50_ms)
        out["ttft_p99_vs_transformers"] = _ratio(hf["ttft_ms"], report.ttft_p99_ms)
    return out


def machine() -> dict[str, Any]:
    import torch
    import transformers

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    return {
        "gpus": gpus, "gpu": gpus[0] if gpus else None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "host": platform.node(),
    }


def layout(info: gen.ModelInfo) -> dict[str, Any]:
    return {
        "model_name": info.model_name, "architecture": info.architecture, "num_layers": info.num_layers,
        "pp": info.pipeline_parallel_size, "tp": info.tensor_parallel_size, "dtype": info.dtype,
        "block_size": info.block_size, "num_kv_blocks": info.num_kv_blocks,
        "stages": [{"stage": s.stage_index, "layers": [s.first_layer, s.last_layer], "weight_bytes": s.weight_bytes,
                    "kv_block_bytes": s.kv_block_bytes} for s in info.stages],
    }


def _print_table(report: Report, info: gen.ModelInfo, bound: dict | None, hf: dict | None,
                 ratio: dict[str, float | None]) -> None:
    print(f"layout pp={info.pipeline_parallel_size} tp={info.tensor_parallel_size} {info.dtype}, "
          f"{report.requests} requests, concurrency {report.concurrency}, {report.failed} failed"
          + (f" (first: {report.first_error})" if report.first_error else ""))
    rows: dict[str, Any] = {k: v for k, v in asdict(report).items() if k != "first_error"}
    if bound is not None:
        rows["copy_rate_GB_s"] = bound["copy_bytes_per_s"] / 1e9
        rows["roofline_tpot_ms (stages in series)"] = bound["tpot_ms"]
        rows["roofline_tok_s"] = bound["tok_s"]
    if hf is not None:
        for key in ("tok_s", "ttft_ms", "tpot_ms", "error"):
            if key in hf:
                rows[f"transformers_{key}"] = hf[key]
    rows.update(ratio)
    print("| metric | value |")
    print("| --- | --- |")
    for key, value in rows.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", default="128", help="N or LOW-HIGH")
    p.add_argument("--output-len", default="64", help="N or LOW-HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="untimed 2-token requests sent at once before the load (default: --concurrency)")
    p.add_argument("--hbm-bytes-per-s", type=float, default=None,
                   help="device copy rate for the roofline, bytes/s (H200: ~4.28e12)")
    p.add_argument("--measure-bandwidth", action="store_true",
                   help="measure the copy rate on --hf-device instead (after the load)")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer copied by --measure-bandwidth")
    p.add_argument("--hf-baseline", default=None, metavar="DIR",
                   help="model folder: also time transformers generate (random weights if DIR has none)")
    p.add_argument("--hf-device", default=None, help="device of the baseline (default: cuda:0 if any, else cpu)")
    p.add_argument("--hf-dtype", default=None, help="dtype of the baseline (default: bfloat16 on GPU, else float32)")
    p.add_argument("--baseline-only", action="store_true",
                   help="run only the --hf-baseline (no load, no server needed) and write it to --json")
    p.add_argument("--baseline-json", default=None, metavar="FILE",
                   help="a baseline measured before by --baseline-only, reported beside this load")
    p.add_argument("--client-processes", type=int, default=0,
                   help="processes the streams are split over (default: one per 32 streams, at most a "
                        "quarter of the cores)")
    p.add_argument("--json", default=None, help="write the whole report (figures, args, machine) here")
    args = p.parse_args(argv)
    device = args.hf_device or _default_device()
    mean_prompt, mean_out = _mean_length(args.prompt_len), _mean_length(args.output_len)
    if args.baseline_only:
        # The baseline alone, in a process of its own before any server holds the GPU.
        if not args.hf_baseline or not args.json:
            p.error("--baseline-only needs --hf-baseline and --json")
        dtype = args.hf_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        hf = hf_baseline(args.hf_baseline, device, dtype, args.concurrency, round(mean_prompt), round(mean_out),
                         args.seed)
        print(json.dumps(hf, indent=2))
        Path(args.json).write_text(json.dumps(hf, indent=2) + "\n")
        return
    warmup = args.concurrency if args.warmup_requests is None else args.warmup_requests
    report, info = asyncio.run(run_load(
        args.addr, args.concurrency, args.requests, args.prompt_len, args.output_len, args.seed, warmup,
        args.client_processes or auto_client_processes(args.concurrency),
    ))
    copy_rate, copy_source = args.hbm_bytes_per_s, "given (--hbm-bytes-per-s)"
    if args.measure_bandwidth:
        copy_rate = measure_copy_bandwidth(device, args.bandwidth_mib * 2**20)
        copy_source = f"measured on {device}: {args.bandwidth_mib} MiB copy, read + write, median of 10"
    bound = None
    if copy_rate:
        # Decode steps see contexts from the prompt to prompt + output: the mean is halfway.
        bound = roofline(info, args.concurrency, mean_prompt + mean_out / 2, copy_rate)
        bound["copy_rate_source"] = copy_source
    hf = None
    if args.baseline_json:
        hf = json.loads(Path(args.baseline_json).read_text())
    elif args.hf_baseline:
        dtype = args.hf_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        try:
            hf = hf_baseline(args.hf_baseline, device, dtype, args.concurrency, round(mean_prompt), round(mean_out),
                             args.seed)
        except Exception as exc:  # noqa: BLE001 - reported, so the load's figures still come out
            hint = ""
            if "out of memory" in str(exc).lower():
                hint = (" (the serving stages hold that GPU's memory: start them with a lower "
                        "--gpu-memory-utilization or --kv-cache-bytes, or give --hf-device another GPU)")
            hf = {"error": f"{type(exc).__name__}: {exc}{hint}", "device": device}
    ratio = ratios(report, bound, hf)
    _print_table(report, info, bound, hf, ratio)
    if args.json:
        whole = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv],
            "args": vars(args), "machine": machine(), "layout": layout(info),
            "load": asdict(report), "roofline": bound, "transformers": hf, "ratios": ratio,
        }
        Path(args.json).write_text(json.dumps(whole, indent=2) + "\n")


if __name__ == "__main__":
    main()
