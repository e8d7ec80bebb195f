"""A timeline of every step across the router, the stage processes and their ranks.

What paces a pipeline (a stage's GPU, the hand-off between stages, the router's turnaround,
a rank's host work) shows only when the steps of every process are laid side by side on one
clock. Set `STAGESERVE_TIMELINE_DIR=DIR` in the environment of `stageserve up` (every process
it starts inherits it) or of each service: each process appends Chrome trace events, one
JSON object per line, to `DIR/<process>-<pid>.jsonl`;
`python3 benchmarks/merge_timeline.py DIR --out trace.json` merges them for Perfetto or
chrome://tracing and prints how busy each rank's device was. Unset (the default), nothing
is recorded and no extra event is timed.

One clock: `time.monotonic_ns` (CLOCK_MONOTONIC, shared by every process of a host). A rank's
device work is timed with CUDA events and placed on that clock
(stage_worker/rank_timeline.py).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path
from typing import Any, TextIO

TIMELINE_DIR_ENV = "STAGESERVE_TIMELINE_DIR"


class StepTimeline:
    """One process's events. Thread-safe; each line is flushed as written, so a process that
    ends with os._exit (a rank) loses nothing."""

    def __init__(self, directory: Path, process: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        self._file: TextIO = open(directory / f"{process}-{self.pid}.jsonl", "a", buffering=1)
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}
        self._next_row = itertools.count(1)
        self._write({"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0, "args": {"name": process}})

    def _row(self, name: str) -> int:
        row = self._rows.get(name)
        if row is None:
            row = self._rows[name] = next(self._next_row)
            self._write({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": row, "args": {"name": name}})
        return row

    def _write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def span(self, row: str, name: str, start_ns: int, end_ns: int, **args: Any) -> None:
        """Something that took from `start_ns` to `end_ns` (time.monotonic_ns)."""
        with self._lock:
            self._write({"name": name, "ph": "X", "pid": self.pid, "tid": self._row(row), "ts": start_ns / 1e3,
                         "dur": max(0, end_ns - start_ns) / 1e3, "args": args})

    def instant(self, row: str, name: str, at_ns: int, **args: Any) -> None:
        with self._lock:
            self._write({"name": name, "ph": "i", "s": "t", "pid": self.pid, "tid": self._row(row),
                         "ts": at_ns / 1e3, "args": args})

    def close(self) -> None:
        with self._lock:
            self._file.close()


_OPEN: dict[str, StepTimeline] = {}
_OPEN_LOCK = threading.Lock()


def open_timeline(process: str) -> StepTimeline | None:
    """The process's timeline when STAGESERVE_TIMELINE_DIR is set, else None; one per name
    and process (a recovered pipeline's new engine writes on where the old one stopped)."""
    directory = os.environ.get(TIMELINE_DIR_ENV, "")
    if not directory:
        return None
    with _OPEN_LOCK:
        if process not in _OPEN:
            try:
                _OPEN[process] = StepTimeline(Path(directory), process)
            except OSError as exc:
                raise RuntimeError(f"{TIMELINE_DIR_ENV}={directory}: cannot write the step timeline there: {exc}") from exc
        return _OPEN[process]


def seconds_to_ns(seconds: float) -> int:
    """A time.monotonic() or time.perf_counter() reading on the timeline's clock (both are
    CLOCK_MONOTONIC on Linux)."""
    return int(seconds * 1e9)
