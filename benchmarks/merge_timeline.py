"""Merges a step timeline (STAGESERVE_TIMELINE_DIR, shared/step_timeline.py) into one trace
and prints where a step's time goes between the processes.

    STAGESERVE_TIMELINE_DIR=/tmp/tl stageserve up ...   # serve a load, stop
    python3 benchmarks/merge_timeline.py /tmp/tl --out /tmp/tl/trace.json

The trace opens in Perfetto (ui.perfetto.dev) or chrome://tracing: a row per process and
thread (the router's engine and results; each stage process's Execute stream; each rank's
host work, finisher and, on CUDA, device). The summary gives, per rank, how busy its device
was between its first and last step (the idle share is what a pipeline loses), and the mean
time of each hop of a step: router send -> stage process -> rank -> result back.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def read_events(directory: Path) -> list[dict]:
    events = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return events


def names(events: list[dict]) -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    rows = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    return processes, rows


def summarize(events: list[dict]) -> dict[str, float]:
    """Figures in ms (busy shares as fractions), keyed by what they measure."""
    processes, rows = names(events)
    # (process, row, event name) -> step id -> (start us, duration us)
    by_step: dict[tuple[str, str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    device_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e["ph"] not in ("X", "i") or "step" not in e.get("args", {}):
            continue
        process, row = processes.get(e["pid"], str(e["pid"])), rows.get((e["pid"], e["tid"]), str(e["tid"]))
        # Several processes of one name (a restarted stage) keep their first step's record.
        by_step[(process, row, e["name"])].setdefault(e["args"]["step"], (e["ts"], e.get("dur", 0.0)))
        if row == "device":
            device_spans[process].append((e["ts"], e["ts"] + e["dur"]))
    out: dict[str, float] = {}
    for process, spans in sorted(device_spans.items()):
        spans.sort()
        window = spans[-1][1] - spans[0][0]
        if window > 0:
            out[f"{process} device busy"] = sum(end - start for start, end in spans) / window
            out[f"{process} device step ms"] = statistics.mean(end - start for start, end in spans) / 1e3

    def mean_gap(first: tuple[str, str, str], then: tuple[str, str, str], then_end: bool = False) -> float | None:
        a, b = by_step.get(first, {}), by_step.get(then, {})
        gaps = [(b[s][0] + (b[s][1] if then_end else 0.0)) - a[s][0] for s in a.keys() & b.keys()]
        return statistics.mean(gaps) / 1e3 if gaps else None

    sent = ("router", "engine", "send")
    stages = sorted({p for p in processes.values() if p.startswith("stage") and "-rank" not in p})
    for stage in stages:
        index = stage.removeprefix("stage")
        rank0 = f"{stage}-rank0"
        hops = {
            f"{stage}: router send -> step in": mean_gap(sent, (stage, "execute", "step in")),
            f"{stage}: step in -> rank 0 starts it": mean_gap((stage, "execute", "step in"), (rank0, "host", "prepare")),
            f"{stage}: rank 0 host work (prepare + launch)": mean_gap((rank0, "host", "prepare"),
                                                                    (rank0, "host", "launch"), then_end=True),
            f"{stage}: launch -> result ready": mean_gap((rank0, "host", "launch"), (rank0, "finisher", "wait"),
                                                          then_end=True),
            f"{stage}: result out -> at the router": mean_gap((stage, "execute", "result out"),
                                                              ("router", "results", f"stage {index}")),
            f"{stage}: router send -> result at the router": mean_gap(sent, ("router", "results", f"stage {index}")),
        }
        out.update({k: v for k, v in hops.items() if v is not None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path, help="the STAGESERVE_TIMELINE_DIR of a run")
    p.add_argument("--out", type=Path, default=None, help="write the merged trace here (JSON)")
    args = p.parse_args()
    events = read_events(args.directory)
    if not events:
        raise SystemExit(f"no timeline events under {args.directory} (was STAGESERVE_TIMELINE_DIR set?)")
    if args.out is not None:
        args.out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        print(f"trace: {args.out} ({len(events)} events)")
    print("| figure | value |")
    print("| --- | --- |")
    for name, value in summarize(events).items():
        print(f"| {name} | {value:.1%} |" if name.endswith("busy") else f"| {name} | {value:.2f} ms |")


if __name__ == "__main__":
    main()
