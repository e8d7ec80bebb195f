"""Scheduler: budgets, chunked prefill, FCFS, preemption, in-flight exclusion, abort, no leaks."""

from __future__ import annotations

import random
from collections import deque

import pytest

from router.block_manager import BlockManager
from router.scheduler import QueueFullError, ScheduledBatch, Scheduler
from router.sequence import Sequence, SequenceStatus
from shared.config import SchedulerConfig

_next_id = iter(range(10**9))


def make_seq(num_prompt: int, max_new_tokens: int = 4, **kw: int) -> Sequence:
    """A sequence with prompt tokens unique to it (no accidental prefix hits)."""
    seq_id = next(_next_id)
    start = seq_id * 10_000
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        prompt_token_ids=list(range(start, start + num_prompt)),
        max_new_tokens=max_new_tokens,
        **kw,
    )


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    max_queue_len: int = 100,
    prefix_caching: bool = True,
    async_scheduling: bool = False,
    max_context: int = 0,
    num_stages: int = 1,
    even_micro_batches: bool = True,
    steps_in_flight_per_seq: int = 0,
) -> Scheduler:
    """Synchronous by default: most tests here pin down the policy step by step; the
    look-ahead tests at the end turn asynchronous scheduling on."""
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_queue_len=max_queue_len,
        enable_prefix_caching=prefix_caching,
        async_scheduling=async_scheduling,
        even_micro_batches=even_micro_batches,
        steps_in_flight_per_seq=steps_in_flight_per_seq,
    )
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(config, block_manager, max_context=max_context, num_stages=num_stages)


def complete(sched: Scheduler, batch: ScheduledBatch, token: int = 7) -> None:
    sched.on_step_done(batch, {e.seq.seq_id: token for e in batch.entries if e.sample})


def shape(batch: ScheduledBatch) -> list[tuple[int, int, int, bool]]:
    return [(e.seq.seq_id, e.start_position, e.num_tokens, e.sample) for e in batch.entries]


def test_token_budget_is_honoured_with_a_chunked_tail() -> None:
    sched = make_scheduler(max_num_batched_tokens=25)
    seqs = [make_seq(10) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch is not None
    assert shape(batch) == [
        (seqs[0].seq_id, 0, 10, True),
        (seqs[1].seq_id, 0, 10, True),
        (seqs[2].seq_id, 0, 5, False),
    ]
    assert batch.num_tokens == 25
    assert all(e.is_new and e.new_block_ids == e.seq.block_ids for e in batch.entries)
    assert sched.num_waiting == 1 and sched.num_running == 3


def test_max_num_seqs_is_honoured() -> None:
    sched = make_scheduler(max_num_seqs=3)
    for _ in range(5):
        sched.add(make_seq(2))
    batch = sched.schedule()
    assert batch is not None and len(batch.entries) == 3
    assert sched.num_waiting == 2


def test_chunked_prefill_positions_and_sample_flag() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq(50)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch is not None
        chunks.append(shape(batch)[0][1:])
        start, num_tokens, _ = chunks[-1]
        assert batch.entries[0].token_ids == seq.prompt_token_ids[start : start + num_tokens]
        complete(sched, batch, token=99)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert seq.output_token_ids == [99] and seq.num_computed_tokens == 50
    decode = sched.schedule()
    assert decode is not None and shape(decode) == [(seq.seq_id, 50, 1, True)]
    assert decode.entries[0].token_ids == [99]
    # 51 tokens fit in ceil(51 / 4) = 13 blocks: 13 were allocated at admission.
    assert decode.entries[0].new_block_ids == []


def test_decode_grows_block_table_at_block_boundary() -> None:
    sched = make_scheduler(block_size=4)
    seq = make_seq(4)
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None and len(batch.entries[0].new_block_ids) == 1
    complete(sched, batch)
    decode = sched.schedule()
    assert decode is not None
    assert len(decode.entries[0].new_block_ids) == 1 and len(seq.block_ids) == 2
    assert decode.entries[0].new_block_ids == seq.block_ids[1:]


def test_decodes_go_before_prefill_chunks_and_new_prompts() -> None:
    sched = make_scheduler(max_num_batched_tokens=20)
    # `long` arrived first but is queued second: FCFS alone would give it the whole budget.
    long = make_seq(100, arrival=-10)
    short = make_seq(4, arrival=-5)
    sched.add(short)
    sched.add(long)
    first = sched.schedule()
    assert first is not None
    assert shape(first) == [(short.seq_id, 0, 4, True), (long.seq_id, 0, 16, False)]
    complete(sched, first)
    newcomer = make_seq(3)
    sched.add(newcomer)
    second = sched.schedule()
    assert second is not None
    assert shape(second) == [(short.seq_id, 4, 1, True), (long.seq_id, 16, 19, False)]
    complete(sched, second)
    sched.finish(long)
    third = sched.schedule()
    assert third is not None
    assert shape(third) == [(short.seq_id, 5, 1, True), (newcomer.seq_id, 0, 3, True)]


def test_fcfs_admission_has_no_overtaking() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4)
    holder = make_seq(12)  # 3 blocks
    sched.add(holder)
    held = sched.schedule()
    assert held is not None
    big, small = make_seq(16), make_seq(2)  # big needs 4 blocks, 3 are free
    sched.add(big)
    sched.add(small)
    assert sched.schedule() is None  # small would fit, but must not overtake big
    assert sched.num_waiting == 2
    sched.abort(holder.seq_id)
    # holder's step has not returned: the stages may still write its blocks.
    assert sched.schedule() is None
    complete(sched, held)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [big, small]


