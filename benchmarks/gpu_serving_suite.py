"""The serving-speed scenarios (docs/benchmarks.md) in one invocation, on a GPU host.

For each scenario: start `stageserve up` on a config-only model folder with random weights
(`--load-format dummy`), drive it with benchmarks/load_generator.py, stop it, and keep the
load generator's JSON report. A scenario with a transformers baseline runs it first, in a
process of its own that ends before the server starts, so the server always gets its normal
memory target. Prints one table at the end (tok/s, TPOT next to the decode step's device
time, KV blocks, preemptions) and writes every report to --out.

    python3 benchmarks/gpu_serving_suite.py --model docs/model-configs/llama-3-8b \\
        --out /tmp/bench [--only batch1-pp1,batch1-pp2]

Scenarios needing two GPUs are skipped on a one-GPU host. The `*-long` scenarios (four times
the requests, for attaching a profiler) and the `cpu-*` ones run only when --only names them;
the `cpu-*` ones serve the tiny demo model on the CPU: what they show is the step
composition (decode steps, the pipeline's micro-batches), not speed. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.merge_timeline import read_events, summarize  # noqa: E402
from benchmarks.process_cpu import cpu_snapshot, deployment_processes  # noqa: E402
from shared.step_timeline import TIMELINE_DIR_ENV  # noqa: E402
from stageserve.launcher import free_port  # noqa: E402
from stageserve.client import GenerationClient  # noqa: E402
from stageserve.demo_model import write_tiny_model  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    name: str
    pp: int
    tp: int
    concurrency: int
    requests: int
    # N, or LOW-HIGH drawn uniformly per request (load_generator.py).
    prompt_len: int | str
    output_len: int | str
    # Also time transformers `generate` at this batch on the same GPU, in a phase of its own
    # before the server starts (the server then gets its normal memory target).
    hf_baseline: bool = False
    server_args: tuple[str, ...] = field(default_factory=tuple)
    device: str = "cuda"
    # Run only when --only names it (diagnostic scenarios, not targets).
    on_request_only: bool = False

    @property
    def gpus(self) -> int:
        return self.pp * self.tp if self.device == "cuda" else 0


SCENARIOS = (
    Scenario("batch1-pp1", 1, 1, 1, 3, 128, 256, hf_baseline=True),
    Scenario("batch1-pp2", 2, 1, 1, 3, 128, 256),
    Scenario("c64-pp1", 1, 1, 64, 128, 512, 256, hf_baseline=True),
    Scenario("c256-pp1", 1, 1, 256, 256, 512, 256),
    Scenario("c256-pp2", 2, 1, 256, 256, 512, 256),
    Scenario("c256-tp2", 1, 2, 256, 256, 512, 256),
    # Hundreds of streams of mixed lengths: prefill chunks flowing beside full decode steps,
    # at the largest step budget and at the default one.
    Scenario("c512-mixed", 1, 1, 512, 1024, "128-1024", "64-512"),
    Scenario("c512-mixed-2048", 1, 1, 512, 1024, "128-1024", "64-512",
             server_args=("--max-num-batched-tokens", "2048")),
    # The same two loads with an FP8 KV cache: half the bytes per cached token.
    Scenario("c256-pp1-kvfp8", 1, 1, 256, 256, 512, 256, server_args=("--kv-cache-dtype", "fp8")),
    Scenario("c512-mixed-kvfp8", 1, 1, 512, 1024, "128-1024", "64-512", server_args=("--kv-cache-dtype", "fp8")),
    # The same loads with every step waiting for the previous step's tokens (the A/B of
    # asynchronous scheduling).
    Scenario("batch1-pp1-sync", 1, 1, 1, 3, 128, 256, server_args=("--no-async-scheduling",)),
    Scenario("batch1-pp2-sync", 2, 1, 1, 3, 128, 256, server_args=("--no-async-scheduling",)),
    Scenario("c64-pp1-sync", 1, 1, 64, 128, 512, 256, server_args=("--no-async-scheduling",)),
    # Four tokens per streamed message: what the router's per-message cost takes from 256 streams.
    Scenario("c256-pp1-si4", 1, 1, 256, 256, 512, 256, server_args=("--stream-interval", "4")),
    Scenario("c256-pp2-si4", 2, 1, 256, 256, 512, 256, server_args=("--stream-interval", "4")),
    # Micro-batches as the timing of results groups them (before the lanes).
    Scenario("c256-pp2-uneven", 2, 1, 256, 256, 512, 256, server_args=("--no-even-micro-batches",)),
    # Two steps of a sequence in flight with one stage (the default is three since 2026-11-30).
    Scenario("c256-pp1-2ahead", 1, 1, 256, 256, 512, 256, server_args=("--steps-in-flight-per-seq", "2")),
    Scenario("c256-pp2-3ahead", 2, 1, 256, 256, 512, 256, server_args=("--steps-in-flight-per-seq", "3")),
    # Stage 0 lighter than the last stage: with two lanes, stage 0 may start a lane's next step
    # only once the last stage has sampled its current one, so it needs slack to keep up.
    Scenario("c256-pp2-15-17", 2, 1, 256, 256, 512, 256, server_args=("--layer-partition", "15,17"),
             on_request_only=True),
    # Four times the requests: a load long enough to attach a profiler to (py-spy) mid-run.
    Scenario("c256-pp1-long", 1, 1, 256, 1024, 512, 256, on_request_only=True),
    Scenario("c256-pp2-long", 2, 1, 256, 1024, 512, 256, on_request_only=True),
    # The tiny demo model on the CPU: a pipeline's micro-batches with and without lanes.
    Scenario("cpu-pp2", 2, 1, 64, 64, 16, 64, device="cpu", on_request_only=True),
    Scenario("cpu-pp2-uneven", 2, 1, 64, 64, 16, 64, server_args=("--no-even-micro-batches",), device="cpu",
             on_request_only=True),
)


def _serve(
    model: str, scenario: Scenario, log_path: Path, memory_utilization: float, metrics_port: int,
    timeline_dir: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "stageserve.cli", "up", "--model", model, "--load-format", "dummy",
        "--pp", str(scenario.pp), "--tp", str(scenario.tp), "--device", scenario.device,
        "--dtype", "bfloat16" if scenario.device == "cuda" else "float32",
        "--port", str(port), "--max-num-seqs", str(max(scenario.concurrency, 1)),
        "--max-num-batched-tokens", "8192", "--gpu-memory-utilization", str(memory_utilization),
        "--startup-timeout", "600", "--metrics-port", str(metrics_port), *scenario.server_args,
    ]
    log = open(log_path, "wb")
    env = dict(os.environ)
    if timeline_dir is not None:
        env[TIMELINE_DIR_ENV] = str(timeline_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    client = GenerationClient(address)
    deadline = time.monotonic() + 600
    try:
        while not client.is_serving():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{scenario.name}: server did not start; see {log_path}")
            time.sleep(0.5)
    finally:
        client.close()
    return proc, address


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The measured load's prompts and the warm-up's come from different seeds: with one seed the
# warm-up's prompts would be the measured ones, whose KV the prefix cache then still holds, and
# the measured run would skip nearly all its prefill (it did, once: 1.5x the honest tok/s at
# pp=1, 1.65x at tp=2).
MEASURED_SEED = 0
WARMUP_SEED = 1


def load_commands(args: argparse.Namespace, scenario: Scenario, address: str,
                  report_path: Path, baseline: Path | None = None) -> tuple[list[str], list[str]]:
    """The warm-up's load-generator command line and the measured load's."""
    load_generator = [sys.executable, str(REPO / "benchmarks" / "load_generator.py"), "--addr", address,
                      "--concurrency", str(scenario.concurrency), "--prompt-len", str(scenario.prompt_len),
                      "--warmup-requests", "0"]
    cmd = load_generator + [
        "--requests", str(scenario.requests), "--output-len", str(scenario.output_len),
        "--seed", str(MEASURED_SEED), "--json", str(report_path),
    ]
    if args.hbm_bytes_per_s:
        cmd += ["--hbm-bytes-per-s", str(args.hbm_bytes_per_s)]
    else:
        cmd += ["--measure-bandwidth"]
    if baseline is not None:
        cmd += ["--baseline-json", str(baseline)]
    # The warm-up (one 2-token request per stream, all at once: every prefill shape and the
    # first graphs and kernels) runs as its own invocation, so the step histograms, CPU
    # times and steps in flight below cover the measured load alone.
    warmup = load_generator + [
        "--requests", str(scenario.concurrency), "--output-len", "2", "--seed", str(WARMUP_SEED),
    ]
    return warmup, cmd


def run_baseline(args: argparse.Namespace, scenario: Scenario, out: Path) -> Path | None:
    """transformers at the scenario's batch, in a process of its own that ends (and frees
    the GPU) before the server starts; the JSON it wrote, or None if it failed (logged)."""
    path = out / f"{scenario.name}.transformers.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "load_generator.py"), "--baseline-only",
           "--hf-baseline", args.model, "--concurrency", str(scenario.concurrency),
           "--prompt-len", str(scenario.prompt_len), "--output-len", str(scenario.output_len),
           "--seed", str(MEASURED_SEED), "--json", str(path)]
    with open(out / f"{scenario.name}.transformers.log", "wb") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        print(f"{scenario.name}: transformers baseline failed; see {scenario.name}.transformers.log", flush=True)
        return None
    return path


def run_scenario(args: argparse.Namespace, scenario: Scenario, out: Path) -> dict:
    baseline = run_baseline(args, scenario, out) if scenario.hf_baseline and not args.skip_baselines else None
    utilization = 0.9
    # Router metrics on metrics_port, stage i's on metrics_port + 1 + i (as `up` assigns them).
    metrics_port = free_port()
    model = args.model
    if scenario.device == "cpu":
        model = str(out / "tiny-model")
        if not Path(model).exists():
            write_tiny_model(Path(model), "LlamaForCausalLM", seed=1)
    timeline_dir = out / f"{scenario.name}.timeline" if args.timeline else None
    proc, address = _serve(model, scenario, out / f"{scenario.name}.server.log", utilization, metrics_port,
                           timeline_dir)
    report_path = out / f"{scenario.name}.json"
    warmup, cmd = load_commands(args, scenario, address, report_path, baseline)
    try:
        roles = deployment_processes(proc.pid)
        with open(out / f"{scenario.name}.load.log", "wb") as log:
            subprocess.run(warmup, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900)
            metrics_before = _scrape(metrics_port)
            cpu_before = cpu_snapshot(roles)
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900)
        cpu_after = cpu_snapshot(roles)
        metrics_after = _scrape(metrics_port)
        (out / f"{scenario.name}.metrics.txt").write_text(metrics_after)
        profile = _step_profile(_samples_delta(metrics_before, metrics_after), scenario.pp)
    finally:
        _stop(proc)
    report = json.loads(report_path.read_text())
    report["step_profile"] = profile
    wall_s = report["load"]["wall_s"]
    tokens = report["load"]["output_tokens"]
    # Cores each process kept busy over the measured load: ~1.0 for the router means it is
    # the ceiling.
    report["process_cpu"] = {
        role: {"cpu_s": cpu_after[role] - cpu_before[role],
               "cores_busy": (cpu_after[role] - cpu_before[role]) / wall_s if wall_s else None,
               "ms_per_token": 1e3 * (cpu_after[role] - cpu_before[role]) / tokens if tokens else None}
        for role in cpu_before if role in cpu_after
    }
    # Steps the router had in flight on average, each counted from its send to its result.
    result_sum = profile.get("last_stage_result_seconds_sum", 0.0)
    profile["mean_steps_in_flight"] = result_sum / wall_s if wall_s else float("nan")
    if timeline_dir is not None:
        # The warm-up's steps (its prompts' prefill, a decode step or two) are on it too.
        events = read_events(timeline_dir)
        (out / f"{scenario.name}.trace.json").write_text(json.dumps({"traceEvents": events}))
        report["timeline"] = summarize(events)
    return report


PHASES = (
    "prepare", "prepare.apply", "prepare.build", "prepare.upload", "launch", "launch.forward", "wait", "reply",
    "device",
)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _mean_ms(samples: list[tuple[str, dict[str, str], float]], metric: str, **labels: str) -> float:
    """Mean of histogram `metric` over the samples carrying `labels` (others summed over)."""
    def total(suffix: str) -> float:
        return sum(v for n, lbls, v in samples
                   if n == f"stageserve_{metric}_{suffix}" and labels.items() <= lbls.items())

    count = total("count")
    return 1e3 * total("sum") / count if count else float("nan")


def _scrape(metrics_port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()


def _samples_delta(before: str, after: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of `after` less those of `before` (counters and histogram sums and
    counts grow only, so the difference is what happened in between)."""
    base = {(n, tuple(sorted(lbls.items()))): v for n, lbls, v in _samples(before)}
    return [(n, lbls, v - base.get((n, tuple(sorted(lbls.items()))), 0.0)) for n, lbls, v in _samples(after)]


