"""The router's engine driven in-process against fake stages (no processes, no gRPC).

The fake stages apply every step to the stage's own `SequenceTable`, so the router's deltas
(new sequences, appended tokens, block ids, drops) are checked exactly as a real stage
checks them, and the last one "samples" a pure function of the tokens it knows. Outputs are
therefore known in advance, and any delta the router gets wrong changes them. Steps can be
held and released one at a time, rejected, never answered, or the stream broken, which
reaches every state a request can be cancelled or failed in. Every test ends with the KV
pool full and no request pending.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from router.block_manager import BlockManager
from router.engine import Engine
from router.engine_events import EngineUnavailable
from router.request_validation import RequestLimits, validate_request
from router.scheduler import QueueFullError, Scheduler
from shared.config import SchedulerConfig
from shared.proto import generation_pb2 as gen
from shared.proto import stage_worker_pb2 as pb
from stage_worker.sequence_state import SequenceTable, StepLimits, StepRejected
from stageserve.client import FINISH_REASONS, build_request
from stageserve.demo_model import TOKENIZER_VOCAB_SIZE as VOCAB
from stageserve.demo_model import build_tokenizer

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0
# A prompt holding this token is rejected by every fake stage (a request the router let through
# but a stage refuses).
POISON = 500


def next_token(tokens: list[int]) -> int:
    """What the last fake stage samples after `tokens`: depends on every token, in order."""
    h = 0
    for t in tokens:
        h = (h * 31 + t + 7) % 1_000_003
    # Ids 3..96 are the printable ASCII bytes: every output decodes to plain text.
    return 3 + h % 94


def reference(prompt: list[int], n: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


class FakePipeline:
    """The stages, as the engine sees them: one `StageClient` stand-in per stage."""

    def __init__(self, num_stages: int, num_blocks: int, block_size: int, max_position: int) -> None:
        self.limits = StepLimits(VOCAB, max_position, block_size, num_blocks)
        self.stages = [FakeStage(self, i, i == num_stages - 1) for i in range(num_stages)]
        self.lock = threading.Condition()
        self.hold = False
        # Delay before each answer (a slow but working pipeline).
        self.delay_s = 0.0
        self.steps: list[pb.StepRequest] = []

    def set_hold(self, hold: bool) -> None:
        """While held, steps wait for `release`; un-holding releases everything held."""
        with self.lock:
            self.hold = hold
        if not hold:
            self.release(len(self.stages[0].held))

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            for stage in self.stages:
                with self.lock:
                    step = stage.held.popleft()
                stage.answer(step)

    def wait_for_step(self, count: int) -> pb.StepRequest:
        """Waits until the stages got `count` steps; returns the last one."""
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.steps) >= count, WAIT_S), (
                f"the engine sent {len(self.steps)} steps, expected {count}"
            )
            return self.steps[count - 1]


def _poisoned(step: pb.StepRequest) -> pb.StepRequest:
    copy = pb.StepRequest()
    copy.CopyFrom(step)
    for new in copy.new_seqs:
        new.prompt_token_ids[:] = [VOCAB if t == POISON else t for t in new.prompt_token_ids]
    return copy


class FakeStage:
    def __init__(self, pipeline: FakePipeline, index: int, is_last: bool) -> None:
        self.pipeline = pipeline
        self.index = index
        self.is_last = is_last
        self.address = f"fake-stage-{index}"
        self.table = SequenceTable()
        # The last token this pipeline sampled for each sequence: what a real stage appends
        # for append_sampled (the fake's table holds a placeholder instead).
        self.sampled: dict[int, int] = {}
        self.held: deque[pb.StepRequest] = deque()
        # With the pipeline's delay_s: steps waiting for the worker that answers them in order.
        self._slow_steps: queue.Queue[pb.StepRequest] = queue.Queue()
        self._slow_worker: threading.Thread | None = None
        self.mute = False
        self._on_result: Callable[[pb.StepResult], None] | None = None
        self._on_error: Callable[[str], None] | None = None

    def open_execute(self, on_result: Callable[[pb.StepResult], None], on_error: Callable[[str], None]) -> None:
        self._on_result, self._on_error = on_result, on_error

    def send_step(self, step: pb.StepRequest) -> None:
        p = self.pipeline
        with p.lock:
            if self.index == 0:
                p.steps.append(step)
                p.lock.notify_all()
            if p.hold:
                self.held.append(step)
                return
        if p.delay_s:
            # A real stage computes its steps one after another, in the order they came.
            if self._slow_worker is None:
                self._slow_worker = threading.Thread(target=self._answer_slowly, daemon=True)
                self._slow_worker.start()
            self._slow_steps.put(step)
        else:
            self.answer(step)

    def _answer_slowly(self) -> None:
        while True:
            step = self._slow_steps.get()
            time.sleep(self.pipeline.delay_s)
            self.answer(step)

    def answer(self, step: pb.StepRequest) -> None:
        if self.mute:
            return
        result = pb.StepResult(step_id=step.step_id, stage_index=self.index)
        try:
            if any(POISON in n.prompt_token_ids for n in step.new_seqs):
                # The stage's own validation rejects it: the poison becomes an id outside the
                # vocabulary, so the real rejection path (and what it still applies) runs.
                step = _poisoned(step)
            batch = self.table.apply(step, self.pipeline.limits)
        except StepRejected as exc:
            result.error = str(exc)
        else:
            for sched, seq in zip(step.seqs, batch):
                if sched.append_sampled:
                    seq.output_token_ids[-1] = self.pipeline.stages[-1].sampled[seq.seq_id]
                if self.is_last and sched.sample:
                    token = next_token(seq.prompt_token_ids + seq.output_token_ids)
                    self.sampled[seq.seq_id] = token
                    result.tokens.add(seq_id=seq.seq_id, token_id=token, logprob=-1.0)
        self._on_result(result)

    def break_stream(self, message: str) -> None:
        self._on_error(message)

    def close(self) -> None:
        pass


class Collector:
    """A request's response sink; `gate` (if set) blocks the engine thread in the first call."""

    def __init__(self) -> None:
        self.responses: list[gen.GenerateResponse] = []
        self.done = threading.Event()
        self.end: EngineUnavailable | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, item: gen.GenerateResponse | EngineUnavailable | None) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
            self.gate = None
        if item is None or isinstance(item, EngineUnavailable):
            # The stream's end: normal, or the pipeline went down (the server's UNAVAILABLE).
            self.end = item
            self.done.set()
        else:
            self.responses.append(item)

    def wait(self) -> Collector:
        assert self.done.wait(WAIT_S), f"the request did not finish; got {self.responses}"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)

    @property
    def last(self) -> gen.GenerateResponse:
        return self.responses[-1]

    @property
    def finish(self) -> str:
        return FINISH_REASONS.get(self.last.finish_reason, "")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


