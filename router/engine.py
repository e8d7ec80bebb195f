"""The router's step loop: admits requests, schedules micro-batches, sends them to every
stage, and turns the last stage's sampled tokens into streamed responses.

One thread owns the scheduler, the block manager and every sequence; the gRPC handlers
talk to it only through its event queue. Up to `max_inflight` micro-batches are in flight
at once, so stage k works on batch i while stage k+1 works on batch i-1; with asynchronous
scheduling (the default) each micro-batch's next decode step is sent before its tokens come
back, so no stage waits for the router between two steps (see router/scheduler.py).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.block_manager import BlockManager
from router.config import DEFAULT_STEP_TIMEOUT_S
from router.detokenizer import DetokenizerStep, IncrementalDetokenizer, TokenDecoder, add_tokens_batch
from router.engine_events import (
    Abort,
    EngineEvent,
    EngineUnavailable,
    ResponseSink,
    Resume,
    StageResult,
    StageStreamBroken,
    Stop,
    Submit,
)
from router.metrics import RouterMetrics
from router.request_validation import ValidatedRequest
from router.response_stream import merge_tokens
from router.scheduler import QueueFullError, ScheduledBatch, Scheduler
from router.sequence import Sequence
from router.stage_client import StageClient
from router.step_builder import StepBuilder
from shared.proto import generation_pb2 as gen
from shared.proto import stage_worker_pb2 as pb
from shared.step_timeline import open_timeline, seconds_to_ns

log = logging.getLogger("stageserve.router")

@dataclass
class _Request:
    seq: Sequence
    request: ValidatedRequest
    detokenizer: IncrementalDetokenizer
    sink: ResponseSink
    stage_sampling: pb.StageSamplingParams
    submitted: float = field(default_factory=time.monotonic)
    # First put in a step (end of its queue time), and its first token.
    scheduled_at: float | None = None
    first_token_at: float | None = None
    # Tokens held back by --stream-interval, as one response, and how many.
    unsent: gen.GenerateResponse | None = None
    num_unsent: int = 0


@dataclass
class EngineStats:
    requests_finished: int = 0
    steps: int = 0
    preemptions: int = 0


class Engine:
    def __init__(
        self,
        stages: list[StageClient],
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: tuple[int, ...],
        max_context: int,
        max_inflight: int,
        max_pending: int,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        on_failure: Callable[[str], None] | None = None,
        forward_sampled_tokens: bool = False,
        stream_interval: int = 1,
        recovery_timeout_s: float = 0.0,
        metrics: RouterMetrics | None = None,
    ) -> None:
        if not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0 seconds, got {step_timeout_s}")
        if not recovery_timeout_s >= 0:
            raise ValueError(f"recovery_timeout_s must be >= 0 seconds, got {recovery_timeout_s}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 token, got {stream_interval}")
        # A stream's tokens go out this many per message (the first token and the last at
        # once): fewer messages for the router to write and clients to read at high
        # concurrency, for a burstier stream.
        self.stream_interval = stream_interval
        self.stages = stages
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.tokenizer = tokenizer
        # Shared by every request's detokenizer, so a step's streams decode in one call.
        self._decoder = TokenDecoder(tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.max_inflight = max_inflight
        self.max_pending = max_pending
        self.step_timeout_s = step_timeout_s
        # > 0: when a stage fails, requests are kept (back to waiting, as preempted ones) this
        # long for the re-formed pipeline (`resume`) to recompute and continue them; 0 (and
        # past it): they end with UNAVAILABLE at once, for callers that retry themselves.
        self.recovery_timeout_s = recovery_timeout_s
        self.stats = EngineStats()
        # None: a private one nobody scrapes (tests, benchmarks), so the hooks need no guard.
        self.metrics = metrics if metrics is not None else RouterMetrics(num_stages=len(stages))
        self._events: queue.Queue[EngineEvent] = queue.Queue()
        self._requests: dict[int, _Request] = {}
        self._inflight: dict[int, ScheduledBatch] = {}
        # Stages answer steps in order, so only the oldest step in flight is timed: from
        # when it was sent or the previous step was answered, whichever came later.
        self._progress_at = 0.0
        # Stage indices that have answered each step in flight, to name the stuck one.
        self._answered: dict[int, set[int]] = {}
        self._builder = StepBuilder(forward_sampled_tokens)
        # When the oldest last-stage result not yet followed by a new step arrived: what the
        # router's turnaround (result in, next step out) is measured from.
        self._turnaround_from: float | None = None
        # Tokens applied to the scheduler whose responses are not built yet (_emit_tokens).
        self._to_emit: list[tuple[_Request, pb.SampledToken, int, str]] = []
        self._ids = itertools.count(1)
        self._pending = 0
        self._pending_lock = threading.Lock()
        # Why new requests are refused (the pipeline is down and nothing is kept for it, or
        # the engine stopped); None while it serves or carries requests across a recovery.
        self.failed: str | None = None
        # Why the pipeline is down (a stage failed); None while it serves. While down nothing
        # is scheduled; `resume` brings it back.
        self.down: str | None = None
        self._down_since = 0.0
        # Requests kept across the recovery must see it complete before this time (monotonic).
        self._carry_until: float | None = None
        self._carried: set[int] = set()
        # After a resume, the last deadline until the re-formed pipeline completes a step: a
        # pipeline that fails again at once (a request that crashes a stage, recomputed)
        # must not win every kept request a fresh timeout, round after round.
        self._unconfirmed_deadline: float | None = None
        # Each set of Execute streams has a number: events of older, closed streams (their
        # readers report the close) must not fail the new pipeline.
        self._streams = 0
        # Told once, from the engine thread, when the pipeline fails (not on stop): the
        # router's recovery starts from here.
        self._on_failure = on_failure
        # STAGESERVE_TIMELINE_DIR set: steps sent, results in, responses built (step_timeline.py).
        self._timeline = open_timeline("router")
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stop = False

    # ---- called from other threads -----------------------------------------------------

    def start(self) -> None:
        self._open_streams()
        self._thread.start()

    def _open_streams(self) -> None:
        self._streams += 1
        streams, last = self._streams, len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            stage.open_execute(
                on_result=lambda r, i=index: self._events.put(StageResult(streams, i == last, r, time.monotonic())),
                on_error=lambda msg: self._events.put(StageStreamBroken(streams, msg)),
            )

    def resume(self, block_manager: BlockManager) -> None:
        """The pipeline was re-formed (every stage serves again, with an empty KV pool of
        `block_manager`'s size): new Execute streams open and the requests kept meanwhile are
        recomputed and continue. Called from the router's recovery thread."""
        self._events.put(Resume(block_manager))

    @property
    def serving(self) -> bool:
        return self.down is None and self.failed is None

    def stop(self) -> None:
        self._events.put(Stop())
        self._thread.join(timeout=10)

    def submit(self, request: ValidatedRequest, sink: ResponseSink) -> int:
        """Queues a request; returns its sequence id. Raises QueueFullError or EngineUnavailable."""
        if self.failed:
            raise EngineUnavailable(self.failed)
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise QueueFullError(
                    f"the router holds {self._pending} requests, its limit (--max-queue-len); "
                    "retry later"
                )
            self._pending += 1
        seq_id = next(self._ids)
        self._events.put(Submit(seq_id, request, sink))
        return seq_id

    def abort(self, seq_id: int) -> None:
        self._events.put(Abort(seq_id))

    @property
    def num_pending(self) -> int:
        return self._pending

    # ---- the engine thread -------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            self._schedule_steps()
            # What can be scheduled changes only with an event (a result, a submit, an
            # abort), so block until one comes, then drain the rest: one scheduling pass
            # sees every abort and submit received so far.
            try:
                event = self._events.get(timeout=self._time_to_next_deadline())
            except queue.Empty:
                self._check_step_timeout()
                self._check_recovery_timeout()
                continue
            self._handle(event)
            while not self._stop:
                try:
                    self._handle(self._events.get_nowait())
                except queue.Empty:
                    break
            # Requests arriving during a recovery must not postpone its deadline.
            self._check_recovery_timeout()
            # The next steps leave before this round's responses are built: the stages
            # compute while the router writes streams, instead of waiting for it.
            self._schedule_steps()
            self._emit_tokens()

    def _handle(self, event: EngineEvent) -> None:
        if isinstance(event, StageResult | StageStreamBroken) and event.streams != self._streams:
            return  # from the streams of a pipeline that failed before
        if not isinstance(event, Submit | StageResult):
            # An abort or a failure ends streams: their tokens already sampled go out first.
            self._emit_tokens()
        match event:
            case Submit(seq_id, request, sink):
                self._admit(seq_id, request, sink)
            case Abort(seq_id):
                self._abort(seq_id)
            case StageResult(_, from_last_stage, result, arrived):
                self._on_result(from_last_stage, result, arrived)
            case StageStreamBroken(_, message):
                self._pipeline_failed(message)
            case Resume(block_manager):
                self._resume(block_manager)
            case Stop():
                self._stop = True
                self._fail_all("the router is shutting down", expected=True)

    def _admit(self, seq_id: int, request: ValidatedRequest, sink: ResponseSink) -> None:
        if self.failed:
            self._release_pending()
            self.metrics.on_rejected("unavailable")
            sink(_final(gen.FINISH_REASON_ERROR, request.request_id, f"unavailable: {self.failed}"))
            sink(EngineUnavailable(self.failed))
            return
        seq = Sequence(
            seq_id=seq_id,
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            max_new_tokens=request.sampling.max_new_tokens,
        )
        try:
            self.scheduler.add(seq)
        except QueueFullError as exc:
            self._release_pending()
            self.metrics.on_rejected("resource_exhausted")
            sink(_final(gen.FINISH_REASON_ERROR, request.request_id, str(exc)))
            sink(None)
            return
        self._requests[seq_id] = _Request(
            seq=seq,
            request=request,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.sampling.stop, decoder=self._decoder
            ),
            sink=sink,
            stage_sampling=request.sampling.to_proto(),
        )

    def _abort(self, seq_id: int) -> None:
        req = self._requests.get(seq_id)
        if req is None:
            return
        self.scheduler.abort(seq_id)
        self._end(req, gen.FINISH_REASON_CANCELLED, "")

    def _schedule_steps(self) -> None:
        while self.serving and len(self._inflight) < self.max_inflight:
            batch = self.scheduler.schedule()
            if batch is None:
                # The result let no step out (nothing to run, or a lane waits for its own):
                # an idle gap is not the router's turnaround.
                self._turnaround_from = None
            for seq in self.scheduler.pop_unschedulable():
                req = self._requests.get(seq.seq_id)
                if req is not None:
                    self._builder.forget(seq.seq_id)
                    self._end(
                        req,
                        gen.FINISH_REASON_ERROR,
                        f"the sequence needs more KV blocks than the pool holds "
                        f"({self.block_manager.num_total_blocks} blocks)",
                    )
            if batch is None:
                return
            self.stats.preemptions += len(batch.preempted)
            sampling = {}
            now = time.monotonic()
            for entry in batch.entries:
                req = self._requests[entry.seq.seq_id]
                sampling[entry.seq.seq_id] = req.stage_sampling
                if req.scheduled_at is None:
                    req.scheduled_at = now
                    self.metrics.on_scheduled(now - req.submitted)
            step = self._builder.build(batch, sampling)
            if not self._inflight:
                self._progress_at = time.monotonic()
            self._inflight[step.step_id] = batch
            self.metrics.on_step_sent(step.step_id, batch.kind, batch.num_tokens)
            for stage in self.stages:
                stage.send_step(step)
            if self._timeline is not None:
                self._timeline.instant("engine", "send", time.monotonic_ns(), step=step.step_id, kind=batch.kind,
                                       seqs=len(batch.entries), lane=batch.lane)
            self.stats.steps += 1
            if self._turnaround_from is not None:
                self.metrics.on_turnaround(time.monotonic() - self._turnaround_from)
                self._turnaround_from = None

    def _on_result(self, from_last_stage: bool, result: pb.StepResult, arrived: float) -> None:
        self.metrics.on_stage_result(result)
        if self._timeline is not None:
            self._timeline.span("results", f"stage {result.stage_index}", seconds_to_ns(arrived), time.monotonic_ns(),
                                step=result.step_id)
        if not from_last_stage:
            if result.error:
                log.warning("stage %d rejected step %d: %s", result.stage_index, result.step_id, result.error)
            if result.step_id in self._inflight:
                self._answered.setdefault(result.step_id, set()).add(result.stage_index)
            return
        batch = self._inflight.pop(result.step_id, None)
        if batch is None:
            return
        self._unconfirmed_deadline = None  # the re-formed pipeline works
        self._answered.pop(result.step_id, None)
        self._progress_at = time.monotonic()
        self.metrics.on_result_handled(self._progress_at - arrived)
        if self._turnaround_from is None:
            self._turnaround_from = arrived
        if result.error:
            log.error("step %d rejected: %s", result.step_id, result.error)
            self._emit_tokens()  # the tokens of earlier steps go out before the error
            for seq in self.scheduler.on_step_failed(batch, result.error):
                self._builder.forget(seq.seq_id)
                req = self._requests.get(seq.seq_id)
                if req is not None:
                    self._end(req, gen.FINISH_REASON_ERROR, f"step failed: {result.error}")
            return
        tokens = list(result.tokens)
        self.scheduler.on_step_done(batch, {t.seq_id: t.token_id for t in tokens})
        for token in tokens:
            req = self._requests.get(token.seq_id)
            if req is None or req.seq.is_finished:
                continue
            # What the token ids alone end (EOS, a stop token, the length) leaves the
            # scheduler now, before the next step is scheduled; stop strings need the text,
            # so they end a stream when its response is built.
            finish, stop_reason = self._finish_by_id(req, token.token_id)
            if finish != gen.FINISH_REASON_UNSPECIFIED:
                self.scheduler.finish(req.seq)
                self._builder.forget(req.seq.seq_id)
            self._to_emit.append((req, token, finish, stop_reason))

    def _finish_by_id(self, req: _Request, token_id: int) -> tuple[int, str]:
        seq, sampling = req.seq, req.request.sampling
        if token_id in self.eos_token_ids and not sampling.ignore_eos:
            return gen.FINISH_REASON_EOS, ""
        if token_id in sampling.stop_token_ids:
            return gen.FINISH_REASON_STOP, str(token_id)
        if seq.num_output_tokens >= seq.max_new_tokens or seq.num_tokens >= self.max_context:
            return gen.FINISH_REASON_LENGTH, ""
        return gen.FINISH_REASON_UNSPECIFIED, ""

    def _emit_tokens(self) -> None:
        """Builds and hands out the responses of the tokens applied since the last call."""
        if not self._to_emit:
            return
        started_ns = time.monotonic_ns() if self._timeline is not None else 0
        pending, self._to_emit = self._to_emit, []
        while pending:
            # One token per stream at a time, in order (a round can hold several steps of
            # one stream); every stream detokenized together: two tokenizer calls, not two
            # per stream.
            wave, seen, later = [], set(), []
            for item in pending:
                (later if id(item[0]) in seen else wave).append(item)
                seen.add(id(item[0]))
            pending = later
            # An abort, a failure or a stop string may have closed a stream since its token was applied.
            live = [item for item in wave if self._requests.get(item[0].seq.seq_id) is item[0]]
            texts = add_tokens_batch([(req.detokenizer, [token.token_id]) for req, token, _, _ in live])
            now = time.monotonic()
            for (req, token, finish, stop_reason), text in zip(live, texts):
                self._emit_token(req, token, finish, stop_reason, text, now)
        if self._timeline is not None:
            self._timeline.span("engine", "responses", started_ns, time.monotonic_ns())

    def _emit_token(
        self, req: _Request, token: pb.SampledToken, finish: int, stop_reason: str,
        step: DetokenizerStep, now: float,
    ) -> None:
        seq, sampling = req.seq, req.request.sampling
        self.metrics.on_token(seq.seq_id, req.submitted, now)
        first = req.first_token_at is None
        if first:
            req.first_token_at = now
        response = gen.GenerateResponse(token_ids=[token.token_id], request_id=seq.request_id)
        if sampling.return_logprob or sampling.top_logprobs:
            lp = response.logprobs.add(token_id=token.token_id, logprob=token.logprob)
            for alt in token.top:
                lp.top.add(token_id=alt.token_id, logprob=alt.logprob)
        response.text = step.text
        # A stop string outranks the length; EOS and stop tokens outrank a stop string.
        if step.stop_string is not None and finish in (gen.FINISH_REASON_UNSPECIFIED, gen.FINISH_REASON_LENGTH):
            finish, stop_reason = gen.FINISH_REASON_STOP, step.stop_string
        if finish == gen.FINISH_REASON_UNSPECIFIED:
            if req.unsent is None:
                req.unsent = response
            else:
                merge_tokens(req.unsent, response)
            req.num_unsent += 1
            if first or req.num_unsent >= self.stream_interval:
                self._send_unsent(req)
            return
        if step.stop_string is None:
            response.text += req.detokenizer.finish()
        if not seq.is_finished:  # a stop string: the ids alone ended it in _on_result otherwise
            self.scheduler.finish(seq)
            self._builder.forget(seq.seq_id)
        response.finish_reason = finish
        response.stop_reason = stop_reason
        self._close(req, response)

    def _end(self, req: _Request, reason: int, message: str) -> None:
        """Ends a request without a new token (cancelled, failed, unschedulable)."""
        self._builder.forget(req.seq.seq_id)
        self._close(req, _final(reason, req.seq.request_id, message))

    def _close(
        self, req: _Request, last: gen.GenerateResponse, end: EngineUnavailable | None = None
    ) -> None:
        last.prompt_tokens = req.seq.num_prompt_tokens
        last.cached_prompt_tokens = req.seq.num_cached_prompt_tokens
        self._send_unsent(req)
        self._requests.pop(req.seq.seq_id, None)
        self._release_pending()
        self.stats.requests_finished += 1
        self.metrics.on_finished(req.seq, req.submitted, last, req.scheduled_at, req.first_token_at)
        req.sink(last)
        req.sink(end)

    def _send_unsent(self, req: _Request) -> None:
        if req.unsent is not None:
            req.sink(req.unsent)
            req.unsent, req.num_unsent = None, 0

    def _release_pending(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _time_to_next_deadline(self) -> float | None:
        """Seconds until the oldest step in flight times out or the kept requests' recovery
        deadline passes, whichever is first; None when neither applies."""
        deadlines = []
        if self._inflight:
            deadlines.append(self._progress_at + self.step_timeout_s)
        if self._carry_until is not None:
            deadlines.append(self._carry_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _check_step_timeout(self) -> None:
        if not self._inflight or time.monotonic() < self._progress_at + self.step_timeout_s:
            return
        oldest = min(self._inflight)
        answered = self._answered.get(oldest, set())
        silent = [f"{i} ({s.address})" for i, s in enumerate(self.stages) if i not in answered]
        # Downstream stages wait for upstream ones, so the first silent stage is the suspect.
        self._pipeline_failed(
            f"step {oldest} got no answer within {self.step_timeout_s:g} s (the router's per-step "
            f"timeout) from stage {', '.join(silent)}; the first of them is stuck or overloaded"
        )

    def _pipeline_failed(self, message: str) -> None:
        """A stage's stream broke or a step timed out: the process group and every stage's KV
        cache are lost. The steps in flight are written off and every request goes back to
        waiting, to be recomputed from its prompt and the tokens already streamed once the
        router's recovery re-forms the pipeline (`resume`); with no recovery time allowed,
        they end with UNAVAILABLE now."""
        if self.down is not None or self._stop:
            return  # another stage's stream reporting the same failure
        log.error("pipeline failed: %s", message)
        self.down = message
        self._down_since = time.monotonic()
        self.scheduler.on_pipeline_lost(list(self._inflight.values()))
        self._inflight.clear()
        self._answered.clear()
        self._turnaround_from = None
        # The next stream starts from a clean slate: every sequence is sent whole again.
        self._builder.restart_stream()
        if self.recovery_timeout_s > 0 and self.failed is None:
            self._carry_until = self._unconfirmed_deadline or self._down_since + self.recovery_timeout_s
            self._carried = set(self._requests)
            log.warning("keeping %d requests for up to %g s while the pipeline recovers (--recovery-timeout)",
                        len(self._carried), self.recovery_timeout_s)
        else:
            self._fail_all(message)
        if self._on_failure is not None:
            self._on_failure(message)

    def _check_recovery_timeout(self) -> None:
        if self._carry_until is None or time.monotonic() < self._carry_until:
            return
        assert self.down is not None
        self._fail_all(
            f"{self.down}; the pipeline did not recover within {self.recovery_timeout_s:g} s (--recovery-timeout)"
        )

    def _resume(self, block_manager: BlockManager) -> None:
        if self.down is None or self._stop:
            return
        self.scheduler.replace_block_manager(block_manager)
        self.block_manager = block_manager
        down_s = time.monotonic() - self._down_since
        carried = sum(1 for seq_id in self._carried if seq_id in self._requests)
        self.metrics.on_recovered(down_s, carried)
        log.warning("pipeline serving again after %.1f s; %d requests carried over", down_s, carried)
        self.down = self.failed = None
        self._unconfirmed_deadline = self._carry_until
        self._carry_until, self._carried = None, set()
        self._open_streams()

    def _fail_all(self, message: str, expected: bool = False) -> None:
        """Every request ends with UNAVAILABLE and new ones are refused (until `resume`):
        the pipeline failed with no recovery time allowed, or not within it, or the router
        stops."""
        if self.failed is None:
            if expected:
                log.info("engine stopping: %s", message)
            else:
                log.error("ending every request: %s", message)
            self.failed = message
        self._carry_until, self._carried = None, set()
        for batch in list(self._inflight.values()):
            self.scheduler.on_step_failed(batch, message)
        self._inflight.clear()
        self._answered.clear()
        for req in list(self._requests.values()):
            self.scheduler.abort(req.seq.seq_id)
            self._close(
                req,
                _final(gen.FINISH_REASON_ERROR, req.seq.request_id, f"unavailable: {message}"),
                EngineUnavailable(message),
            )


def _final(reason: int, request_id: str, message: str) -> gen.GenerateResponse:
    return gen.GenerateResponse(finish_reason=reason, error_message=message, request_id=request_id)
