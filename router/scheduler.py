"""Continuous batching: which sequences run in the next micro-batch, and how many tokens each.

Policy: FCFS with chunked prefill and preemption by recompute.

* A micro-batch holds only sequences that are not in flight, so with pipeline parallelism the
  engine can keep several micro-batches (over disjoint sequences) in the pipe at once.
* Lanes (pipelines, SchedulerConfig.even_micro_batches): with P stages every sequence is
  admitted into one of P lanes, the one being scheduled while it holds less than 1/P of
  the sequences in the system, and a micro-batch holds one lane's sequences: its
  look-ahead, its other runnable sequences and new admissions. Each lane has at most one
  step in flight (with asynchronous scheduling, as many as a sequence may have), and lanes
  take turns. So the pipe holds P micro-batches of even size, whatever the timing of
  arrivals and results; without lanes, the sequences not in flight at a schedule() call
  share a micro-batch, and groups split by staggered arrivals keep their own steps for good.
* Running sequences go first: decodes, then unfinished prefill chunks, both in arrival order.
  Decodes first keeps the inter-token latency of running requests steady while a long
  prompt is being prefilled in chunks.
* Waiting sequences are admitted in arrival order while the token budget, the sequence count
  and the KV pool allow; the first one that does not fit stops admission (no overtaking).
* When a running sequence needs a new block and none is free, the most recently arrived
  running sequence that is not in flight is preempted (possibly the one asking): its blocks
  are freed and it goes back to the front of the waiting queue, to be recomputed (prompt and
  outputs; its full blocks usually come back as prefix-cache hits).
* Asynchronous scheduling (SchedulerConfig.async_scheduling): a sequence whose steps in
  flight each sample its next token may be scheduled again at once, for the token after
  them (`append_sampled`: the stages append the token they sampled themselves), up to
  SchedulerConfig.steps_in_flight_per_seq steps in flight (three with one stage, two in a
  pipeline). The router learns each token later; a sequence that turns out to have stopped
  (EOS, a stop string) wastes its look-ahead tokens, which are dropped. Look-ahead steps
  never preempt. With one stage, and in a lane, they lead every step; in a pipeline without
  lanes they go out only when no micro-batch of other sequences can (a look-ahead step waits
  on the first stage for its tokens, while an independent micro-batch keeps that stage busy;
  lanes get the same by taking turns).
* A sequence that cannot fit in the whole KV pool is never admitted: `schedule()` moves it to
  an unschedulable list that the engine drains with `pop_unschedulable()` and reports as an
  error to its client. This covers both over-long prompts and sequences that outgrew the
  pool while decoding (they are preempted, then found unschedulable).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from router.block_manager import BlockManager
from router.sequence import Sequence, SequenceStatus
from shared.config import SchedulerConfig


class QueueFullError(RuntimeError):
    """The waiting queue is at SchedulerConfig.max_queue_len; the request is refused."""


@dataclass(frozen=True)
class ScheduledEntry:
    seq: Sequence
    # Tokens before this position are already in the KV cache.
    start_position: int
    num_tokens: int
    # The chunk reaches the sequence's last known token, so the step samples a new one.
    sample: bool
    # Appended to the stages' block table before the step runs (the whole table when is_new).
    new_block_ids: list[int]
    # First step since (re-)admission: the stages do not know this sequence yet.
    is_new: bool
    # The sequence's previous step is still in flight and samples the token this step
    # starts from: the stages append it from their own sampler output.
    append_sampled: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids_slice(self.start_position, self.start_position + self.num_tokens)


@dataclass
class ScheduledBatch:
    entries: list[ScheduledEntry]
    # Sequences preempted while building this batch (or an earlier empty one): the stages
    # must drop them, before the batch's new sequences since one may be re-admitted here.
    preempted: list[Sequence] = field(default_factory=list)
    # The lane whose sequences the batch holds (0 without lanes).
    lane: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def seqs(self) -> list[Sequence]:
        return [e.seq for e in self.entries]

    @property
    def kind(self) -> str:
        """decode (every entry one token past its prompt), prefill (none) or mixed."""
        decodes = sum(e.num_tokens == 1 and e.start_position >= e.seq.num_prompt_tokens for e in self.entries)
        return "decode" if decodes == len(self.entries) else "prefill" if decodes == 0 else "mixed"


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, max_context: int = 0, num_stages: int = 1
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        # Pipeline stages: decides where look-ahead steps go and whether lanes are used.
        self.num_stages = num_stages
        self.num_lanes = num_stages if num_stages > 1 and config.even_micro_batches else 0
        # Steps one sequence may have in flight: 1, or with asynchronous scheduling 1 plus
        # its look-ahead steps (SchedulerConfig.steps_in_flight_per_seq).
        self.steps_per_seq = config.steps_per_seq(num_stages)
        # Steps in flight per lane, and the lane whose turn comes next.
        self._lane_steps = [0] * self.num_lanes
        self._next_lane = 0
        # The model's context length (0: unlimited): a look-ahead step never computes past it.
        self.max_context = max_context
        self._num_batches = 0
        self._waiting: deque[Sequence] = deque()
        # Kept sorted by arrival: FCFS order for scheduling, reverse order for preemption.
        self._running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        # Finished or aborted while in flight: their blocks are freed when the step returns,
        # since the stages are still writing into them.
        self._free_on_return: set[int] = set()
        self._unschedulable: list[Sequence] = []
        # Preemptions from a schedule() call that produced no entries, reported with the
        # next batch so the engine only ever handles non-empty batches.
        self._pending_preempted: list[Sequence] = []
        self.num_preemptions = 0

    # ----------------------------------------------------------------- queries

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def get(self, seq_id: int) -> Sequence | None:
        return self._by_id.get(seq_id)

    def waiting(self) -> Iterator[Sequence]:
        return iter(tuple(self._waiting))

    def running(self) -> Iterator[Sequence]:
        return iter(tuple(self._running))

    def unfinished(self) -> Iterator[Sequence]:
        return iter(tuple(self._running) + tuple(self._waiting))

    def pop_unschedulable(self) -> list[Sequence]:
        """Sequences that need more blocks than the whole pool holds; they are FINISHED
        and hold no blocks. The engine reports them to their clients as errors."""
        out, self._unschedulable = self._unschedulable, []
        return out

    # -------------------------------------------------------------- lifecycle

    def add(self, seq: Sequence) -> None:
        if len(self._waiting) >= self.config.max_queue_len:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_queue_len} requests); "
                "retry later or raise max_queue_len"
            )
        if seq.seq_id in self._by_id:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        assert seq.status is SequenceStatus.WAITING and not seq.block_ids
        self._by_id[seq.seq_id] = seq
        self._waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """Builds one micro-batch from sequences not in flight; None if there is nothing to run."""
        if not self.num_lanes:
            return self._schedule(lane=None)
        # Lanes take turns. One at its limit of steps in flight keeps its turn until a step
        # comes back, so the first stage always sees the lanes in turn: a lane's look-ahead
        # step never follows its own step directly, which would leave the first stage idle
        # while that step's tokens come round. A lane with nothing to run passes its turn.
        for turn in range(self.num_lanes):
            lane = (self._next_lane + turn) % self.num_lanes
            if self._lane_steps[lane] >= self.steps_per_seq:
                return None
            batch = self._schedule(lane)
            if batch is not None:
                self._lane_steps[lane] += 1
                self._next_lane = (lane + 1) % self.num_lanes
                return batch
        return None

    def _schedule(self, lane: int | None) -> ScheduledBatch | None:
        """One micro-batch of `lane`'s sequences and admissions into it (None: no lanes)."""
        budget = self.config.max_num_batched_tokens
        entries: list[ScheduledEntry] = []
        preempted: list[Sequence] = []

        candidates = [s for s in self._running if not s.in_flight and (lane is None or s.lane == lane)]
        decodes = [s for s in candidates if s.num_uncomputed_tokens == 1]
        prefills = [s for s in candidates if s.num_uncomputed_tokens > 1]
        # One stage, or a lane: the look-ahead decodes lead the step, new work rides along.
        # A pipeline without lanes: a look-ahead step cannot start on the first stage before
        # the last stage sampled the tokens it continues from, so a micro-batch of other
        # sequences goes first whenever there is one, and look-ahead only fills an otherwise
        # empty slot. (A lane's look-ahead follows the other lanes' steps on the first stage,
        # which is the time its tokens take to come round.)
        look_ahead_first = self.num_stages == 1 or lane is not None
        if look_ahead_first:
            budget = self._add_look_ahead(entries, budget, lane)
        for seq in decodes + prefills:
            if budget == 0 or len(entries) == self.config.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            need = seq.num_uncomputed_tokens
            assert need >= 1, f"running sequence {seq.seq_id} has nothing to compute"
            num_tokens = min(need, budget)
            total = seq.num_computed_tokens + num_tokens
            if not self._make_room(seq, total, preempted):
                continue
            new_blocks = self.block_manager.append_slots(seq, total)
            entries.append(self._entry(seq, num_tokens, new_blocks, is_new=False))
            budget -= num_tokens

        # Admitting right after a preemption would hand the freed blocks to a newcomer and
        # preempt again next step; let the running sequences use them first.
        if not preempted:
            budget = self._admit(entries, budget, lane)
        if not look_ahead_first and not entries and not preempted:
            budget = self._add_look_ahead(entries, budget, lane)

        self.num_preemptions += len(preempted)
        self._num_batches += 1
        if not entries:
            self._pending_preempted.extend(preempted)
            return None
        batch = ScheduledBatch(entries=entries, preempted=self._pending_preempted + preempted, lane=lane or 0)
        self._pending_preempted = []
        return batch

    def on_step_done(self, batch: ScheduledBatch, sampled: dict[int, int]) -> None:
        """Applies a step's result: KV computed, sampled tokens appended.

        The engine decides afterwards which sequences finished (and calls `finish`).
        """
        self._step_returned(batch)
        for entry in batch.entries:
            seq = entry.seq
            assert seq.in_flight, f"sequence {seq.seq_id} returned from a step twice"
            if self._returned(entry):
                continue
            assert seq.num_computed_tokens == entry.start_position
            seq.num_computed_tokens += entry.num_tokens
            self.block_manager.mark_computed(seq, seq.num_computed_tokens)
            if entry.sample:
                if seq.seq_id not in sampled:
                    raise ValueError(
                        f"step result has no sampled token for sequence {seq.seq_id}, "
                        "which the step asked to sample"
                    )
                seq.output_token_ids.append(sampled[seq.seq_id])

    def on_step_failed(
        self, batch: ScheduledBatch, error: str = "a pipeline step failed"
    ) -> list[Sequence]:
        """Ends every sequence of a failed step with `error`; returns those the engine must
        report (sequences already finished or aborted are freed silently)."""
        self._step_returned(batch)
        failed: list[Sequence] = []
        for entry in batch.entries:
            seq = entry.seq
            if self._returned(entry):
                continue
            seq.error = error
            self._remove(seq)
            failed.append(seq)
        return failed

    def on_pipeline_lost(self, inflight: list[ScheduledBatch]) -> list[Sequence]:
        """A stage failed: the steps in `inflight` never return and every stage's KV cache is
        gone. Each unfinished sequence goes back to waiting as a preempted one does (no
        blocks, nothing computed), in arrival order, to be recomputed from its prompt and the
        tokens it already has once the pipeline serves again; returns them."""
        for batch in inflight:
            self._step_returned(batch)
            for entry in batch.entries:
                # Sequences that ended while in flight get their blocks freed here.
                self._returned(entry)
        assert not self._free_on_return, f"sequences still in flight: {self._free_on_return}"
        # Reported preemptions told the stages to drop sequences they no longer have.
        self._pending_preempted = []
        # Reversed: each goes to the front of the queue, so the oldest ends up first.
        for seq in reversed(tuple(self._running)):
            self._preempt(seq)
        return list(self._waiting)

    def replace_block_manager(self, block_manager: BlockManager) -> None:
        """The re-formed pipeline's pool (its blocks hold nothing, so no prefix-cache entry
        of the old pool may survive); only while no sequence holds blocks."""
        assert not self._running, "running sequences hold blocks of the old pool"
        self.block_manager = block_manager

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence (the engine saw a stop condition); frees its blocks now, or when
        its step returns if it is in flight."""
        if seq.is_finished:
            return
        self._remove(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancels a sequence; returns it, or None if it is unknown or already finished."""
        seq = self._by_id.get(seq_id)
        if seq is None:
            return None
        seq.aborted = True
        self._remove(seq)
        return seq

    # ---------------------------------------------------------------- internal

    def _step_returned(self, batch: ScheduledBatch) -> None:
        if self.num_lanes:
            assert self._lane_steps[batch.lane] > 0, f"lane {batch.lane} has no step in flight"
            self._lane_steps[batch.lane] -= 1

    def _returned(self, entry: ScheduledEntry) -> bool:
        """Takes `entry`'s step off its sequence; True when the sequence already ended (its
        blocks are freed once its last step in flight is back) and the result is ignored."""
        seq = entry.seq
        seq.num_inflight_steps -= 1
        seq.num_inflight_tokens -= entry.num_tokens
        if seq.seq_id not in self._free_on_return:
            return False
        if not seq.in_flight:
            self._free_on_return.discard(seq.seq_id)
            self.block_manager.free(seq)
        return True

    def _add_look_ahead(self, entries: list[ScheduledEntry], budget: int, lane: int | None) -> int:
        for seq in self._look_ahead_candidates(lane):
            if budget == 0 or len(entries) == self.config.max_num_seqs:
                break
            # A look-ahead step is an optimisation: it takes free blocks, never preempts.
            total = seq.num_scheduled_tokens + 1
            if not self.block_manager.can_append(seq, total):
                continue
            new_blocks = self.block_manager.append_slots(seq, total)
            entries.append(self._entry(seq, 1, new_blocks, is_new=False))
            budget -= 1
        return budget

    def _look_ahead_candidates(self, lane: int | None) -> list[Sequence]:
        """Sequences below their limit of steps in flight, whose steps in flight all sample,
        and that will surely need the token after them (not at max_new_tokens or the context
        end), from the oldest micro-batch (of `lane`, with lanes): with pipeline stages, each
        micro-batch's next step follows it alone instead of waiting for two."""
        if self.steps_per_seq < 2:
            return []
        ready = [
            s for s in self._running
            if 0 < s.num_inflight_steps < self.steps_per_seq
            and (lane is None or s.lane == lane)
            # Every step in flight samples: the oldest computes the last known token, each
            # later one the token sampled before it.
            and s.num_scheduled_tokens == s.num_tokens + s.num_inflight_steps - 1
            # After the steps in flight the sequence has that many more outputs and tokens.
            and s.num_output_tokens + s.num_inflight_steps < s.max_new_tokens
            and (self.max_context == 0 or s.num_tokens + s.num_inflight_steps < self.max_context)
        ]
        if not ready:
            return []
        oldest = min(s.last_batch_index for s in ready)
        return [s for s in ready if s.last_batch_index == oldest]

    def _remove(self, seq: Sequence) -> None:
        """Takes an unfinished sequence out of the queues and releases its blocks (now, or
        when its step returns)."""
        if seq.status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
        else:
            assert seq.status is SequenceStatus.RUNNING
            self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self._by_id[seq.seq_id]
        if seq.in_flight:
            self._free_on_return.add(seq.seq_id)
        elif seq.block_ids:
            self.block_manager.free(seq)

    def _make_room(self, seq: Sequence, total_tokens: int, preempted: list[Sequence]) -> bool:
        """Preempts until `seq` can cover `total_tokens`; False if `seq` itself was preempted."""
        while not self.block_manager.can_append(seq, total_tokens):
            victim = next((s for s in reversed(self._running) if not s.in_flight), None)
            # `seq` is running and not in flight, so there is always a victim.
            assert victim is not None
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        assert not seq.in_flight, "an in-flight sequence's blocks are being written"
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # The front, since it arrived before everything still waiting (FCFS).
        self._waiting.appendleft(seq)

    def _admit(self, entries: list[ScheduledEntry], budget: int, lane: int | None) -> int:
        bm = self.block_manager
        if not self._waiting:
            return budget
        room = self.config.max_num_seqs - len(entries)
        if lane is not None:
            # The lane fills up to its share of every sequence in the system.
            share = -(-(len(self._running) + len(self._waiting)) // self.num_lanes)
            room = min(room, share - sum(1 for s in self._running if s.lane == lane))
        while self._waiting and budget > 0 and room > 0:
            seq = self._waiting[0]
            if bm.num_blocks_for(seq.num_tokens) > bm.num_total_blocks:
                self._waiting.popleft()
                seq.status = SequenceStatus.FINISHED
                del self._by_id[seq.seq_id]
                self._unschedulable.append(seq)
                continue
            if not bm.allocate_prompt(seq):
                break
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.lane = lane or 0
            room -= 1
            bisect.insort(self._running, seq, key=lambda s: s.arrival)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            entries.append(self._entry(seq, num_tokens, list(seq.block_ids), is_new=True))
            budget -= num_tokens
        return budget

    def _entry(
        self, seq: Sequence, num_tokens: int, new_block_ids: list[int], is_new: bool
    ) -> ScheduledEntry:
        start = seq.num_scheduled_tokens
        # A look-ahead step starts past the known tokens: at the token being sampled.
        append_sampled = start >= seq.num_tokens
        entry = ScheduledEntry(
            seq=seq,
            start_position=start,
            num_tokens=num_tokens,
            sample=start + num_tokens >= seq.num_tokens,
            new_block_ids=new_block_ids,
            is_new=is_new,
            append_sampled=append_sampled,
        )
        # In flight from now on, which also keeps later preemptions in this call off it.
        seq.num_inflight_steps += 1
        seq.num_inflight_tokens += num_tokens
        seq.last_batch_index = self._num_batches
        return entry
