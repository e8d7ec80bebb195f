"""How often CPython hands the GIL from a busy thread to a waiting one, in every stageserve process.

Each service runs a few threads that mostly wait and must act as soon as their wait ends:
the router's engine thread after a stage's result, a rank's step-finisher thread after the
device finished a step, the stage's gRPC threads forwarding a step to its ranks. While
another thread of the process is busy in Python (the router's event loop writing responses,
a rank building the next step's inputs), the woken thread waits for the GIL up to the
switch interval, CPython's default 5 ms. On the serving path that wait is latency on every
step, so stageserve shortens it to 1 ms (measured on 2 x H200, 256 streams: pp=2 9.1k ->
10.0k tok/s, TTFT p50 1.9 -> 1.0 s; pp=1 unchanged; docs/benchmarks.md).
STAGESERVE_SWITCH_INTERVAL_MS overrides it (spawned rank processes inherit it)."""

from __future__ import annotations

import os
import sys

ENV = "STAGESERVE_SWITCH_INTERVAL_MS"
DEFAULT_MS = 1.0


def apply_switch_interval() -> float:
    """Sets the interpreter's switch interval from the environment (or the default); returns it in ms."""
    raw = os.environ.get(ENV, "")
    try:
        ms = float(raw) if raw else DEFAULT_MS
    except ValueError:
        raise SystemExit(f"{ENV} must be a number of milliseconds, got {raw!r}") from None
    if not ms > 0:
        raise SystemExit(f"{ENV} must be positive, got {raw!r}")
    sys.setswitchinterval(ms / 1e3)
    return ms
