"""What a stage measures: its step times as its own gRPC process sees them, and its state.

The router's /metrics has the pipeline view (per-stage result latency and hop time); this
is the stage's own, scraped from the stage's host, where a slow stage is looked at first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from shared.metrics import MODEL_NAME_LABEL, NAMESPACE, STEP_BUCKETS, new_registry
from shared.proto import stage_worker_pb2 as pb


class StageView(Protocol):
    """What the collector reads from the stage service at scrape time."""

    state: int
    num_kv_blocks: int


class StageMetrics:
    def __init__(self, stage_index: int, view: StageView, model_name: str = "") -> None:
        self.registry = new_registry(labels={MODEL_NAME_LABEL: model_name} if model_name else None)
        ns, r = NAMESPACE, self.registry
        self.stage = str(stage_index)
        self.step = Histogram(
            "stage_step_seconds", "Time TP rank 0 spent executing a step (for stages after the "
            "first, waiting for the previous stage's hidden states included).",
            ["stage"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        ).labels(self.stage)
        self.step_wall = Histogram(
            "stage_step_wall_seconds", "Time from this stage process handing a step to its ranks "
            "to rank 0's result (queueing behind earlier steps included).",
            ["stage"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        ).labels(self.stage)
        steps = Counter(
            "stage_steps", "Steps executed (ok) or rejected before running (bad block id, ...).",
            ["stage", "status"], namespace=ns, registry=r,
        )
        self.steps_ok = steps.labels(self.stage, "ok")
        self.steps_rejected = steps.labels(self.stage, "rejected")
        # step id -> when it was handed to the ranks. Written by the Execute pump thread,
        # popped by the Execute response loop: single dict operations, atomic under the GIL.
        self._sent: dict[int, float] = {}
        # The stage's state, read at scrape time.
        self.registry.register(_StageCollector(view, self.stage))

    def on_step_sent(self, step_id: int) -> None:
        self._sent[step_id] = time.monotonic()

    def on_step_done(self, result: pb.StepResult) -> None:
        sent = self._sent.pop(result.step_id, None)
        if sent is not None:
            self.step_wall.observe(time.monotonic() - sent)
        if result.error:
            self.steps_rejected.inc()
        else:
            self.steps_ok.inc()
            self.step.observe(result.compute_seconds)


class _StageCollector(Collector):
    def __init__(self, stage: StageView, stage_label: str) -> None:
        self.view = stage
        self.label = stage_label

    def collect(self) -> Iterator[GaugeMetricFamily | StateSetMetricFamily]:
        state = StateSetMetricFamily(
            f"{NAMESPACE}_stage_state", "The stage's lifecycle state (LOADING, JOINING, READY, "
            "SERVING, FAILED).", labels=["stage"],
        )
        current = self.view.state
        state.add_metric(
            [self.label],
            {pb.StageState.Name(v).removeprefix("STAGE_STATE_"): v == current
             for v in pb.StageState.values() if v != 0},
        )
        yield state
        kv = GaugeMetricFamily(f"{NAMESPACE}_stage_kv_blocks", "KV blocks allocated on this stage.",
                               labels=["stage"])
        kv.add_metric([self.label], self.view.num_kv_blocks)
        yield kv
