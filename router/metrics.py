"""What the router measures: request outcomes and latencies, scheduler and KV-pool state,
per-stage step and hop times; plus one structured log line per finished request.

The engine calls the `on_*` hooks from its own thread; the gRPC handlers call `on_rejected`
from the event loop. prometheus_client's metrics are thread-safe, and the little state kept
here (first-token and step-send times) is touched only by the engine thread. Scheduler and
pool state are read at scrape time by a collector, so the engine pays nothing for them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.block_manager import BlockManager
from router.scheduler import Scheduler
from router.sequence import Sequence
from shared.metrics import LATENCY_BUCKETS, NAMESPACE, STEP_BUCKETS, new_registry
from shared.proto import generation_pb2 as gen
from shared.proto import stage_worker_pb2 as pb

# Seconds. A recovery reloads weights in fresh rank processes: seconds (a tiny model) to minutes.
RECOVERY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0)

# Its own logger, so an operator can route or silence the per-request lines separately.
request_log = logging.getLogger("stageserve.requests")

OUTCOMES = {
    gen.FINISH_REASON_LENGTH: "length",
    gen.FINISH_REASON_STOP: "stop",
    gen.FINISH_REASON_EOS: "eos",
    gen.FINISH_REASON_CANCELLED: "cancelled",
    gen.FINISH_REASON_ERROR: "error",
}
# Requests refused before they reach the scheduler, named after the gRPC status they get.
REJECTIONS = ("invalid_argument", "failed_precondition", "resource_exhausted", "unavailable")
# The phases a stage reports for each step (StepResult.phase_seconds); others are ignored,
# so a stage cannot grow the label set.
STEP_PHASES = (
    "prepare", "prepare.apply", "prepare.build", "prepare.upload", "launch", "launch.forward", "wait", "reply",
    "device",
)

# What a step computes, a label on the step histograms: the eager prefill steps of a busy
# deployment take tens of times a graph-replayed decode step, so one mean over both says
# little about either. "unknown": a result whose step record was already dropped.
STEP_KINDS = ("decode", "prefill", "mixed", "unknown")

# Tokens: a prompt's or an answer's length, and a step's batch (1 to --max-num-batched-tokens).
TOKEN_BUCKETS = (
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
    262144, 524288, 1048576,
)

# Step-send records older than this many steps are dropped: a step whose last result never
# comes (the pipeline failed) must not keep its record forever.
_MAX_TRACKED_STEPS = 1024


class EngineCounts(Protocol):
    """What the engine's counters read (router/engine.py, EngineStats)."""

    steps: int
    preemptions: int