def test_queue_full_raises() -> None:
    sched = make_scheduler(max_queue_len=2)
    sched.add(make_seq(3))
    sched.add(make_seq(3))
    with pytest.raises(QueueFullError, match="max_queue_len"):
        sched.add(make_seq(3))


def test_in_flight_sequences_are_never_scheduled_twice() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(3) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    b1, b2 = sched.schedule(), sched.schedule()
    assert b1 is not None and b2 is not None
    assert not set(b1.seqs) & set(b2.seqs)
    assert set(b1.seqs) | set(b2.seqs) == set(seqs)
    assert sched.schedule() is None
    complete(sched, b1)
    b3 = sched.schedule()
    assert b3 is not None and set(b3.seqs) == set(b1.seqs)
    assert all(e.num_tokens == 1 and not e.is_new for e in b3.entries)
    assert sched.schedule() is None  # b2 and b3 are in flight


def run_to_block_exhaustion(sched: Scheduler) -> ScheduledBatch:
    """Steps until a batch reports a preemption; returns that batch."""
    for _ in range(100):
        batch = sched.schedule()
        assert batch is not None
        if batch.preempted:
            return batch
        complete(sched, batch)
    raise AssertionError("no preemption happened")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_frees_the_latest_and_recomputes_with_outputs(prefix_caching: bool) -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, prefix_caching=prefix_caching)
    first, second = make_seq(6, max_new_tokens=100), make_seq(6, max_new_tokens=100)
    sched.add(first)
    sched.add(second)
    batch = run_to_block_exhaustion(sched)
    # Both reach 8 tokens together; growing to 9 needs a third block each, one is left.
    assert batch.preempted == [second]
    assert shape(batch) == [(first.seq_id, 8, 1, True)]
    assert second.status is SequenceStatus.WAITING and second.block_ids == []
    assert second.num_computed_tokens == 0 and second.num_preemptions == 1
    assert sched.num_preemptions == 1
    outputs = list(second.output_token_ids)
    assert len(outputs) == 3  # 6 prompt tokens + 3 sampled = 9 tokens
    sched.block_manager.check_invariants([first, second])

    complete(sched, batch)
    sched.finish(first)
    again = sched.schedule()
    assert again is not None and again.preempted == []
    entry = again.entries[0]
    assert entry.seq is second and entry.is_new and entry.sample
    # Recompute covers the outputs too. With prefix caching, second's 2 full blocks stayed
    # cached when it was freed, but first's new block evicted the chain's tail: 1 block hits.
    cached = 4 if prefix_caching else 0
    assert (entry.start_position, entry.num_tokens) == (cached, 9 - cached)
    assert entry.new_block_ids == second.block_ids and len(second.block_ids) == 3
    assert entry.token_ids == (second.prompt_token_ids + outputs)[cached:]