def _step_profile(samples: list[tuple[str, dict[str, str], float]], num_stages: int) -> dict[str, float]:
    """Mean per-step times from the router's Prometheus histograms (`samples`: the measured
    load's share), over every step and over decode steps alone (`decode_` keys): the stage's
    own compute (rank 0's step) against the router's send-to-result time; the difference is
    the control plane (gRPC, the stage's rank pipe, queueing). Per phase too
    (StepResult.phase_seconds)."""
    profile: dict[str, float] = {}
    for stage in range(num_stages):
        for prefix, kind in (("", {}), ("decode_", {"kind": "decode"})):
            for key, metric in (("compute", "router_stage_step_seconds"), ("result", "stage_result_latency_seconds")):
                profile[f"stage{stage}_{prefix}{key}_ms"] = _mean_ms(samples, metric, stage=str(stage), **kind)
            for phase in PHASES:
                value = _mean_ms(samples, "router_stage_step_phase_seconds", stage=str(stage), phase=phase, **kind)
                if value == value:  # not NaN: the stage reports this phase
                    profile[f"stage{stage}_{prefix}{phase}_ms"] = value
    last = str(num_stages - 1)
    for kind in ("decode", "prefill", "mixed"):
        profile[f"{kind}_steps"] = sum(v for n, lbls, v in samples if n == "stageserve_router_stage_step_seconds_count"
                                       and lbls.get("stage") == last and lbls.get("kind") == kind)
    profile["steps"] = sum(profile[f"{kind}_steps"] for kind in ("decode", "prefill", "mixed"))
    profile["preemptions"] = sum(v for n, _, v in samples if n == "stageserve_preemptions_total")
    profile["router_result_queue_ms"] = _mean_ms(samples, "router_result_queue_seconds")
    profile["router_turnaround_ms"] = _mean_ms(samples, "router_turnaround_seconds")
    profile["last_stage_result_seconds_sum"] = sum(
        v for n, lbls, v in samples
        if n == "stageserve_stage_result_latency_seconds_sum" and lbls.get("stage") == last)
    return profile


