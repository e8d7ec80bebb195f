"""Load generator for a running router: N concurrent streaming clients over the public gRPC
API, random-token prompts of fixed or sampled lengths, and a report of TTFT, time per output
token and output tokens/s, each also as a ratio to the memory-bandwidth roofline of the
layout and, optionally, to `transformers` `generate` at the same batch in the same run.

    stageserve up --model DIR --pp 2 &     # or any running router
    python3 benchmarks/load_generator.py --addr 127.0.0.1:50051 --concurrency 64 \
        --requests 256 --prompt-len 512 --output-len 256 [--hf-baseline DIR]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.grpc_options import channel_options  # noqa: E402
from shared.proto import generation_pb2 as gen  # noqa: E402
from shared.proto import generation_pb2_grpc as gen_grpc  # noqa: E402


@dataclass
class RequestTiming:
    prompt_len: int
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
    extra: dict = field(default_factory=dict)


def _length(spec: str, rng: random.Random) -> int:
    """'512' or '128-1024' (uniform)."""
    if "-" in spec:
        low, high = (int(x) for x in spec.split("-"))
        return rng.randint(low, high)
    return int(spec)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(stub: gen_grpc.GenerationStub, prompt: list[int], output_len: int) -> RequestTiming:
    timing = RequestTiming(prompt_len=len(prompt))
    request = gen.GenerateRequest(
        prompt_token_ids=gen.TokenIds(ids=prompt),
        sampling=gen.SamplingParams(max_new_tokens=output_len, ignore_eos=True),
    )
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
    if first is not None:
        timing.ttft_s = first - start
        if timing.output_tokens > 1:
            timing.tpot_s = (last - first) / (timing.output_tokens - 1)
    return timing


async def run_load(addr: str, concurrency: int, requests: int, prompt_len: str, output_len: str,
                   seed: int) -> tuple[Report, gen.ModelInfo]:
    async with grpc.aio.insecure_channel(addr, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(gen.GetModelInfoRequest())
        rng = random.Random(seed)
        work = [
            ([rng.randrange(3, info.vocab_size) for _ in range(_length(prompt_len, rng))], _length(output_len, rng))
            for _ in range(requests)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        timings: list[RequestTiming] = []

        async def client() -> None:
            while not queue.empty():
                prompt, out = queue.get_nowait()
                timings.append(await _one(stub, prompt, out))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [t for t in timings if not t.error]
    tokens = sum(t.output_tokens for t in ok)
    report = Report(
        concurrency=concurrency, requests=requests, failed=len(timings) - len(ok), wall_s=wall,
        output_tokens=tokens, output_tok_s=tokens / wall,
        ttft_p50_ms=_percentile([t.ttft_s for t in ok], 0.5) * 1e3,
        ttft_p99_ms=_percentile([t.ttft_s for t in ok], 0.99) * 1e3,
        tpot_p50_ms=_percentile([t.tpot_s for t in ok if t.tpot_s], 0.5) * 1e3,
        tpot_p99_ms=_percentile([t.tpot_s for t in ok if t.tpot_s], 0.99) * 1e3,
    )
    return report, info


def roofline_step_s(info: gen.ModelInfo, batch: int, context: int, kv_bytes_per_token: int,
                    copy_rate_bytes_s: float) -> float:
    """Fewest seconds one decode step can take: every weight byte of the slowest stage read
    once (stages run in parallel on their own GPUs), plus the batch's KV bytes."""
    weights = max((s.weight_bytes for s in info.stages), default=0)
    per_stage_kv = kv_bytes_per_token * batch * context / max(1, info.pipeline_parallel_size)
    return (weights + per_stage_kv) / copy_rate_bytes_s


def hf_baseline(model_dir: str, batch: int, prompt_len: int, output_len: int) -> float:
    """transformers `generate` output tokens/s at the same batch (greedy, no eos stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * output_len / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", default="128", help="N or LOW-HIGH")
    p.add_argument("--output-len", default="64", help="N or LOW-HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-rate-gbs", type=float, default=4280.0,
                   help="measured device copy rate, GB/s (H200: ~4280)")
    p.add_argument("--kv-bytes-per-token", type=int, default=0,
                   help="KV bytes one token costs over all layers (for the roofline; 0 ignores KV)")
    p.add_argument("--hf-baseline", default=None, help="model folder: also time transformers generate")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args()
    report, info = asyncio.run(
        run_load(args.addr, args.concurrency, args.requests, args.prompt_len, args.output_len, args.seed)
    )
    mean_prompt = statistics.mean(_length(args.prompt_len, random.Random(i)) for i in range(50))
    mean_out = statistics.mean(_length(args.output_len, random.Random(i)) for i in range(50))
    floor = roofline_step_s(info, args.concurrency, int(mean_prompt + mean_out / 2),
                            args.kv_bytes_per_token, args.copy_rate_gbs * 1e9)
    report.extra["roofline_tpot_ms"] = floor * 1e3
    report.extra["tpot_vs_roofline"] = floor * 1e3 / report.tpot_p50_ms if report.tpot_p50_ms else None
    report.extra["tok_s_vs_roofline"] = report.output_tok_s / (args.concurrency / floor) if floor else None
    if args.hf_baseline:
        hf = hf_baseline(args.hf_baseline, args.concurrency, int(mean_prompt), int(mean_out))
        report.extra["transformers_tok_s"] = hf
        report.extra["tok_s_vs_transformers"] = report.output_tok_s / hf
    print(f"layout pp={info.pipeline_parallel_size} tp={info.tensor_parallel_size} {info.dtype}, "
          f"{report.requests} requests, concurrency {report.concurrency}, {report.failed} failed")
    print("| metric | value |")
    print("| --- | --- |")
    for key, value in {**asdict(report), **report.extra}.items():
        if key != "extra":
            print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report)}, indent=2))


if __name__ == "__main__":
    main()
