"""The OpenAI front's cost at load: N concurrent streams through the front (`POST
/v1/completions`, server-sent events) against the same streams straight over gRPC, on one
running `stageserve up --openai-port`, in one invocation.

Both sides send the router the same requests: the same random token-id prompts, greedy,
`ignore_eos`, the same `max_tokens`, so every stream makes the same number of tokens. The
sides alternate (front, gRPC, then gRPC, front, ...) over --rounds rounds, so a drift in the
machine's load (other processes on a shared host) falls on both; the figure is the ratio of
the sides' median output tok/s. Each run also reads, from /proc, the CPU seconds of the
router, the stages, the front process and this client, and how busy the whole machine was.

    python3 benchmarks/openai_front_load.py --concurrency 256 --prompt-len 32 --output-len 64 --rounds 8

The HTTP side is a minimal asyncio HTTP/1.1 client (keep-alive, chunked body, SSE events
split and each JSON-decoded), not httpx or the openai SDK: the client shares the host's cores
with the server, and a heavier client stack would be charged to the front. Tokens per stream
come from the final `usage` chunk (a chunk may carry no token: a multi-byte character's first
byte has no text yet). The model needs its tokenizer: the front sends a chunk only for a
message with text, and a router without one sends none. Linux only (/proc). Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.load_generator import RequestTiming, finish_timing, percentile, timed_generate  # noqa: E402
from benchmarks.process_cpu import cpu_seconds, deployment_processes  # noqa: E402
from shared.grpc_options import channel_options  # noqa: E402
from shared.proto import generation_pb2 as gen  # noqa: E402
from shared.proto import generation_pb2_grpc as gen_grpc  # noqa: E402
from stageserve.launcher import free_port  # noqa: E402
from stageserve.openai_front.health_probe import front_is_healthy  # noqa: E402

SIDES = ("front", "grpc")
# Process roles (benchmarks/process_cpu.py's, plus "openai" and "client") in the report's groups.
GROUPS = ("front", "router", "stages", "client")


def group_of(role: str) -> str:
    return {"openai": "front", "router": "router", "client": "client"}.get(role, "stages")


@dataclass
class Run:
    """One timed load through one side."""

    side: str
    round: int
    wall_s: float
    streams: int
    failed: int
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    # CPU seconds during the run, by process role (router, stage0, openai, client).
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Cores the whole machine kept busy during the run, and those of processes not ours.
    machine_busy_cores: float = 0.0
    other_busy_cores: float = 0.0
    first_error: str = ""


def summarize(side: str, round_: int, timings: list[RequestTiming], wall_s: float) -> Run:
    ok = [t for t in timings if not t.error]
    tokens = sum(t.output_tokens for t in ok)
    return Run(
        side=side, round=round_, wall_s=wall_s, streams=len(timings), failed=len(timings) - len(ok),
        output_tokens=tokens, output_tok_s=tokens / wall_s if wall_s > 0 else float("nan"),
        ttft_p50_ms=percentile([t.ttft_s for t in ok], 0.5) * 1e3,
        tpot_p50_ms=percentile([t.tpot_s for t in ok if t.tpot_s], 0.5) * 1e3,
        first_error=next((t.error for t in timings if t.error), ""),
    )


def side_order(round_: int) -> tuple[str, str]:
    """Front first in even rounds, gRPC first in odd ones: neither side always runs on the
    warmer (or quieter) half of a round."""
    return SIDES if round_ % 2 == 0 else SIDES[::-1]


def compare(runs: list[Run]) -> dict[str, Any]:
    """Per side: the median of its runs' tok/s, TTFT p50 and TPOT p50, and CPU seconds per 1k
    tokens of each group of processes over all its runs; the ratio front / gRPC of the median
    tok/s (higher is better for the front; 1.0: it costs nothing), and of each round's pair.

    Also the ratio of the server's CPU per token (front, router, stages; gRPC side over front
    side): the tok/s ratio a host whose cores the server alone keeps busy would see."""
    out: dict[str, Any] = {"sides": {}}
    for side in SIDES:
        mine = [r for r in runs if r.side == side]
        tokens = sum(r.output_tokens for r in mine)
        cpu = dict.fromkeys(GROUPS, 0.0)
        for r in mine:
            for role, seconds in r.cpu_s.items():
                cpu[group_of(role)] += seconds
        per_1k = {group: seconds / tokens * 1e3 if tokens else float("nan") for group, seconds in cpu.items()}
        per_1k["server"] = per_1k["front"] + per_1k["router"] + per_1k["stages"]
        out["sides"][side] = {
            "runs": len(mine),
            "output_tok_s": statistics.median(r.output_tok_s for r in mine),
            "ttft_p50_ms": statistics.median(r.ttft_p50_ms for r in mine),
            "tpot_p50_ms": statistics.median(r.tpot_p50_ms for r in mine),
            "cpu_s_per_1k_tokens": per_1k,
            "other_busy_cores": statistics.median(r.other_busy_cores for r in mine),
        }
    front, direct = out["sides"]["front"], out["sides"]["grpc"]
    out["ratio"] = front["output_tok_s"] / direct["output_tok_s"]
    out["server_cpu_ratio"] = direct["cpu_s_per_1k_tokens"]["server"] / front["cpu_s_per_1k_tokens"]["server"]
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r.round, {})[r.side] = r.output_tok_s
    out["round_ratios"] = [pair["front"] / pair["grpc"] for _, pair in sorted(by_round.items()) if len(pair) == 2]
    out["round_ratio_median"] = statistics.median(out["round_ratios"]) if out["round_ratios"] else float("nan")
    return out


# ---- server-sent events over a bare HTTP/1.1 connection -------------------------------------


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The `data:` payloads of the complete events in `buffer` (events end with a blank
    line), and what is left of an event not complete yet."""
    *events, rest = buffer.split(b"\n\n")
    payloads = []
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payloads.append(line[5:].strip())
    return payloads, rest


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to the front, for one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        """Sends the request; the response's status and headers (lower-case names)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body_parts(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The response body as it arrives: chunked (a stream) or of a Content-Length."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()  # the CRLF after the last (empty) chunk
                    break
                yield (await self.reader.readexactly(size + 2))[:-2]
        else:
            yield await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()


async def front_stream(conn: HttpConnection, body: bytes) -> RequestTiming:
    timing = RequestTiming()
    start = time.perf_counter()
    first = last = None
    try:
        status, headers = await conn.post("/v1/completions", body)
        buffer = b""
        async for part in conn.body_parts(headers):
            if status != 200:
                timing.error = f"HTTP {status}: {part[:300].decode(errors='replace')}"
                continue
            payloads, buffer = split_events(buffer + part)
            for payload in payloads:
                if payload == b"[DONE]":
                    continue
                event = json.loads(payload)
                if "error" in event:
                    timing.error = event["error"].get("message", str(event["error"]))
                elif event.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                elif event.get("usage"):
                    timing.output_tokens = event["usage"]["completion_tokens"]
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
        await conn.close()
    return finish_timing(timing, start, first, last)


def completion_body(model: str, prompt: list[int], output_len: int) -> bytes:
    """The HTTP request that is the same router request as `grpc_request`'s."""
    return json.dumps({
        "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()


def grpc_request(prompt: list[int], output_len: int) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        prompt_token_ids=gen.TokenIds(ids=prompt),
        sampling=gen.SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True),
    )


