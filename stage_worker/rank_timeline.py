"""A rank's rows of the step timeline (shared/step_timeline.py): its host work per step,
the finisher's wait for the step's result, and on CUDA the step's device work.

The device span of a step runs from an event recorded before its first kernel to one after
its last (the hop's send and the sampler's host copy included), so a stage waiting in NCCL
for its neighbour shows as device time, and the gaps between spans are what the device
spent idle. Spans are written once their end event has completed, checked without blocking
when later steps finish: reading them never holds a result back.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from shared.step_timeline import StepTimeline, seconds_to_ns


def timing_event() -> torch.cuda.Event:
    """A timing event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class DeviceClock:
    """Places CUDA events on the timeline's clock: a reference event is recorded and
    synchronised once; an event's time is the reference's plus the elapsed time between them
    (exact on the device; the reference itself is off by the synchronisation's latency, tens
    of microseconds, the same for every event)."""

    def __init__(self) -> None:
        self._reference = timing_event()
        self._reference.synchronize()
        self._reference_ns = time.monotonic_ns()

    def to_ns(self, event: torch.cuda.Event) -> int:
        return self._reference_ns + int(self._reference.elapsed_time(event) * 1e6)


class RankTimeline:
    def __init__(self, timeline: StepTimeline, device: torch.device) -> None:
        self.timeline = timeline
        self._cuda = device.type == "cuda"
        self._clock: DeviceClock | None = None
        # (step id, start, end) of steps whose device span is not written yet, in launch order.
        self._pending: deque[tuple[int, torch.cuda.Event, torch.cuda.Event]] = deque()

    def wants_device_span(self) -> bool:
        """Whether the step about to launch should be bracketed by timing events (on CUDA);
        called before its start event, so the clock's reference comes first."""
        if self._cuda and self._clock is None:
            self._clock = DeviceClock()
        return self._cuda

    def launched(self, step_id: int, num_seqs: int, started_s: float, prepared_s: float, launched_s: float,
                 device_span: tuple[torch.cuda.Event, torch.cuda.Event] | None) -> None:
        """The step's host work (times from time.perf_counter), and the events around its
        device work (None off CUDA)."""
        self.timeline.span("host", "prepare", seconds_to_ns(started_s), seconds_to_ns(prepared_s),
                           step=step_id, seqs=num_seqs)
        self.timeline.span("host", "launch", seconds_to_ns(prepared_s), seconds_to_ns(launched_s), step=step_id)
        if device_span is not None:
            self._pending.append((step_id, *device_span))

    def finished(self, step_id: int, launched_s: float, ready_s: float) -> None:
        """The finisher's wait for the step's result; writes the device spans completed so far."""
        self.timeline.span("finisher", "wait", seconds_to_ns(launched_s), seconds_to_ns(ready_s), step=step_id)
        while self._pending and self._pending[0][2].query():
            done_id, start, end = self._pending.popleft()
            assert self._clock is not None
            self.timeline.span("device", "step", self._clock.to_ns(start), self._clock.to_ns(end), step=done_id)
