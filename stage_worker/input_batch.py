"""Turns one step's batch of sequences into the tensors a forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.proto import stage_worker_pb2 as pb
from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.sequence_state import StageSequence


@dataclass
class InputBatch:
    # [num_tokens] int64; None on stages after the first.
    input_ids: torch.Tensor | None
    # [num_tokens] int64
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Rows of the flattened batch whose logits are sampled (the last token of each sampled chunk).
    logits_indices: torch.Tensor
    sampled_seqs: list[StageSequence]

    @property
    def num_tokens(self) -> int:
        return self.attn_metadata.num_tokens


def build_input_batch(
    scheduled: list[pb.ScheduledSequence],
    seqs: list[StageSequence],
    block_size: int,
    device: torch.device,
    need_token_ids: bool,
    device_metadata: bool = False,
) -> InputBatch:
    """`device_metadata` adds the tensor form of the attention metadata the Triton kernels read."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    start_positions: list[int] = []
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    sampled: list[StageSequence] = []
    for sched, seq in zip(scheduled, seqs):
        start, end = sched.start_position, sched.start_position + sched.num_tokens
        if need_token_ids:
            token_ids.extend(seq.token_slice(start, end))
        positions.extend(range(start, end))
        table = seq.block_table
        # A token at position p lives in block table[p // block_size], at offset p % block_size.
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + (end - start))
        start_positions.append(start)
        context_lens.append(end)
        block_tables.append(table[: (end + block_size - 1) // block_size])
        if sched.sample:
            logits_indices.append(query_start_loc[-1] - 1)
            sampled.append(seq)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=tensor(slots),
        query_start_loc=query_start_loc,
        start_positions=start_positions,
        context_lens=context_lens,
        block_tables=[] if device_metadata else [tensor(t) for t in block_tables],
        block_size=block_size,
        max_query_len=max((e - s for s, e in zip(query_start_loc, query_start_loc[1:])), default=0),
    )
    if device_metadata:
        width = max((len(t) for t in block_tables), default=0)
        # [num_seqs, width]: each row its blocks, then zeros the kernel never reads.
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        metadata.query_start_loc_tensor = _int32(query_start_loc, device)
        metadata.context_lens_tensor = _int32(context_lens, device)
        metadata.block_tables_tensor = _int32(padded, device).view(len(block_tables), width)
    return InputBatch(
        input_ids=tensor(token_ids) if need_token_ids else None,
        positions=tensor(positions),
        attn_metadata=metadata,
        logits_indices=tensor(logits_indices),
        sampled_seqs=sampled,
    )


def _int32(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)