class Harness:
    def __init__(self, tokenizer, *, pp: int = 1, num_blocks: int = 64, block_size: int = 4,
                 budget: int = 64, max_num_seqs: int = 8, max_pending: int = 100, max_inflight: int | None = None,
                 max_context: int = 128, eos: tuple[int, ...] = (), step_timeout_s: float = 30.0,
                 async_scheduling: bool = False, stream_interval: int = 1,
                 recovery_timeout_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.pipeline = FakePipeline(pp, num_blocks, block_size, max_context)
        self.limits = RequestLimits(vocab_size=VOCAB, max_context=max_context)
        config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                 max_queue_len=max_pending, async_scheduling=async_scheduling)
        scheduler = Scheduler(config, BlockManager(num_blocks, block_size), max_context=max_context, num_stages=pp)
        self.engine = Engine(
            self.pipeline.stages, scheduler, tokenizer, eos, max_context,
            max_inflight=max_inflight or config.inflight_steps(pp), max_pending=max_pending,
            step_timeout_s=step_timeout_s, forward_sampled_tokens=async_scheduling and pp > 1,
            stream_interval=stream_interval, recovery_timeout_s=recovery_timeout_s,
        )
        self.engine.start()

    def submit(self, prompt: list[int], sink: Collector | None = None, **sampling: object) -> tuple[int, Collector]:
        sink = sink or Collector()
        request = validate_request(build_request(prompt, **sampling), self._encode, self.limits)
        return self.engine.submit(request, sink), sink

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def wait_idle(self) -> None:
        """Every request over, and the pool full again."""
        engine, bm = self.engine, self.engine.block_manager
        deadline = time.monotonic() + WAIT_S
        while engine.num_pending or bm.num_free_blocks != bm.num_total_blocks:
            assert time.monotonic() < deadline, (
                f"{engine.num_pending} requests pending, {bm.num_total_blocks - bm.num_free_blocks} blocks in use"
            )
            time.sleep(0.005)
        bm.check_invariants()

    def stage_sequences(self) -> list[set[int]]:
        return [set(s.table.seqs) for s in self.pipeline.stages]


