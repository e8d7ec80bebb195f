"""CPU time each process of a deployment spends per generated token, under N concurrent streams.

Starts `stageserve up` on the built-in tiny demo model (CPU, or --device cuda with
--model), drives it with benchmarks/load_generator.py, and reads each process's user+system
CPU time from /proc before and after: the router's share per token is what bounds the
output tokens/s of any layout once the GPU step is fast enough (one router thread owns the
scheduler and every stream).

    python3 benchmarks/process_cpu_per_token.py --concurrency 256 --output-len 64 [--no-async-scheduling]

Linux only (/proc). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stageserve.client import GenerationClient  # noqa: E402
from benchmarks.process_cpu import cpu_snapshot, deployment_processes  # noqa: E402
from stageserve.demo_model import write_tiny_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: a tiny random Llama written here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (a config-only --model)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=0, help="default: --concurrency")
    p.add_argument("--prompt-len", default="8")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--stream-interval", type=int, default=1)
    args = p.parse_args()
    model = args.model or str(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "LlamaForCausalLM", seed=1))
    port = 50000 + os.getpid() % 10000
    cmd = [sys.executable, "-m", "stageserve.cli", "up", "--model", model, "--pp", str(args.pp), "--device", args.device,
           "--port", str(port), "--no-stage-token", "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", "8192", "--load-format", args.load_format,
           "--stream-interval", str(args.stream_interval)]
    if args.no_async_scheduling:
        cmd.append("--no-async-scheduling")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = GenerationClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 300
        while not client.is_serving():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("stageserve up did not start")
            time.sleep(0.3)
        client.close()
        roles = deployment_processes(server.pid)
        before = cpu_snapshot(roles)
        # The load generator is the only child waited for before the server: its CPU is the
        # growth of RUSAGE_CHILDREN (a client this busy would itself cap the figures).
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        requests = args.requests or args.concurrency
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_generator.py"), "--addr", f"127.0.0.1:{port}",
                        "--concurrency", str(args.concurrency), "--requests", str(requests),
                        "--prompt-len", args.prompt_len, "--output-len", str(args.output_len),
                        "--warmup-requests", "0", "--hbm-bytes-per-s", "1e12"],
                       cwd=REPO, check=True, capture_output=True)
        wall = time.perf_counter() - started
        cpu_after = cpu_snapshot(roles)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        tokens = requests * args.output_len
        print(f"{args.concurrency} streams, {tokens} tokens in {wall:.1f} s "
              f"({'sync' if args.no_async_scheduling else 'async'} scheduling, {args.device}, "
              f"stream interval {args.stream_interval})")
        print("| process | CPU s | CPU ms per token | CPU ms per 256 tokens |")
        print("| --- | --- | --- | --- |")
        for role in cpu_after:
            used = cpu_after[role] - before[role]
            print(f"| {role} | {used:.2f} | {used / tokens * 1e3:.3f} | {used / tokens * 256e3:.1f} |")
        print(f"| load generator (client) | {client_cpu:.2f} | {client_cpu / tokens * 1e3:.3f} "
              f"| {client_cpu / tokens * 256e3:.1f} |")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