def fmt_float(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) and value == value else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "docs" / "model-configs" / "llama-3-8b"))
    p.add_argument("--out", default="/tmp/stageserve-bench")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--skip-baselines", action="store_true", help="no transformers runs (faster)")
    p.add_argument("--hbm-bytes-per-s", type=float, default=0.0,
                   help="device copy rate for the roofline (0: each load generator measures it)")
    p.add_argument("--timeline", action="store_true",
                   help="record the step timeline of every process (shared/step_timeline.py): "
                        "<scenario>.trace.json for Perfetto, and a per-hop summary below")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = torch.cuda.device_count()
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for scenario in SCENARIOS:
        if wanted and scenario.name not in wanted or not wanted and scenario.on_request_only:
            continue
        if scenario.gpus > gpus:
            print(f"{scenario.name}: skipped, needs {scenario.gpus} GPUs, host has {gpus}", flush=True)
            continue
        started = time.perf_counter()
        try:
            report = run_scenario(args, scenario, out)
        except Exception as exc:  # noqa: BLE001 - one failed scenario must not hide the others
            print(f"{scenario.name}: FAILED: {exc}", flush=True)
            rows.append((scenario.name, None))
            continue
        print(f"{scenario.name}: done in {time.perf_counter() - started:.0f} s", flush=True)
        rows.append((scenario.name, report))
    (out / "suite.json").write_text(json.dumps(dict(rows), indent=2))
    print("\n| scenario | tok/s | TPOT p50 ms | decode step device ms | TPOT / device | TPOT p99 ms | TTFT p50 ms "
          "| vs roofline | KV blocks | preemptions | transformers tok/s | vs transformers "
          "| last stage compute ms/step | router send->result ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        if r is None:
            print(f"| {name} | failed |" + " |" * 12)
            continue
        load, ratio, hf = r["load"], r.get("ratios") or {}, r.get("transformers") or {}
        prof = r.get("step_profile") or {}
        last = r.get("layout", {}).get("pp", 1) - 1

        def fmt(value: object, digits: str = ".1f") -> str:
            return format(value, digits) if isinstance(value, (int, float)) else "-"

        device_ms = prof.get(f"stage{last}_decode_device_ms")
        tpot_vs_device = load["tpot_p50_ms"] / device_ms if isinstance(device_ms, float) and device_ms > 0 else None
        print(f"| {name} | {fmt(load['output_tok_s'])} | {fmt(load['tpot_p50_ms'], '.2f')} | {fmt(device_ms, '.2f')} "
              f"| {fmt(tpot_vs_device, '.2f')} | {fmt(load['tpot_p99_ms'], '.2f')} | {fmt(load['ttft_p50_ms'])} "
              f"| {fmt(ratio.get('tpot_p50_vs_roofline'), '.2f')} | {fmt(r.get('layout', {}).get('num_kv_blocks'), 'd')} "
              f"| {fmt(prof.get('preemptions'), '.0f')} "
              f"| {fmt(ratio.get('tpot_p50_vs_roofline'), '.2f')} | {fmt(hf.get('tok_s'))} "
              f"| {fmt(ratio.get('tok_s_vs_transformers'), '.1f')} "
              f"| {fmt(prof.get(f'stage{last}_compute_ms'), '.2f')} | {fmt(prof.get(f'stage{last}_result_ms'), '.2f')} |")
    for title, prefix in (("every step", ""), ("decode steps", "decode_")):
        print(f"\nper-step phases of the last stage, {title} (ms, means over the run):")
        for name, r in rows:
            prof = (r or {}).get("step_profile") or {}
            last = (r or {}).get("layout", {}).get("pp", 1) - 1
            parts = [f"{p} {prof[f'stage{last}_{prefix}{p}_ms']:.2f}"
                     for p in ("compute", "result", *PHASES) if f"stage{last}_{prefix}{p}_ms" in prof]
            steps = ", ".join(f"{k} {prof.get(f'{k}_steps', 0):.0f}" for k in ("decode", "prefill", "mixed"))
            print(f"  {name}: {', '.join(parts) or '-'} (steps: {steps})")
    print("\nprocess CPU over the load run (cores busy / ms per output token), the router's mean steps in flight,"
          "\nand its mean turnaround (a result in to the next step out; of it, the result queued for the engine):")
    for name, r in rows:
        cpu = (r or {}).get("process_cpu") or {}
        parts = [f"{role} {v['cores_busy']:.2f} / {v['ms_per_token']:.3f}" for role, v in cpu.items()
                 if v["cores_busy"] is not None and v["ms_per_token"] is not None]
        prof = (r or {}).get("step_profile") or {}
        print(f"  {name}: {', '.join(parts) or '-'}; steps in flight {fmt_float(prof.get('mean_steps_in_flight'))}; "
              f"turnaround {fmt_float(prof.get('router_turnaround_ms'))} ms "
              f"(queued {fmt_float(prof.get('router_result_queue_ms'))} ms)")
    timelines = [(name, r["timeline"]) for name, r in rows if r and r.get("timeline")]
    if timelines:
        print("\nstep timeline (benchmarks/merge_timeline.py; ms, device busy as a share of the run):")
        for name, summary in timelines:
            print(f"  {name}: " + ", ".join(
                f"{k} {v:.0%}" if k.endswith("busy") else f"{k} {v:.2f}" for k, v in summary.items()))
    if os.environ.get("OUT"):
        print(f"reports in {out}")


if __name__ == "__main__":
    main()