@pytest.fixture
def make(tokenizer) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kw: object) -> Harness:
        made.append(Harness(tokenizer, **kw))
        return made[-1]

    yield factory
    for h in made:
        h.pipeline.set_hold(False)
        h.wait_idle()
        h.engine.stop()


def _prompt(n: int, salt: int) -> list[int]:
    return [0] + [3 + (salt * 37 + i * 11) % 240 for i in range(n - 1)]


# ---- outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_outputs_are_exact_with_chunked_prefill_preemption_and_pipelining(
    make, async_scheduling: bool, pp: int
) -> None:
    # 16 blocks of 4 tokens for 10 sequences of up to 32 tokens: preemption is certain; a
    # budget of 8 tokens chunks every prompt; two stages keep two micro-batches in flight
    # (four with asynchronous scheduling: each micro-batch's look-ahead step too); one stage
    # with asynchronous scheduling keeps three steps of a sequence in flight.
    h = make(pp=pp, num_blocks=16, block_size=4, budget=8, max_num_seqs=4, async_scheduling=async_scheduling)
    prompts = [_prompt(3 + 2 * i, i) for i in range(10)]
    sinks = [h.submit(p, max_new_tokens=12, ignore_eos=True)[1] for p in prompts]
    for prompt, sink in zip(prompts, sinks):
        sink.wait()
        assert sink.finish == "length", sink.last.error_message
        assert sink.tokens == reference(prompt, 12)
        assert sink.text == h.tokenizer.decode(sink.tokens)
        assert sink.last.prompt_tokens == len(prompt)
    assert h.engine.stats.preemptions > 0
    if async_scheduling:
        assert any(s.append_sampled for step in h.pipeline.steps for s in step.seqs)
        assert all(step.forward_sampled_tokens == (pp > 1) for step in h.pipeline.steps)
    h.wait_idle()
    # The stages forgot every finished and preempted sequence: after one more request, it is
    # the only one they hold.
    seq_id, last = h.submit([0, 7, 8], max_new_tokens=2, ignore_eos=True)
    assert last.wait().tokens == reference([0, 7, 8], 2)
    h.pipeline.wait_for_step(len(h.pipeline.steps))
    assert h.stage_sequences() == [{seq_id}] * pp


def test_the_turnaround_metric_leaves_out_idle_gaps(make) -> None:
    h = make(async_scheduling=True)
    registry = h.engine.metrics.registry
    h.submit(_prompt(5, 1), max_new_tokens=6, ignore_eos=True)[1].wait()
    h.wait_idle()
    time.sleep(0.5)  # nothing to run: the last result lets no step out
    h.submit(_prompt(5, 2), max_new_tokens=6, ignore_eos=True)[1].wait()
    count = registry.get_sample_value("stageserve_router_turnaround_seconds_count")
    total = registry.get_sample_value("stageserve_router_turnaround_seconds_sum")
    # Each scheduling pass after results counts once; the idle half second is none of them.
    assert count >= 2 and total < 0.25, (count, total)
    assert registry.get_sample_value("stageserve_router_result_queue_seconds_count") >= count


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stream_interval_groups_tokens_after_the_first(make, async_scheduling: bool) -> None:
    h = make(async_scheduling=async_scheduling, stream_interval=4)
    prompt = _prompt(9, 3)
    sink = h.submit(prompt, max_new_tokens=11, ignore_eos=True, logprobs=1)[1].wait()
    # The first token at once, then four per message; what is held goes out before the end.
    assert [len(r.token_ids) for r in sink.responses] == [1, 4, 4, 1, 1]
    assert sink.finish == "length" and sink.tokens == reference(prompt, 11)
    assert [lp.token_id for r in sink.responses for lp in r.logprobs] == sink.tokens
    assert sink.text == h.tokenizer.decode(sink.tokens)
    # A stop string inside a held group: nothing after it reaches the client.
    full = h.tokenizer.decode(reference(prompt, 11))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if stop.strip() and "\ufffd" not in stop:
        cut = h.submit(prompt, max_new_tokens=11, ignore_eos=True, stop=[stop])[1].wait()
        assert cut.finish == "stop" and cut.text == full[: full.index(stop)]
    h.wait_idle()