async def drive(side: str, prompts: list[list[int]], output_len: int, concurrency: int,
                stub: gen_grpc.GenerationStub, front: tuple[str, int], model: str) -> tuple[list[RequestTiming], float]:
    """`concurrency` clients taking prompts until none is left; their timings and the wall time."""
    pending = list(reversed(prompts))
    timings: list[RequestTiming] = []

    async def client() -> None:
        conn = HttpConnection(*front)
        try:
            while pending:
                prompt = pending.pop()
                if side == "front":
                    timings.append(await front_stream(conn, completion_body(model, prompt, output_len)))
                else:
                    timings.append(await timed_generate(stub, grpc_request(prompt, output_len)))
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores; /proc/stat's first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    # guest time is already inside user / nice.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_now(roles: dict[str, int]) -> dict[str, float]:
    out = {role: cpu_seconds(pid) for role, pid in roles.items()}
    out["client"] = time.process_time()
    return out


async def measure(args: argparse.Namespace, roles: dict[str, int], router: str,
                  front: tuple[str, int]) -> tuple[list[Run], gen.ModelInfo]:
    async with grpc.aio.insecure_channel(router, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(gen.GetModelInfoRequest())
        rng = random.Random(args.seed)
        requests = args.requests or args.concurrency
        prompts = [[rng.randrange(3, info.vocab_size) for _ in range(args.prompt_len)] for _ in range(requests)]
        # Untimed, on other prompts: first-use costs of both paths stay out of the figures.
        warm = [[rng.randrange(3, info.vocab_size) for _ in range(args.prompt_len)]
                for _ in range(min(requests, 64))]
        for side in SIDES:
            await drive(side, warm, 4, len(warm), stub, front, info.model_name)
        runs = []
        for round_ in range(args.rounds):
            for side in side_order(round_):
                before, busy_before = cpu_now(roles), machine_busy_s()
                timings, wall = await drive(side, prompts, args.output_len, args.concurrency, stub, front,
                                            info.model_name)
                after, busy = cpu_now(roles), machine_busy_s() - busy_before
                run = summarize(side, round_, timings, wall)
                run.cpu_s = {role: after[role] - before[role] for role in after}
                run.machine_busy_cores = busy / wall
                run.other_busy_cores = max(0.0, busy - sum(run.cpu_s.values())) / wall
                runs.append(run)
                print(f"round {round_} {side:5s}: {run.output_tok_s:7.1f} tok/s in {wall:5.1f} s, "
                      f"TTFT p50 {run.ttft_p50_ms:6.0f} ms, TPOT p50 {run.tpot_p50_ms:6.1f} ms, "
                      f"front CPU {run.cpu_s.get('openai', 0.0):5.2f} s, other load {run.other_busy_cores:.2f} "
                      f"cores, {run.failed} failed" + (f" ({run.first_error})" if run.first_error else ""),
                      flush=True)
    return runs, info


# ---- the server -----------------------------------------------------------------------------


def start_server(args: argparse.Namespace, port: int, openai_port: int, log: Any) -> subprocess.Popen:
    # This interpreter and this checkout's CLI module, so the server is this checkout's code.
    cmd = [sys.executable, "-m", "stageserve.cli", "up", "--port", str(port), "--openai-port", str(openai_port),
           "--max-num-seqs", str(args.concurrency), "--device", args.device, "--pp", str(args.pp),
           # The same prompts run on both sides and in every round: no run may find them cached.
           "--no-prefix-caching"]
    if args.model:
        cmd += ["--model", args.model]
    if args.stream_interval:
        cmd += ["--stream-interval", str(args.stream_interval)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=None if args.verbose else log)


def wait_until_serving(server: subprocess.Popen, url: str, log: Any, timeout: float = 600.0) -> None:
    """The front's /health is 200 only once it runs and the router serves."""
    deadline = time.monotonic() + timeout
    while not front_is_healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"stageserve up did not start; the end of its log:\n{tail}")
        time.sleep(0.3)


