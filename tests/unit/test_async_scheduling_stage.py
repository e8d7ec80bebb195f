"""The stages' side of asynchronous scheduling: `append_sampled` in the sequence table and
the first stage's gather of tokens it never saw on the host (protos/stage_worker.proto)."""

from __future__ import annotations

import pytest
import torch

from shared.proto import stage_worker_pb2 as pb
from shared.sampling_params import SamplingParams
from stage_worker.input_batch import build_input_batch
from stage_worker.sampled_tokens import PLACEHOLDER, SampledTokens
from stage_worker.sequence_state import SequenceTable, StepLimits, StepRejected

LIMITS = StepLimits(vocab_size=100, max_position=64, block_size=4, num_blocks=32)
PIPELINE = StepLimits(vocab_size=100, max_position=64, block_size=4, num_blocks=32, num_stages=2)


def _prefill(seq_id: int, prompt: list[int], blocks: list[int], step_id: int = 1, forward: bool = False) -> pb.StepRequest:
    step = pb.StepRequest(step_id=step_id, forward_sampled_tokens=forward)
    step.new_seqs.add(seq_id=seq_id, prompt_token_ids=prompt, sampling=SamplingParams().to_proto())
    step.seqs.add(seq_id=seq_id, start_position=0, num_tokens=len(prompt), new_block_ids=blocks, sample=True)
    return step


def _look_ahead(seq_id: int, position: int, step_id: int, blocks: list[int] = ()) -> pb.StepRequest:
    step = pb.StepRequest(step_id=step_id)
    step.seqs.add(seq_id=seq_id, start_position=position, num_tokens=1, new_block_ids=list(blocks),
                  sample=True, append_sampled=True)
    return step


def test_append_sampled_appends_a_placeholder_and_records_where_the_token_is() -> None:
    table = SequenceTable()
    (seq,) = table.apply(_prefill(7, [1, 2, 3], [5]), LIMITS)
    assert seq.pending_sample is not None and seq.pending_sample.row == 0
    tokens = SampledTokens(torch.tensor([42]))
    seq.pending_sample.tokens = tokens  # what the runner does after its sampler
    (same,) = table.apply(_look_ahead(7, 3, 2), LIMITS)
    assert same.output_token_ids == [PLACEHOLDER] and same.num_tokens == 4
    assert same.deferred[0].tokens is tokens and same.deferred[0].row == 0
    # The look-ahead step samples too: the next one may append again.
    assert same.pending_sample is not None


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("never_sampled", "no earlier step sampled"),
        ("both_fields", "both set"),
        ("not_forwarded", "did not set forward_sampled_tokens"),
        ("appended_twice", "no earlier step sampled"),
    ],
)
def test_inconsistent_append_sampled_is_rejected(setup: str, message: str) -> None:
    table = SequenceTable()
    limits = PIPELINE if setup == "not_forwarded" else LIMITS
    prefill = _prefill(7, [1, 2, 3], [5])
    if setup == "never_sampled":
        prefill.seqs[0].num_tokens = 2
        prefill.seqs[0].sample = False
    table.apply(prefill, limits)
    step = _look_ahead(7, 2 if setup == "never_sampled" else 3, 2)
    if setup == "both_fields":
        step.seqs[0].append_token_id = 9
    if setup == "appended_twice":
        first = _look_ahead(7, 3, 2)
        first.seqs[0].sample = False
        table.apply(first, limits)
        step = _look_ahead(7, 4, 3, blocks=[6])
    with pytest.raises(StepRejected, match=message):
        table.apply(step, limits)


def test_first_stage_gathers_deferred_tokens_on_the_device() -> None:
    """Two sequences whose last tokens came from two different steps' sampled ids (as the
    first stage of a pipeline receives them), batched with an ordinary prefill."""
    table = SequenceTable()
    (a,) = table.apply(_prefill(1, [1, 2, 3], [0]), LIMITS)
    a.pending_sample.tokens = SampledTokens(torch.tensor([11]))
    (b,) = table.apply(_prefill(2, [4, 5], [1], step_id=2), LIMITS)
    b.pending_sample.tokens = SampledTokens(torch.tensor([99, 22]))
    b.pending_sample.row = 1  # the second sampled row of its step
    step = pb.StepRequest(step_id=3)
    step.new_seqs.add(seq_id=3, prompt_token_ids=[6, 7, 8], sampling=SamplingParams().to_proto())
    step.seqs.add(seq_id=1, start_position=3, num_tokens=1, sample=True, append_sampled=True)
    step.seqs.add(seq_id=3, start_position=0, num_tokens=3, new_block_ids=[2], sample=True)
    step.seqs.add(seq_id=2, start_position=2, num_tokens=1, sample=True, append_sampled=True)
    seqs = table.apply(step, LIMITS)
    batch = build_input_batch(list(step.seqs), seqs, 4, torch.device("cpu"), True, device_metadata=True)
    assert batch.input_ids.tolist() == [11, 6, 7, 8, 22]
    assert batch.positions.tolist() == [3, 0, 1, 2, 2]
    assert batch.attn_metadata.slot_mapping.tolist() == [3, 8, 9, 10, 6]
    assert batch.attn_metadata.block_tables_tensor.tolist() == [[0], [2], [1]]
    assert batch.logits_indices.tolist() == [0, 3, 4]
    # Received ids (no host copy) are used once: the stage forgets where they were.
    assert a.deferred == {} and b.deferred == {}
    assert a.output_token_ids == [PLACEHOLDER]


def test_a_placeholder_with_no_source_never_reaches_the_embedding() -> None:
    table = SequenceTable()
    table.apply(_prefill(1, [1, 2, 3], [0]), LIMITS)  # no sampled ids recorded, as on a middle stage
    step = _look_ahead(1, 3, 2)
    (seq,) = table.apply(step, LIMITS)
    assert seq.output_token_ids == [PLACEHOLDER] and seq.deferred == {}
    with pytest.raises(AssertionError, match="unknown token with no source"):
        build_input_batch(list(step.seqs), [seq], 4, torch.device("cpu"), True)