def test_stream_interval_must_be_positive(make) -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        make(stream_interval=0)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_conditions(make, tokenizer, async_scheduling: bool) -> None:
    prompt = _prompt(6, 1)
    free_run = reference(prompt, 20)
    eos = free_run[4]
    first_eos = free_run.index(eos)
    # Asynchronous: each stop is seen a step late, so the look-ahead token must not leak out.
    h = make(eos=(eos,), max_context=64, async_scheduling=async_scheduling)

    assert h.submit(prompt, max_new_tokens=20)[1].wait().tokens == free_run[: first_eos + 1]
    assert h.submit(prompt, max_new_tokens=20)[1].wait().finish == "eos"
    assert h.submit(prompt, max_new_tokens=20, ignore_eos=True)[1].wait().tokens == free_run

    stop_id = free_run[2]
    stopped = h.submit(prompt, max_new_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])[1].wait()
    assert (stopped.finish, stopped.last.stop_reason) == ("stop", str(stop_id))
    assert stopped.tokens == free_run[: free_run.index(stop_id) + 1]

    text = tokenizer.decode(free_run)
    stop = text[7:10]
    cut = h.submit(prompt, max_new_tokens=20, ignore_eos=True, stop=[stop])[1].wait()
    assert (cut.finish, cut.last.stop_reason, cut.text) == ("stop", stop, text[: text.index(stop)])

    # max_new_tokens 0 means "up to the context": 64 - 6 tokens.
    full = h.submit(prompt, ignore_eos=True)[1].wait()
    assert (full.finish, full.tokens) == ("length", reference(prompt, 58))


# ---- cancellation, in every state --------------------------------------------------------


def test_cancel_in_flight_frees_blocks_when_the_step_returns_and_drops_at_the_next(make) -> None:
    h = make()
    h.pipeline.set_hold(True)
    seq_id, sink = h.submit(_prompt(6, 2), max_new_tokens=50, ignore_eos=True)
    h.pipeline.wait_for_step(1)
    h.engine.abort(seq_id)
    # The client hears at once; the blocks stay taken while the stages still write them.
    assert sink.wait().finish == "cancelled"
    bm = h.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks - 2
    h.pipeline.release()
    h.wait_idle()
    # The next step tells the stages to forget it and does not schedule it.
    other, _ = h.submit([0, 9], max_new_tokens=1)
    step = h.pipeline.wait_for_step(2)
    assert list(step.drop_seq_ids) == [seq_id]
    assert [s.seq_id for s in step.seqs] == [other]


def test_cancel_running_between_steps_frees_blocks_at_once(make) -> None:
    # Two steps in flight over one stage. While the engine thread is held inside X's sink
    # (step 3, X's next, has left already: steps go out before responses are built), A's
    # step returns and A is cancelled: the engine sees both before it schedules again, so A
    # is cancelled while running but not in flight, and the next step drops it.
    h = make(max_inflight=2)
    h.pipeline.set_hold(True)
    x = Collector()
    x.gate = threading.Event()
    x_id, _ = h.submit([0, 5, 6], x, max_new_tokens=3, ignore_eos=True)
    h.pipeline.wait_for_step(1)
    a_id, a = h.submit(_prompt(6, 3), max_new_tokens=50, ignore_eos=True)
    h.pipeline.wait_for_step(2)
    h.pipeline.release()
    assert x.entered.wait(WAIT_S)
    h.pipeline.release()
    h.engine.abort(a_id)
    x.gate.set()
    assert a.wait().finish == "cancelled" and len(a.tokens) == 1
    assert [s.seq_id for s in h.pipeline.wait_for_step(3).seqs] == [x_id]
    # Only X's one block is taken while step 3 is held: A's two came back at once.
    bm = h.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks - 1
    h.pipeline.release()
    step = h.pipeline.wait_for_step(4)
    assert list(step.drop_seq_ids) == [a_id] and [s.seq_id for s in step.seqs] == [x_id]
    h.pipeline.set_hold(False)
    assert x.wait().tokens == reference([0, 5, 6], 3)