def front_process(root: int) -> int:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    for line in out:
        pid, ppid, cmd = line.split(None, 2)
        if int(ppid) == root and " openai " in f" {cmd} ":
            return int(pid)
    raise RuntimeError("no OpenAI front process under stageserve up")


# ---- the report -----------------------------------------------------------------------------


def print_report(runs: list[Run], result: dict[str, Any], goal: float) -> None:
    front, direct = result["sides"]["front"], result["sides"]["grpc"]
    groups = (*GROUPS, "server")
    print()
    print("| side | runs | output tok/s (median) | TTFT p50 ms | TPOT p50 ms | "
          + " | ".join(f"{group} CPU ms / tok" for group in groups) + " | other processes (cores) |")
    print("| --- " * (6 + len(groups)) + "|")
    for name, side in (("through the front (HTTP, SSE)", front), ("straight gRPC", direct)):
        # CPU s per 1k tokens is CPU ms per token.
        cpu = " | ".join(f"{side['cpu_s_per_1k_tokens'][group]:.3f}" for group in groups)
        print(f"| {name} | {side['runs']} | {side['output_tok_s']:.1f} | {side['ttft_p50_ms']:.0f} | "
              f"{side['tpot_p50_ms']:.1f} | {cpu} | {side['other_busy_cores']:.2f} |")
    rounds = ", ".join(f"{r:.3f}" for r in result["round_ratios"])
    verdict = "met" if result["ratio"] >= goal else "missed"
    print(f"\nfront / gRPC output tok/s: {result['ratio']:.3f} (goal >= {goal}: {verdict}); by round: {rounds} "
          f"(median {result['round_ratio_median']:.3f})")
    print(f"server CPU per token, gRPC / front: {result['server_cpu_ratio']:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pp", type=int, default=2,
                   help="pipeline stages (default 2, as scripts/demo.sh; on CPU each stage's torch then takes "
                        "a core's share of threads)")
    p.add_argument("--stream-interval", type=int, default=0,
                   help="the router's tokens per streamed message (default: its own, 1)")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=0, help="streams per run (default: --concurrency)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8,
                   help="runs of each side, alternating (a shared host's load moves single runs by tens of %%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=0.95, help="the front / gRPC ratio aimed at")
    p.add_argument("--verbose", action="store_true", help="the server's log on stderr")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    args = p.parse_args(argv)

    port, openai_port = free_port(), free_port()
    url = f"http://127.0.0.1:{openai_port}"
    log = tempfile.TemporaryFile()
    server = start_server(args, port, openai_port, log)
    try:
        wait_until_serving(server, url, log)
        roles = deployment_processes(server.pid)
        roles["openai"] = front_process(server.pid)
        runs, info = asyncio.run(measure(args, roles, f"127.0.0.1:{port}", ("127.0.0.1", openai_port)))
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    result = compare(runs)
    print(f"\n{info.model_name} ({info.architecture}, {info.num_layers} layers, {info.dtype}) on {args.device}, "
          f"{args.concurrency} streams, {args.prompt_len} prompt / {args.output_len} output tokens, "
          f"{os.cpu_count()} cores")
    print_report(runs, result, args.goal)
    if args.json:
        whole = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv], "args": vars(args), "host": platform.node(),
            "cores": os.cpu_count(), "runs": [asdict(r) for r in runs], "summary": result,
        }
        Path(args.json).write_text(json.dumps(whole, indent=2) + "\n")


if __name__ == "__main__":
    main()