class EngineState(Protocol):
    """What a scrape reads of the engine (router/engine.py, Engine): metrics know the engine
    only through this, so the engine can hold its metrics without an import circle."""

    scheduler: Scheduler
    block_manager: BlockManager
    stats: EngineCounts

    @property
    def num_pending(self) -> int: ...


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, num_stages: int = 1) -> None:
        # A detached instance (no registry given) records into a private registry nobody
        # scrapes, so the engine can call the hooks unconditionally.
        self.registry = registry if registry is not None else new_registry(process_metrics=False)
        r, ns = self.registry, NAMESPACE
        self.requests = Counter(
            "requests", "Finished or refused Generate requests by outcome: a finish reason "
            "(length, stop, eos, cancelled, error) or the status of a refusal "
            "(invalid_argument, failed_precondition, resource_exhausted, unavailable).",
            ["outcome"], namespace=ns, registry=r,
        )
        for outcome in (*OUTCOMES.values(), *REJECTIONS):
            self.requests.labels(outcome)  # Export zeros, so rate() works from the first scrape.
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from a request's admission to its first token.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds", "Time between consecutive tokens of one request.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds", "Time from a request's admission to its last message.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens of finished requests.", namespace=ns, registry=r
        )
        self.cached_prompt_tokens = Counter(
            "cached_prompt_tokens", "Prompt tokens served from the prefix cache.", namespace=ns, registry=r
        )
        self.generation_tokens = Counter(
            "generation_tokens", "Tokens generated (streamed to clients).", namespace=ns, registry=r
        )
        self.stage_latency = Histogram(
            "stage_result_latency_seconds", "Time from the router sending a step to a stage's "
            "result for it (queueing behind earlier micro-batches and upstream stages included), by "
            "step kind.",
            ["stage", "kind"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        # router_ names: the stage's own endpoint exports stage_step_seconds from the same
        # reports; one name for both would double every sum over the two jobs.
        self.stage_step = Histogram(
            "router_stage_step_seconds", "Time the stage's TP rank 0 spent executing a step, as the "
            "stage reports it (for stages after the first, waiting for hidden states included), by "
            "step kind (decode: one new token per sequence; prefill: prompt chunks; mixed: both).",
            ["stage", "kind"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        self.stage_phase = Histogram(
            "router_stage_step_phase_seconds", "Where router_stage_step_seconds went, by phase (prepare, "
            "launch, wait, reply: see StepResult.phase_seconds in protos/stage_worker.proto) and "
            "step kind.",
            ["stage", "phase", "kind"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        self.hop = Histogram(
            "stage_hop_seconds", "Time from stage s-1's result to stage s's result for the same "
            "step, seen by the router: the hidden-state hop into stage s plus stage s's work once "
            "they arrived (steps whose results came back out of order are not counted).",
            ["stage"], namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        self.result_queue = Histogram(
            "router_result_queue_seconds", "Time a last stage's step result waited for the "
            "router's engine thread after it arrived.",
            namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        self.turnaround = Histogram(
            "router_turnaround_seconds", "Time from a last stage's step result arriving to the "
            "router sending its next step: the router's share of the pipeline's critical path "
            "(steps sent with no result in between are not counted).",
            namespace=ns, registry=r, buckets=STEP_BUCKETS,
        )
        self.queue_time = Histogram(
            "request_queue_time_seconds", "Time from a request's admission to its first step "
            "(waiting for a slot and KV blocks).",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.prefill_time = Histogram(
            "request_prefill_time_seconds", "Time from a request's first step to its first token "
            "(its prompt's prefill, chunked or not).",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.decode_time = Histogram(
            "request_decode_time_seconds", "Time from a request's first token to its last.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.prompt_length = Histogram(
            "request_prompt_tokens", "Prompt length of finished requests, in tokens.",
            namespace=ns, registry=r, buckets=TOKEN_BUCKETS,
        )
        self.generation_length = Histogram(
            "request_generation_tokens", "Tokens generated per finished request.",
            namespace=ns, registry=r, buckets=TOKEN_BUCKETS,
        )
        self.step_tokens = Histogram(
            "step_tokens", "Tokens in each step sent to the stages (prompt chunks and decodes).",
            namespace=ns, registry=r, buckets=TOKEN_BUCKETS,
        )
        self.serving = Gauge(
            "router_serving", "1 while the router reports SERVING on the health service.",
            namespace=ns, registry=r,
        )
        self.streams_carried = Counter(
            "streams_carried_over", "Requests in flight when a stage failed that were kept, "
            "recomputed and continued once the pipeline served again (--recovery-timeout).",
            namespace=ns, registry=r,
        )
        self.recovery = Histogram(
            "pipeline_recovery_seconds", "Time from a stage failure to the re-formed pipeline "
            "serving again: how long the streams kept across it paused.",
            namespace=ns, registry=r, buckets=RECOVERY_BUCKETS,
        )
        self._last_token_at: dict[int, float] = {}
        # step id -> (send time, step kind, {stage index: arrival time of its result})
        self._steps: OrderedDict[int, tuple[float, str, dict[int, float]]] = OrderedDict()
        # A step's record is complete once this many stages have answered it.
        self._num_stages = num_stages

    def export_engine_state(self, engine: EngineState) -> None:
        """Exports `engine`'s scheduler and pool state, read at scrape time. Once: a recovered
        pipeline keeps its engine."""
        self.registry.register(_EngineCollector(engine, self))

    @property
    def num_tracked_steps(self) -> int:
        return len(self._steps)

    # ---- hooks -------------------------------------------------------------------------

    def on_rejected(self, status: str) -> None:
        assert status in REJECTIONS, status
        self.requests.labels(status).inc()

    def on_token(self, seq_id: int, submitted: float, now: float) -> None:
        """A token of `seq_id` streamed at `now` (time.monotonic; one reading per step)."""
        last = self._last_token_at.get(seq_id)
        if last is None:
            self.ttft.observe(now - submitted)
        else:
            self.tpot.observe(now - last)
        self._last_token_at[seq_id] = now
        self.generation_tokens.inc()

    def on_scheduled(self, queued_s: float) -> None:
        """A request's first step was sent `queued_s` after its admission."""
        self.queue_time.observe(queued_s)

    def on_finished(
        self, seq: Sequence, submitted: float, last: gen.GenerateResponse,
        scheduled_at: float | None = None, first_token_at: float | None = None,
    ) -> None:
        now = time.monotonic()
        e2e = now - submitted
        outcome = OUTCOMES.get(last.finish_reason, "error")
        last_token_at = self._last_token_at.pop(seq.seq_id, None)
        self.requests.labels(outcome).inc()
        self.e2e.observe(e2e)
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.cached_prompt_tokens.inc(seq.num_cached_prompt_tokens)
        self.prompt_length.observe(seq.num_prompt_tokens)
        self.generation_length.observe(seq.num_output_tokens)
        if scheduled_at is not None and first_token_at is not None:
            self.prefill_time.observe(first_token_at - scheduled_at)
            self.decode_time.observe((last_token_at or first_token_at) - first_token_at)
        request_log.info(
            "request %s finished: %s, %d prompt tokens (%d cached), %d generated, %.3f s%s",
            seq.request_id, outcome, seq.num_prompt_tokens, seq.num_cached_prompt_tokens,
            seq.num_output_tokens, e2e, f" ({last.error_message})" if last.error_message else "",
            extra={
                "event": "request_finished", "request_id": seq.request_id, "outcome": outcome,
                "prompt_tokens": seq.num_prompt_tokens, "cached_prompt_tokens": seq.num_cached_prompt_tokens,
                "generated_tokens": seq.num_output_tokens, "e2e_seconds": round(e2e, 6),
                "error": last.error_message,
            },
        )

    def on_recovered(self, seconds: float, carried: int) -> None:
        self.recovery.observe(seconds)
        self.streams_carried.inc(carried)

    def on_result_handled(self, queued_s: float) -> None:
        self.result_queue.observe(queued_s)

    def on_turnaround(self, seconds: float) -> None:
        self.turnaround.observe(seconds)

    def on_step_sent(self, step_id: int, kind: str, num_tokens: int = 0) -> None:
        assert kind in STEP_KINDS, kind
        if num_tokens:
            self.step_tokens.observe(num_tokens)
        self._steps[step_id] = (time.monotonic(), kind, {})
        if len(self._steps) > _MAX_TRACKED_STEPS:
            self._steps.popitem(last=False)

    def on_stage_result(self, result: pb.StepResult) -> None:
        now = time.monotonic()
        stage_index = result.stage_index
        stage = str(stage_index)
        record = self._steps.get(result.step_id)
        kind = record[1] if record is not None else "unknown"
        self.stage_step.labels(stage, kind).observe(result.compute_seconds)
        for phase, seconds in result.phase_seconds.items():
            if phase in STEP_PHASES:
                self.stage_phase.labels(stage, phase, kind).observe(seconds)
        if record is None:
            return
        sent, _, arrivals = record
        self.stage_latency.labels(stage, kind).observe(now - sent)
        previous = arrivals.get(stage_index - 1)
        # Stage s finishes after stage s-1 sent, but their results travel different streams:
        # when s-1's result is the later one, the reporting jitter exceeded the hop and the
        # sample says nothing about it, so it is skipped.
        if previous is not None:
            self.hop.labels(stage).observe(now - previous)
        arrivals[stage_index] = now
        if len(arrivals) >= self._num_stages:
            del self._steps[result.step_id]


class _EngineCollector(Collector):
    """Reads the scheduler and the block manager at scrape time. Reads of ints and list
    lengths owned by the engine thread are atomic under the GIL; a scrape may see a state
    between two steps, which is all a gauge promises."""

    def __init__(self, engine: EngineState, metrics: RouterMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine, ns = self.engine, NAMESPACE
        scheduler, blocks = engine.scheduler, engine.block_manager
        yield GaugeMetricFamily(
            f"{ns}_queue_length", "Requests the router holds (waiting, running, or just "
            "submitted); new ones are refused at --max-queue-len.", value=engine.num_pending,
        )
        yield GaugeMetricFamily(f"{ns}_num_requests_waiting", "Sequences waiting to be scheduled.",
                                value=scheduler.num_waiting)
        yield GaugeMetricFamily(f"{ns}_num_requests_running", "Sequences holding KV blocks.",
                                value=scheduler.num_running)
        yield GaugeMetricFamily(f"{ns}_steps_in_flight", "Steps sent that not every stage has "
                                "answered yet.", value=self.metrics.num_tracked_steps)
        # Not kv_blocks_total: a gauge, and _total is the counter suffix (promtool check metrics).
        yield GaugeMetricFamily(f"{ns}_kv_blocks", "Blocks in the KV pool (every stage).",
                                value=blocks.num_total_blocks)
        yield GaugeMetricFamily(f"{ns}_kv_blocks_free", "Free blocks (cached-but-free included).",
                                value=blocks.num_free_blocks)
        yield GaugeMetricFamily(f"{ns}_kv_cache_usage_ratio", "Fraction of KV blocks held by sequences.",
                                value=blocks.usage)
        yield GaugeMetricFamily(f"{ns}_prefix_cache_hit_rate", "Prompt tokens found in the prefix "
                                "cache over prompt tokens looked up, since start.",
                                value=blocks.prefix_cache_hit_rate)
        yield CounterMetricFamily(f"{ns}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=blocks.num_queried_tokens)
        yield CounterMetricFamily(f"{ns}_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=blocks.num_hit_tokens)
        yield CounterMetricFamily(f"{ns}_steps", "Steps sent to the stages.", value=engine.stats.steps)
        yield CounterMetricFamily(f"{ns}_preemptions", "Sequences preempted (to be recomputed).",
                                  value=engine.stats.preemptions)