def test_cancel_before_admission_never_reaches_the_stages(make) -> None:
    h = make()
    h.pipeline.set_hold(True)
    x = Collector()
    x.gate = threading.Event()
    h.submit([0, 5, 6], x, max_new_tokens=2, ignore_eos=True)
    h.pipeline.wait_for_step(1)
    h.pipeline.release()  # X's token: the engine thread now waits in X's sink
    assert x.entered.wait(WAIT_S)
    a_id, a = h.submit(_prompt(5, 4), max_new_tokens=5)
    h.engine.abort(a_id)
    x.gate.set()
    assert a.wait().finish == "cancelled" and a.tokens == []
    assert a.last.prompt_tokens == 5
    h.pipeline.set_hold(False)
    x.wait()
    assert all(a_id not in {s.seq_id for s in step.seqs} for step in h.pipeline.steps)


def test_cancel_waiting_and_preempted_requests(make) -> None:
    # A pool of 4 blocks of 4 tokens: A and B (6-token prompts) both fit at first, then A's
    # growth preempts B, the later arrival.
    h = make(num_blocks=4, block_size=4, max_num_seqs=2)
    h.pipeline.set_hold(True)
    a_id, a = h.submit(_prompt(6, 5), max_new_tokens=9, ignore_eos=True)
    b_id, b = h.submit(_prompt(6, 6), max_new_tokens=9, ignore_eos=True)
    for n in range(1, 20):
        h.pipeline.wait_for_step(n)
        if h.engine.stats.preemptions:
            break
        h.pipeline.release()
    assert h.engine.stats.preemptions == 1
    preempted = h.engine.scheduler.get(b_id)
    assert preempted is not None and not preempted.block_ids
    h.engine.abort(b_id)
    assert b.wait().finish == "cancelled"
    # Queued behind a running request, never admitted.
    c_id, c = h.submit(_prompt(9, 7), max_new_tokens=3)
    h.engine.abort(c_id)
    assert c.wait().finish == "cancelled" and c.tokens == []
    h.pipeline.set_hold(False)
    assert a.wait().tokens == reference(_prompt(6, 5), 9)
    h.wait_idle()
    assert h.engine.num_pending == 0


def test_cancel_after_the_end_and_of_unknown_ids_changes_nothing(make) -> None:
    h = make()
    seq_id, sink = h.submit([0, 4, 4], max_new_tokens=2, ignore_eos=True)
    sink.wait()
    h.engine.abort(seq_id)
    h.engine.abort(10**9)
    h.wait_idle()
    assert h.engine.num_pending == 0
    assert h.submit([0, 4, 4], max_new_tokens=2, ignore_eos=True)[1].wait().tokens == sink.tokens


# ---- failures ----------------------------------------------------------------------------


def test_rejected_step_fails_only_its_sequences(make) -> None:
    h = make(pp=2)
    good = h.submit([0, 3, 4], max_new_tokens=3, ignore_eos=True)[1].wait()
    bad = h.submit([0, POISON, 4], max_new_tokens=3)[1].wait()
    assert bad.finish == "error" and "outside the vocabulary" in bad.last.error_message
    assert not h.engine.failed
    prompts = [_prompt(4 + i, 10 + i) for i in range(4)]
    sinks = [h.submit(p, max_new_tokens=6, ignore_eos=True)[1] for p in prompts]
    for p, s in zip(prompts, sinks):
        assert s.wait().tokens == reference(p, 6)
    assert good.tokens == reference([0, 3, 4], 3)


def test_drops_carried_by_a_rejected_step_still_reach_the_stages(make) -> None:
    h = make(pp=2)
    h.submit([0, 3, 4], max_new_tokens=3, ignore_eos=True)[1].wait()
    # The next step carries the drop of that finished sequence, and is rejected.
    assert h.submit([0, POISON, 4], max_new_tokens=3)[1].wait().finish == "error"
    seq_id, last = h.submit([0, 8], max_new_tokens=1)
    last.wait()
    h.pipeline.wait_for_step(len(h.pipeline.steps))
    assert h.stage_sequences() == [{seq_id}, {seq_id}]


