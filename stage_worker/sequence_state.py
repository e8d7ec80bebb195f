"""What a stage remembers of each sequence between steps, and how a step's deltas apply.

Every stage receives the same steps and applies them the same way, so their sequence
tables stay identical without ever being exchanged. A step is validated as a whole before
anything else changes: a rejected step applies only its reset and drops, on every stage alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.proto import stage_worker_pb2 as pb
from shared.sampling_params import stage_params_hold
from shared.token_ids import slice_prompt_and_output
from stage_worker.sampled_tokens import PLACEHOLDER, SampledToken


class StepRejected(Exception):
    """The step is inconsistent (bad block id, unknown sequence...); nothing was applied."""


@dataclass
class StageSequence:
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: pb.StageSamplingParams
    block_table: list[int] = field(default_factory=list)
    # Sampled by a step this stage applied, not appended yet: where the token is (the
    # runner fills in `tokens` after the step's sampler or receive) and whether the last
    # stage forwarded it to the first (see append_sampled in the proto).
    pending_sample: SampledToken | None = None
    pending_sample_forwarded: bool = False
    # Output indices holding PLACEHOLDER, and where their tokens are.
    deferred: dict[int, SampledToken] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        return slice_prompt_and_output(self.prompt_token_ids, self.output_token_ids, start, end)


@dataclass(frozen=True)
class StepLimits:
    vocab_size: int
    max_position: int
    block_size: int
    # 0 until InitCache.
    num_blocks: int
    num_stages: int = 1


class SequenceTable:
    def __init__(self) -> None:
        self.seqs: dict[int, StageSequence] = {}

    def apply(self, step: pb.StepRequest, limits: StepLimits) -> list[StageSequence]:
        """Validates the whole step, then applies its deltas; returns the batch in order.

        A rejected step still applies its reset and drops (always valid: unknown ids are
        ignored), since the router counts them as delivered; nothing else of it applies.
        """
        try:
            self._validate(step, limits)
        finally:
            if step.reset:
                self.seqs.clear()
            for seq_id in step.drop_seq_ids:
                self.seqs.pop(seq_id, None)
        for new in step.new_seqs:
            self.seqs[new.seq_id] = StageSequence(
                seq_id=new.seq_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling=new.sampling,
            )
        batch = []
        num_sampled = 0
        for sched in step.seqs:
            seq = self.seqs[sched.seq_id]
            if sched.HasField("append_token_id"):
                seq.output_token_ids.append(sched.append_token_id)
                seq.pending_sample = None
            elif sched.append_sampled:
                assert seq.pending_sample is not None
                seq.output_token_ids.append(PLACEHOLDER)
                if seq.pending_sample.tokens is not None:  # middle stages never need the value
                    seq.deferred[len(seq.output_token_ids) - 1] = seq.pending_sample
                seq.pending_sample = None
            seq.block_table.extend(sched.new_block_ids)
            if sched.sample:
                # Its place among the step's sampled rows: the sampler's output row.
                seq.pending_sample = SampledToken(None, num_sampled)
                num_sampled += 1
                seq.pending_sample_forwarded = step.forward_sampled_tokens
            batch.append(seq)
        return batch

    def _validate(self, step: pb.StepRequest, limits: StepLimits) -> None:
        if limits.num_blocks == 0:
            raise StepRejected("the KV cache is not initialised (InitCache first)")
        if not step.seqs:
            raise StepRejected("the step schedules no sequence")
        live: set[int] = set() if step.reset else set(self.seqs)
        live.difference_update(step.drop_seq_ids)
        # Token and block counts each scheduled sequence will have, as if applied.
        new_counts: dict[int, tuple[int, int]] = {}
        for new in step.new_seqs:
            if new.seq_id in live or new.seq_id in new_counts:
                raise StepRejected(f"sequence {new.seq_id} is added twice")
            ids = list(new.prompt_token_ids) + list(new.output_token_ids)
            if not new.prompt_token_ids:
                raise StepRejected(f"sequence {new.seq_id} has an empty prompt")
            bad = [t for t in ids if t >= limits.vocab_size]
            if bad:
                raise StepRejected(
                    f"sequence {new.seq_id}: token id {bad[0]} outside the vocabulary "
                    f"[0, {limits.vocab_size})"
                )
            # The router resolved and checked these (shared/sampling_params.py): a stage trusts it.
            assert stage_params_hold(new.sampling, limits.vocab_size), (
                f"sequence {new.seq_id}: sampling parameters outside the rules: {new.sampling}"
            )
            new_counts[new.seq_id] = (len(ids), 0)
        seen: set[int] = set()
        for sched in step.seqs:
            sid = sched.seq_id
            if sid in seen:
                raise StepRejected(f"sequence {sid} appears twice in one step")
            seen.add(sid)
            if sid in new_counts:
                num_tokens, num_blocks = new_counts[sid]
            elif sid in live:
                seq = self.seqs[sid]
                num_tokens, num_blocks = seq.num_tokens, len(seq.block_table)
            else:
                raise StepRejected(f"sequence {sid} is not known to this stage")
            if sched.append_sampled:
                if sched.HasField("append_token_id"):
                    raise StepRejected(f"sequence {sid}: append_sampled and append_token_id both set")
                seq_state = self.seqs.get(sid) if sid in live else None
                if seq_state is None or seq_state.pending_sample is None:
                    raise StepRejected(
                        f"sequence {sid}: append_sampled, but no earlier step sampled a token for it "
                        "that is not appended yet"
                    )
                if limits.num_stages > 1 and not seq_state.pending_sample_forwarded:
                    raise StepRejected(
                        f"sequence {sid}: append_sampled, but the step that sampled it did not set "
                        "forward_sampled_tokens, so the first stage never received the token"
                    )
                num_tokens += 1
            elif sched.HasField("append_token_id"):
                if sched.append_token_id >= limits.vocab_size:
                    raise StepRejected(
                        f"sequence {sid}: appended token {sched.append_token_id} outside the "
                        f"vocabulary [0, {limits.vocab_size})"
                    )
                num_tokens += 1
            for block in sched.new_block_ids:
                if block >= limits.num_blocks:
                    raise StepRejected(
                        f"sequence {sid}: block id {block} outside the pool [0, {limits.num_blocks})"
                    )
            num_blocks += len(sched.new_block_ids)
            end = sched.start_position + sched.num_tokens
            if sched.num_tokens == 0 or end > num_tokens:
                raise StepRejected(
                    f"sequence {sid}: tokens [{sched.start_position}, {end}) but it has {num_tokens}"
                )
            if end > limits.max_position:
                raise StepRejected(
                    f"sequence {sid}: position {end - 1} beyond the model's {limits.max_position}"
                )
            if num_blocks * limits.block_size < end:
                raise StepRejected(
                    f"sequence {sid}: {num_blocks} blocks of {limits.block_size} cannot hold {end} tokens"
                )
            if sched.sample and end != num_tokens:
                raise StepRejected(f"sequence {sid}: sample set on a chunk that is not its last")
