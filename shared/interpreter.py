"""CPython settings of every stageserve process: how often the GIL changes hands, and how
often the cyclic garbage collector runs.

Switch interval. Each service runs a few threads that mostly wait and must act as soon as
their wait ends: the router's engine thread after a stage's result, a rank's step-finisher
thread after the device finished a step, the stage's gRPC threads forwarding a step to its
ranks. While another thread of the process is busy in Python (the router's event loop
writing responses, a rank building the next step's inputs), the woken thread waits for the
GIL up to the switch interval, CPython's default 5 ms. On the serving path that wait is
latency on every step, so stageserve shortens it to 1 ms (measured on 2 x H200, 256
streams: pp=2 9.1k -> 10.0k tok/s, TTFT p50 1.9 -> 1.0 s; pp=1 unchanged; 64 streams 5.5k ->
6.6k; docs/benchmarks-history.md). STAGESERVE_SWITCH_INTERVAL_MS overrides it (spawned rank
processes inherit it).

Garbage collection. Serving allocates short-lived containers by the thousand per step
(protobuf messages, futures, per-stream lists), and CPython starts a young-generation
collection every 700 of them, scanning every young object; its full collections scan every
object the process ever made (the tokenizer, the model's modules). The threshold is raised
so young collections run about seventy times less often, and what exists once a process is
ready is frozen out of every collection (`freeze_startup_objects`). Measured on the 2-core
CPU machine, `benchmarks/process_cpu_per_token.py --concurrency 256 --output-len 128`:
router CPU per token 0.098 / 0.103 ms before, 0.095 / 0.090 ms after (two runs each).
"""

from __future__ import annotations

import gc
import os
import sys

SWITCH_INTERVAL_ENV = "STAGESERVE_SWITCH_INTERVAL_MS"
DEFAULT_SWITCH_INTERVAL_MS = 1.0
# Young-generation threshold (CPython: 700) and the two older generations' (CPython: 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def apply_interpreter_settings() -> float:
    """Sets the switch interval (from the environment, or the default) and the collector's
    thresholds; returns the switch interval in ms. Called first thing by every process."""
    raw = os.environ.get(SWITCH_INTERVAL_ENV, "")
    try:
        ms = float(raw) if raw else DEFAULT_SWITCH_INTERVAL_MS
    except ValueError:
        raise SystemExit(f"{SWITCH_INTERVAL_ENV} must be a number of milliseconds, got {raw!r}") from None
    if not ms > 0:
        raise SystemExit(f"{SWITCH_INTERVAL_ENV} must be positive, got {raw!r}")
    sys.setswitchinterval(ms / 1e3)
    gc.set_threshold(*GC_THRESHOLDS)
    return ms


def freeze_startup_objects() -> None:
    """Collects once, then keeps everything alive now out of later collections: called
    when a process is ready to serve, after its big one-time allocations."""
    gc.collect()
    gc.freeze()