def test_broken_stream_fails_everything_and_refuses_new_requests(make) -> None:
    h = make(pp=2)
    h.pipeline.set_hold(True)
    sinks = [h.submit(_prompt(5, i), max_new_tokens=20)[1] for i in range(3)]
    h.pipeline.wait_for_step(1)
    h.pipeline.stages[1].break_stream("stage 1 went away")
    for s in sinks:
        assert s.wait().finish == "error"
        assert s.last.error_message == "unavailable: stage 1 went away"
        assert isinstance(s.end, EngineUnavailable)
    with pytest.raises(EngineUnavailable, match="stage 1 went away"):
        h.submit([0, 1], max_new_tokens=1)
    h.wait_idle()


def test_stuck_stage_is_detected_by_the_step_timeout(make) -> None:
    h = make(pp=2, step_timeout_s=0.5)
    h.pipeline.stages[1].mute = True
    start = time.monotonic()
    _, sink = h.submit(_prompt(5, 20), max_new_tokens=4)
    message = sink.wait().last.error_message
    assert time.monotonic() - start >= 0.5
    assert message.startswith("unavailable: step 1 got no answer within 0.5 s")
    assert isinstance(sink.end, EngineUnavailable)
    # Stage 0 answered, stage 1 did not: the message names stage 1 only.
    assert "from stage 1 (fake-stage-1)" in message and "fake-stage-0" not in message
    assert h.engine.failed
    with pytest.raises(EngineUnavailable):
        h.submit([0, 1], max_new_tokens=1)
    h.wait_idle()


def test_a_slow_pipeline_within_the_step_timeout_keeps_serving(make) -> None:
    # Each answer takes 50 ms and two steps queue on the stages; the timeout is 1 s.
    h = make(pp=2, step_timeout_s=1.0)
    h.pipeline.delay_s = 0.05
    prompts = [_prompt(4, 30 + i) for i in range(3)]
    sinks = [h.submit(p, max_new_tokens=10, ignore_eos=True)[1] for p in prompts]
    for p, s in zip(prompts, sinks):
        assert s.wait().tokens == reference(p, 10)
    assert h.engine.failed is None


def _break_and_forget(h: Harness) -> None:
    """Stage 1's stream breaks; the steps the stages hold are lost with it."""
    h.pipeline.stages[1].break_stream("stage 1 went away")
    with h.pipeline.lock:
        for stage in h.pipeline.stages:
            stage.held.clear()
    h.pipeline.set_hold(False)


def _resume(h: Harness) -> None:
    bm = h.engine.block_manager
    h.engine.resume(BlockManager(bm.num_total_blocks, bm.block_size))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_broken_stream_keeps_requests_and_the_recovered_pipeline_continues_them(
    make, async_scheduling: bool
) -> None:
    h = make(pp=2, recovery_timeout_s=10.0, async_scheduling=async_scheduling)
    h.pipeline.set_hold(True)
    prompts = [_prompt(5 + i, 60 + i) for i in range(4)]
    sinks = [h.submit(p, max_new_tokens=12, ignore_eos=True)[1] for p in prompts]
    for n in range(1, 7):  # a few tokens streamed, more steps in flight
        h.pipeline.wait_for_step(n)
        h.pipeline.release(1)
    h.pipeline.wait_for_step(7)
    deadline = time.monotonic() + WAIT_S
    while not all(s.tokens for s in sinks):  # the responses are built after the next step left
        assert time.monotonic() < deadline, "no tokens streamed before the failure"
        time.sleep(0.005)
    _break_and_forget(h)
    time.sleep(0.1)
    assert not h.engine.serving and h.engine.failed is None
    assert not any(s.done.is_set() for s in sinks)
    # A request that arrives meanwhile waits with them; nothing is sent to the stages.
    sent = len(h.pipeline.steps)
    late_prompt = _prompt(6, 70)
    sinks.append(h.submit(late_prompt, max_new_tokens=12, ignore_eos=True)[1])
    prompts.append(late_prompt)
    time.sleep(0.1)
    assert len(h.pipeline.steps) == sent
    _resume(h)
    # The stages start from a clean slate, and every sequence is sent with the tokens it has.
    first = h.pipeline.wait_for_step(sent + 1)
    assert first.reset and {n.seq_id for n in first.new_seqs} >= {s.seq_id for s in first.seqs}
    assert any(n.output_token_ids for n in first.new_seqs)
    for p, s in zip(prompts, sinks):
        # Exactly the tokens of an undisturbed run: none sent twice, none changed.
        assert s.wait().tokens == reference(p, 12) and s.finish == "length"
        assert s.end is None
    assert h.engine.serving
    assert h.engine.metrics.streams_carried._value.get() == 4