def test_preemption_skips_in_flight_sequences() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=1)
    a, b, c = make_seq(7), make_seq(7), make_seq(7)  # 2 blocks each: the pool is used up
    for s in (a, b, c):
        sched.add(s)
    prefills = [sched.schedule() for _ in range(3)]  # one sequence per micro-batch
    for batch in prefills:
        assert batch is not None
        complete(sched, batch)
    decodes = [sched.schedule() for _ in range(3)]
    assert all(batch is not None for batch in decodes)
    complete(sched, decodes[0])  # a: 9 tokens, its next decode needs a third block
    complete(sched, decodes[1])  # c stays in flight
    batch = sched.schedule()
    assert batch is not None
    # The latest arrival, c, is in flight: b is preempted instead.
    assert batch.preempted == [b] and batch.seqs == [a]
    assert c.status is SequenceStatus.RUNNING and c.in_flight and len(c.block_ids) == 2
    assert b.status is SequenceStatus.WAITING and b.block_ids == []
    assert len(a.block_ids) == 3
    sched.block_manager.check_invariants([a, b, c])


def test_self_preemption_when_every_later_sequence_is_in_flight() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=1)
    a, b = make_seq(7), make_seq(7)
    sched.add(a)
    sched.add(b)
    ba, bb = sched.schedule(), sched.schedule()
    assert ba is not None and bb is not None
    complete(sched, ba)
    complete(sched, bb)  # 8 tokens, 2 blocks each: the pool is used up
    da, db = sched.schedule(), sched.schedule()
    assert da is not None and shape(da) == [(a.seq_id, 7, 1, True)]
    assert db is not None and shape(db) == [(b.seq_id, 7, 1, True)]
    complete(sched, da)  # a: 9 tokens, its next decode needs a third block
    # No block is free and b is in flight: a preempts itself; the preemption rides on the
    # next batch since this call schedules nothing.
    assert sched.schedule() is None
    assert a.status is SequenceStatus.WAITING and a.num_preemptions == 1 and a.block_ids == []
    assert b.in_flight and len(b.block_ids) == 2
    complete(sched, db)
    sched.finish(b)
    again = sched.schedule()
    assert again is not None and again.preempted == [a]
    assert again.entries[0].seq is a and again.entries[0].is_new


def test_unschedulable_prompt_is_reported_and_the_queue_moves_on() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    too_big, fine = make_seq(17), make_seq(3)
    sched.add(too_big)
    sched.add(fine)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [fine]
    assert sched.pop_unschedulable() == [too_big]
    assert sched.pop_unschedulable() == []
    assert too_big.is_finished and too_big.block_ids == []
    assert sched.get(too_big.seq_id) is None


def test_abort_waiting_running_and_in_flight_frees_everything() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=2)
    bm = sched.block_manager
    running, in_flight, waiting = make_seq(5), make_seq(5), make_seq(5)
    for s in (running, in_flight, waiting):
        sched.add(s)
    b1 = sched.schedule()
    assert b1 is not None and b1.seqs == [running, in_flight]
    complete(sched, b1)
    # Keep only `in_flight` in flight: schedule, then abort the other half of the batch.
    b2 = sched.schedule()
    assert b2 is not None and set(b2.seqs) == {running, in_flight}

    assert sched.abort(waiting.seq_id) is waiting
    assert waiting.aborted and waiting.is_finished and sched.num_waiting == 0
    assert sched.abort(waiting.seq_id) is None

    # Both are in flight now; complete `running`'s part by splitting the batch.
    part_running = ScheduledBatch(entries=[e for e in b2.entries if e.seq is running])
    part_flight = ScheduledBatch(entries=[e for e in b2.entries if e.seq is in_flight])
    complete(sched, part_running)
    held = bm.num_total_blocks - bm.num_free_blocks
    sched.abort(running.seq_id)  # running, not in flight: freed now
    assert running.block_ids == [] and bm.num_total_blocks - bm.num_free_blocks == held - 2

    sched.abort(in_flight.seq_id)  # in flight: its blocks stay until the step returns
    assert len(in_flight.block_ids) == 2
    assert sched.schedule() is None
    tokens_before = list(in_flight.output_token_ids)
    complete(sched, part_flight)
    assert in_flight.block_ids == [] and in_flight.output_token_ids == tokens_before
    assert bm.num_free_blocks == bm.num_total_blocks
    assert not sched.has_unfinished()
    bm.check_invariants([running, in_flight, waiting])


def test_finish_in_flight_is_deferred_and_step_failure_frees() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4)
    bm = sched.block_manager
    a, b = make_seq(5), make_seq(5)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None
    sched.finish(a)
    assert a.is_finished and len(a.block_ids) == 2  # still being written
    failed = sched.on_step_failed(batch, "stage 1 lost a rank")
    assert failed == [b] and b.error == "stage 1 lost a rank" and b.is_finished
    assert a.error is None
    assert bm.num_free_blocks == bm.num_total_blocks
    assert not sched.has_unfinished()
    bm.check_invariants([a, b])


