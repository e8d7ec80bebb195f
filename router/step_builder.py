"""Encodes scheduled micro-batches as StepRequests carrying deltas only.

The stages keep each sequence's tokens and block table between steps; this object
remembers what they already know, so a step sends a sequence's prompt once, each sampled
token once (as `append_token_id`) and each block id once.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.scheduler import ScheduledBatch
from router.sequence import Sequence
from shared.proto import stage_worker_pb2 as pb


@dataclass
class _StageView:
    tokens_sent: int
    blocks_sent: int


class StepBuilder:
    def __init__(self, forward_sampled_tokens: bool = False) -> None:
        # Every step asks the last stage to send its sampled tokens to the first stage over
        # NCCL (pipelines with asynchronous scheduling: stage 0 needs them as the next input).
        self.forward_sampled_tokens = forward_sampled_tokens
        self._known: dict[int, _StageView] = {}
        self._pending_drops: list[int] = []
        self._next_step_id = 1
        self._reset_next = True

    def forget(self, seq_id: int) -> None:
        """The sequence ended or was preempted: the next step tells the stages to drop it."""
        if self._known.pop(seq_id, None) is not None:
            self._pending_drops.append(seq_id)

    def restart_stream(self) -> None:
        """A new Execute stream starts from a clean slate on every stage."""
        self._known.clear()
        self._pending_drops.clear()
        self._reset_next = True

    def build(self, batch: ScheduledBatch, sampling: dict[int, pb.StageSamplingParams]) -> pb.StepRequest:
        for seq in batch.preempted:
            self.forget(seq.seq_id)
        step = pb.StepRequest(
            step_id=self._next_step_id,
            reset=self._reset_next,
            forward_sampled_tokens=self.forward_sampled_tokens,
        )
        self._next_step_id += 1
        self._reset_next = False
        step.drop_seq_ids.extend(self._pending_drops)
        self._pending_drops.clear()
        for entry in batch.entries:
            seq = entry.seq
            view = self._known.get(seq.seq_id)
            if view is not None and entry.is_new:
                # Re-admitted without passing through `forget` (cannot happen with the
                # scheduler's preemption reporting, but a stale view must never leak).
                step.drop_seq_ids.append(seq.seq_id)
                view = None
            append_token: int | None = None
            if view is None:
                step.new_seqs.add(
                    seq_id=seq.seq_id,
                    prompt_token_ids=seq.prompt_token_ids,
                    output_token_ids=seq.output_token_ids,
                    sampling=sampling[seq.seq_id],
                )
                view = _StageView(tokens_sent=seq.num_tokens, blocks_sent=0)
                self._known[seq.seq_id] = view
            elif entry.append_sampled:
                # The stages append the token their previous step samples; the router has
                # not seen it yet, so it counts it as sent.
                assert view.tokens_sent == entry.start_position, f"sequence {seq.seq_id}: look-ahead on stale tokens"
                view.tokens_sent += 1
            else:
                unsent = seq.num_tokens - view.tokens_sent
                # Only the token sampled by the sequence's previous step can be new to them.
                assert unsent in (0, 1), f"sequence {seq.seq_id}: {unsent} tokens unknown to stages"
                if unsent == 1:
                    append_token = seq.output_token_ids[-1]
                view.tokens_sent = seq.num_tokens
            sched = step.seqs.add(
                seq_id=seq.seq_id,
                start_position=entry.start_position,
                num_tokens=entry.num_tokens,
                new_block_ids=_unsent_blocks(seq, view),
                sample=entry.sample,
                append_sampled=entry.append_sampled,
            )
            if append_token is not None:
                sched.append_token_id = append_token
        return step


def _unsent_blocks(seq: Sequence, view: _StageView) -> list[int]:
    blocks = seq.block_ids[view.blocks_sent :]
    view.blocks_sent = len(seq.block_ids)
    return blocks