def test_past_the_recovery_timeout_requests_end_unavailable_until_resumed(make) -> None:
    h = make(pp=2, recovery_timeout_s=0.5)
    h.pipeline.set_hold(True)
    sinks = [h.submit(_prompt(5, 80 + i), max_new_tokens=20)[1] for i in range(2)]
    h.pipeline.wait_for_step(1)
    broken = time.monotonic()
    _break_and_forget(h)
    for s in sinks:
        assert s.wait().last.error_message == (
            "unavailable: stage 1 went away; the pipeline did not recover within 0.5 s (--recovery-timeout)"
        )
        assert isinstance(s.end, EngineUnavailable)
    assert 0.5 <= time.monotonic() - broken < 2.0
    with pytest.raises(EngineUnavailable, match="did not recover"):
        h.submit([0, 1], max_new_tokens=1)
    _resume(h)
    deadline = time.monotonic() + WAIT_S
    while not h.engine.serving:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert h.submit([0, 2, 3], max_new_tokens=3, ignore_eos=True)[1].wait().tokens == reference([0, 2, 3], 3)


def test_a_pipeline_that_fails_again_before_any_step_keeps_the_first_deadline(make) -> None:
    # A request that crashes a stage would crash every re-formed pipeline: the rounds must
    # not each win the kept requests a fresh recovery timeout.
    h = make(pp=2, recovery_timeout_s=1.0)
    h.pipeline.set_hold(True)
    _, sink = h.submit(_prompt(5, 90), max_new_tokens=20)
    h.pipeline.wait_for_step(1)
    broken = time.monotonic()
    _break_and_forget(h)
    time.sleep(0.5)
    h.pipeline.set_hold(True)
    _resume(h)
    h.pipeline.wait_for_step(2)  # the recompute goes out, and is never answered
    _break_and_forget(h)
    assert "did not recover within 1 s" in sink.wait().last.error_message
    assert time.monotonic() - broken < 1.4


def test_engine_rejects_a_non_positive_step_timeout(tokenizer) -> None:
    with pytest.raises(ValueError, match="step_timeout_s must be > 0"):
        Harness(tokenizer, step_timeout_s=0)


# ---- backpressure and shutdown ---------------------------------------------------------------


def test_queue_full_is_refused_at_once_and_frees_up(make) -> None:
    h = make(max_pending=3)
    h.pipeline.set_hold(True)
    held = [h.submit(_prompt(4, 40 + i), max_new_tokens=2, ignore_eos=True) for i in range(3)]
    with pytest.raises(QueueFullError, match="max-queue-len"):
        h.submit([0, 1], max_new_tokens=1)
    h.engine.abort(held[0][0])
    held[0][1].wait()
    _, late = h.submit([0, 2, 3], max_new_tokens=2, ignore_eos=True)
    h.pipeline.set_hold(False)
    assert late.wait().tokens == reference([0, 2, 3], 2)
    for _, sink in held[1:]:
        assert sink.wait().finish == "length"


def test_stop_ends_every_request(tokenizer) -> None:
    h = Harness(tokenizer)
    h.pipeline.set_hold(True)
    sinks = [h.submit(_prompt(4, 50 + i), max_new_tokens=8)[1] for i in range(2)]
    h.pipeline.wait_for_step(1)
    h.engine.stop()
    for s in sinks:
        assert s.wait().last.error_message == "unavailable: the router is shutting down"
        assert isinstance(s.end, EngineUnavailable)
    assert h.engine.num_pending == 0
    assert h.engine.block_manager.num_free_blocks == h.engine.block_manager.num_total_blocks