def test_missing_sampled_token_is_an_error() -> None:
    sched = make_scheduler()
    seq = make_seq(3)
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None
    with pytest.raises(ValueError, match="no sampled token"):
        sched.on_step_done(batch, {})


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_simulation_with_pipelined_steps_ends_with_pool_free(seed: int, async_scheduling: bool) -> None:
    """Drives the scheduler like a 2-stage pipelined engine, with a model of the stages' KV
    to check that every step reads only KV written for exactly its sequence's tokens.
    Asynchronous: a sequence may also be in two steps at once (its look-ahead step), and
    sequences stop early now and then (EOS), wasting their look-ahead token."""
    rng = random.Random(seed)
    bs = 4
    sched = make_scheduler(
        num_blocks=24, block_size=bs, max_num_batched_tokens=rng.choice([8, 16, 32]), max_num_seqs=4,
        async_scheduling=async_scheduling, num_stages=1 + seed % 2,
    )
    stopped_early: set[int] = set()
    max_in_flight = sched.config.inflight_steps(1 + seed % 2)
    bm = sched.block_manager
    kv: dict[int, dict[int, tuple[int, ...]]] = {}
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    created: list[Sequence] = []
    in_flight: deque[ScheduledBatch] = deque()
    reported: list[Sequence] = []
    num_requests = 60

    def new_request() -> None:
        tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 30))]
        seq = Sequence(
            seq_id=len(created), request_id=str(len(created)), prompt_token_ids=tokens or [1],
            max_new_tokens=rng.randrange(1, 12),
        )
        created.append(seq)
        sched.add(seq)

    for _ in range(5000):
        if len(created) < num_requests and rng.random() < 0.3:
            new_request()
        if len(in_flight) < max_in_flight:
            batch = sched.schedule()
            if batch is not None:
                busy = [s for b in in_flight for s in b.seqs]
                for e in batch.entries:
                    if e.seq in busy:
                        assert async_scheduling and e.append_sampled, "a sequence is in two micro-batches"
                        # One past the known tokens per step of it still in flight.
                        ahead = busy.count(e.seq)
                        assert ahead < sched.steps_per_seq
                        assert e.start_position == e.seq.num_tokens + ahead - 1 and e.num_tokens == 1 and e.sample
                assert batch.num_tokens <= sched.config.max_num_batched_tokens
                assert len(batch.entries) <= sched.config.max_num_seqs
                owners: dict[int, int] = {}
                for s in created:
                    for block in s.block_ids:
                        owners[block] = owners.get(block, 0) + 1
                for e in batch.entries:
                    tokens = e.seq.all_token_ids
                    # A look-ahead step also reads what the step before it is still writing.
                    for pos in range(min(e.start_position, e.seq.num_computed_tokens)):
                        assert kv[e.seq.block_ids[pos // bs]][pos % bs] == tuple(tokens[: pos + 1])
                    for pos in range(e.start_position, e.start_position + e.num_tokens):
                        assert owners[e.seq.block_ids[pos // bs]] == 1, "writing a shared block"
                    assert e.sample == (e.start_position + e.num_tokens >= e.seq.num_tokens)
                in_flight.append(batch)
        if in_flight and (len(in_flight) == max_in_flight or rng.random() < 0.5):
            batch = in_flight.popleft()
            for e in batch.entries:
                if e.seq.is_finished:
                    continue  # aborted while in flight: the stages' writes no longer matter
                tokens = e.seq.all_token_ids
                for pos in range(e.start_position, e.start_position + e.num_tokens):
                    block = e.seq.block_ids[pos // bs]
                    kv.setdefault(block, {})[pos % bs] = tuple(tokens[: pos + 1])
            sampled = {e.seq.seq_id: rng.randrange(3) for e in batch.entries if e.sample}
            sched.on_step_done(batch, sampled)
            for seq in batch.seqs:
                if not seq.is_finished and seq.num_output_tokens >= seq.max_new_tokens:
                    sched.finish(seq)
                elif not seq.is_finished and seq.num_output_tokens and rng.random() < 0.05:
                    stopped_early.add(seq.seq_id)
                    sched.finish(seq)
        if rng.random() < 0.02:
            live = list(sched.unfinished())
            if live:
                sched.abort(rng.choice(live).seq_id)
        reported += sched.pop_unschedulable()
        bm.check_invariants(created)
        if len(created) == num_requests and not sched.has_unfinished() and not in_flight:
            break

    assert len(created) == num_requests and not sched.has_unfinished() and not in_flight
    assert bm.num_free_blocks == bm.num_total_blocks
    for seq in created:
        assert seq.is_finished and seq.block_ids == []
        if not seq.aborted and seq not in reported and seq.seq_id not in stopped_early:
            assert seq.num_output_tokens == seq.max_new_tokens


# ---- asynchronous scheduling: look-ahead steps ---------------------------------------------


def test_look_ahead_schedules_the_next_decode_before_the_token_is_back() -> None:
    sched = make_scheduler(block_size=4, async_scheduling=True, steps_in_flight_per_seq=2)
    seq = make_seq(4, max_new_tokens=5)
    sched.add(seq)
    prefill = sched.schedule()
    assert prefill is not None and shape(prefill) == [(seq.seq_id, 0, 4, True)]
    ahead = sched.schedule()
    # Position 4 holds the token the prefill samples: unknown yet, appended by the stages.
    assert ahead is not None and shape(ahead) == [(seq.seq_id, 4, 1, True)]
    assert ahead.entries[0].append_sampled and ahead.entries[0].new_block_ids == [seq.block_ids[1]]
    assert sched.schedule() is None  # two steps in flight: nothing more for this sequence
    complete(sched, prefill, token=11)
    assert seq.output_token_ids == [11] and seq.num_computed_tokens == 4
    nxt = sched.schedule()  # ahead is still in flight: the next look-ahead goes out already
    assert nxt is not None and shape(nxt) == [(seq.seq_id, 5, 1, True)] and nxt.entries[0].append_sampled
    complete(sched, ahead, token=12)
    complete(sched, nxt, token=13)
    assert seq.output_token_ids == [11, 12, 13] and seq.num_computed_tokens == 6
    # Not in flight any more: an ordinary decode step, whose token the router appends.
    last = sched.schedule()
    assert last is not None and shape(last) == [(seq.seq_id, 6, 1, True)] and not last.entries[0].append_sampled


def test_one_stage_keeps_three_steps_of_a_sequence_in_flight_by_default() -> None:
    sched = make_scheduler(block_size=4, async_scheduling=True)
    assert sched.steps_per_seq == 3 and make_scheduler(async_scheduling=True, num_stages=2).steps_per_seq == 2
    seq = make_seq(4, max_new_tokens=6)
    sched.add(seq)
    prefill, first, second = sched.schedule(), sched.schedule(), sched.schedule()
    # Positions 4 and 5 hold the tokens the prefill and the first look-ahead sample.
    assert prefill is not None and shape(prefill) == [(seq.seq_id, 0, 4, True)]
    assert first is not None and shape(first) == [(seq.seq_id, 4, 1, True)] and first.entries[0].append_sampled
    assert second is not None and shape(second) == [(seq.seq_id, 5, 1, True)] and second.entries[0].append_sampled
    assert second.entries[0].new_block_ids == []  # position 5 is in the block the first one took
    assert sched.schedule() is None  # three in flight: its limit
    complete(sched, prefill, token=11)
    third = sched.schedule()
    assert third is not None and shape(third) == [(seq.seq_id, 6, 1, True)] and third.entries[0].append_sampled
    for batch, token in ((first, 12), (second, 13), (third, 14)):
        complete(sched, batch, token=token)
    assert seq.output_token_ids == [11, 12, 13, 14] and seq.num_computed_tokens == 7
    # Two more tokens reach max_new_tokens: one more look-ahead at most, never past the end.
    last = sched.schedule()
    assert last is not None and shape(last) == [(seq.seq_id, 7, 1, True)] and not last.entries[0].append_sampled
    ahead = sched.schedule()
    assert ahead is not None and shape(ahead) == [(seq.seq_id, 8, 1, True)]
    assert sched.schedule() is None  # a third would sample a seventh token


def test_no_look_ahead_past_max_new_tokens_or_the_context() -> None:
    sched = make_scheduler(async_scheduling=True)
    one = make_seq(4, max_new_tokens=1)  # its first step samples its only token
    sched.add(one)
    assert sched.schedule() is not None and sched.schedule() is None
    sched_ctx = make_scheduler(async_scheduling=True, max_context=5)
    near_end = make_seq(4, max_new_tokens=8)  # 4 + 1 sampled = 5 = the context: it ends there
    sched_ctx.add(near_end)
    assert sched_ctx.schedule() is not None and sched_ctx.schedule() is None


def test_a_sequence_that_stops_wastes_its_look_ahead_and_frees_blocks_when_it_returns() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, async_scheduling=True)
    bm = sched.block_manager
    seq = make_seq(4, max_new_tokens=8)
    sched.add(seq)
    prefill = sched.schedule()
    ahead = sched.schedule()
    assert prefill is not None and ahead is not None
    complete(sched, prefill)
    sched.finish(seq)  # EOS: the look-ahead step still writes its blocks
    assert len(seq.block_ids) == 2 and bm.num_free_blocks == 6
    complete(sched, ahead)
    assert seq.block_ids == [] and bm.num_free_blocks == 8
    assert seq.num_output_tokens == 1  # the look-ahead's token was not appended
    bm.check_invariants([seq])


def test_look_ahead_never_preempts() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, async_scheduling=True)
    a, b = make_seq(4, max_new_tokens=8), make_seq(4, max_new_tokens=8)
    sched.add(a)
    sched.add(b)
    both = sched.schedule()
    assert both is not None and both.seqs == [a, b]
    # Each needs a second block for its next token and none is free: no look-ahead, and
    # nobody is preempted while in flight.
    assert sched.schedule() is None
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.RUNNING


def test_abort_with_two_steps_in_flight_frees_after_both_return() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, async_scheduling=True)
    bm = sched.block_manager
    seq = make_seq(3, max_new_tokens=8)
    sched.add(seq)
    first, second = sched.schedule(), sched.schedule()
    assert first is not None and second is not None and seq.num_inflight_steps == 2
    sched.abort(seq.seq_id)
    complete(sched, first)
    assert len(seq.block_ids) == 1 and seq.num_inflight_steps == 1
    failed = sched.on_step_failed(second, "boom")
    assert failed == [] and seq.block_ids == [] and bm.num_free_blocks == 8


def test_in_a_pipeline_an_independent_micro_batch_goes_before_a_look_ahead() -> None:
    sched = make_scheduler(async_scheduling=True, num_stages=2)
    a, b = make_seq(4, max_new_tokens=8), make_seq(4, max_new_tokens=8)
    sched.add(a)
    first = sched.schedule()
    assert first is not None and first.seqs == [a]
    sched.add(b)
    # b can run on the first stage while a is on the second: b goes first, not a's look-ahead.
    second = sched.schedule()
    assert second is not None and second.seqs == [b] and not second.entries[0].append_sampled
    # Nothing independent left: the look-ahead of the oldest micro-batch fills the slot.
    third = sched.schedule()
    assert third is not None and third.seqs == [a] and third.entries[0].append_sampled
    fourth = sched.schedule()
    assert fourth is not None and fourth.seqs == [b] and fourth.entries[0].append_sampled
    assert sched.schedule() is None


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_in_a_pipeline_micro_batches_stay_even_when_results_come_back_together(async_scheduling: bool) -> None:
    # Two stages, eight decoding sequences: each lane holds half of them. Without lanes, two
    # micro-batches returning before the next schedule() merge into one of eight, which
    # leaves one stage idle while the other computes it.
    sched = make_scheduler(
        num_blocks=256, max_num_batched_tokens=256, max_num_seqs=16, async_scheduling=async_scheduling, num_stages=2
    )
    seqs = [make_seq(4, max_new_tokens=40) for _ in range(8)]
    for seq in seqs:
        sched.add(seq)
    inflight: deque[ScheduledBatch] = deque()
    sizes: list[int] = []
    lanes: list[int] = []
    for _ in range(30):
        while len(inflight) < (4 if async_scheduling else 2) and (batch := sched.schedule()) is not None:
            inflight.append(batch)
            sizes.append(len(batch.entries))
            lanes.append(batch.lane)
        # Every step in flight comes back before the next schedule() call.
        while inflight:
            complete(sched, inflight.popleft())
    assert max(sizes) == 4 and sizes.count(4) == len(sizes)
    # The lanes take turns: no lane's step follows its own on the first stage.
    assert all(a != b for a, b in zip(lanes, lanes[1:]))


def test_lanes_fill_up_to_their_share_of_the_sequences_in_the_system() -> None:
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=256, max_num_seqs=16, num_stages=2)
    for _ in range(3):
        sched.add(make_seq(4, max_new_tokens=40))
    first = sched.schedule()
    second = sched.schedule()
    assert first is not None and second is not None
    # Three sequences over two stages: two, then one; never a micro-batch of all three.
    assert (len(first.entries), len(second.entries)) == (2, 1)
    # One stage: the whole max_num_seqs is one micro-batch.
    single = make_scheduler(num_blocks=256, max_num_batched_tokens=256, max_num_seqs=16)
    for _ in range(3):
        single.add(make_seq(4, max_new_tokens=40))
    batch = single.schedule()
    assert batch is not None and len(batch.entries) == 3
    # Two stages with the limit off (--no-even-micro-batches): the same as one stage.
    uneven = make_scheduler(num_blocks=256, max_num_batched_tokens=256, max_num_seqs=16, num_stages=2,
                            even_micro_batches=False)
    for _ in range(3):
        uneven.add(make_seq(4, max_new_tokens=40))
    batch = uneven.schedule()
    assert batch is not None and len(batch.entries) == 3


def test_in_a_pipeline_later_arrivals_join_the_lanes_instead_of_new_micro_batches() -> None:
    # a and b arrived one by one (a lane each), then c and d together: they join the lanes'
    # next steps (the look-aheads of a and b), so the pipe holds two micro-batches of two
    # instead of three.
    sched = make_scheduler(async_scheduling=True, num_stages=2, max_num_seqs=16)
    a, b, c, d = (make_seq(4, max_new_tokens=8) for _ in range(4))
    sched.add(a)
    first = sched.schedule()
    assert first is not None and first.seqs == [a]
    sched.add(b)
    assert sched.schedule().seqs == [b]  # type: ignore[union-attr]
    sched.add(c)
    sched.add(d)
    third, fourth = sched.schedule(), sched.schedule()
    assert third is not None and fourth is not None
    assert third.seqs == [a, c] and third.entries[0].append_sampled and third.entries[1].is_new
    assert fourth.seqs == [b, d] and fourth.entries[0].append_sampled and fourth.entries[1].is_new
    # Every lane has two steps in flight (asynchronous scheduling): nothing more to send.
    assert sched.schedule() is None
    # The lanes keep their sequences: a's step back, its lane's next step is a and c again.
    complete(sched, first)
    again = sched.schedule()
    assert again is not None and sorted(s.seq_id for s in again.seqs) == sorted([a.seq_id, c.seq_id])
    # Without lanes the independent micro-batch of c and d goes first, a third group.
    uneven = make_scheduler(async_scheduling=True, num_stages=2, max_num_seqs=16, even_micro_batches=False)
    x, y, z = (make_seq(4, max_new_tokens=8) for _ in range(3))
    uneven.add(x)
    uneven.schedule()
    uneven.add(y)
    uneven.schedule()
    uneven.add(z)
    assert uneven.schedule().seqs == [z]  # type: ignore[union-attr]


def test_a_lost_pipeline_sends_every_sequence_back_to_waiting_in_arrival_order() -> None:
    # Two stages with lanes and look-ahead: steps of both lanes in flight, one sequence
    # finished while its step is in flight, another still waiting.
    sched = make_scheduler(num_blocks=16, async_scheduling=True, num_stages=2, max_num_seqs=2)
    seqs = [make_seq(5, max_new_tokens=8) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first is not None
    complete(sched, first)
    inflight = [b for b in (sched.schedule(), sched.schedule(), sched.schedule()) if b is not None]
    assert inflight and any(s.in_flight for s in seqs)
    done = next(s for s in seqs if s.in_flight)
    sched.finish(done)
    kept = sched.on_pipeline_lost(inflight)
    # Nothing in flight or holding blocks; arrival order; outputs kept for the recompute.
    assert kept == [s for s in seqs if s is not done]
    assert all(s.status is SequenceStatus.WAITING and not s.block_ids and not s.in_flight for s in kept)
    assert all(s.num_computed_tokens == 0 for s in kept) and any(s.output_token_ids for s in kept)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks
    # A new, empty pool: the sequences are admitted again and sent whole (prompt + outputs).
    sched.replace_block_manager(BlockManager(16, 4))
    batch = sched.schedule()
    assert batch is not None and not batch.preempted
    assert all(e.is_new and e.start_position == 0 for e in batch.entries)
    assert batch.entries[0].seq is kept[0]
