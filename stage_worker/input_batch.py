"""Turns one step's batch of sequences into the tensors a forward pass needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from shared.proto import stage_worker_pb2 as pb
from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.host_upload import upload_packed
from stage_worker.sampled_tokens import PLACEHOLDER, SampledTokens
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
    # perf_counter when the host-side lists were done and the upload began (for the stage's
    # prepare.upload phase: Python work and device copies are told apart).
    upload_started: float = 0.0

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
    """`device_metadata` adds the tensor form of the attention metadata the Triton kernels read.

    Everything goes to the device in one copy from pinned memory, which only queues it: the
    stage builds step n+1 while the GPU still runs step n (a copy from pageable memory would
    wait for the stream). Tokens the stage appended before knowing them (asynchronous
    scheduling) are gathered on the device from where the pipeline sampled them.
    """
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    start_positions: list[int] = []
    context_lens: list[int] = []
    logits_indices: list[int] = []
    sampled: list[StageSequence] = []
    # Per source of deferred tokens: (the tokens, rows of input_ids, rows of the source).
    gathers: dict[int, tuple[SampledTokens, list[int], list[int]]] = {}
    # Per sequence, its block table and how many of its entries the step's context covers
    # (the tables are copied once, into the padded array below).
    tables: list[tuple[list[int], int]] = []
    for sched, seq in zip(scheduled, seqs):
        start, num = sched.start_position, sched.num_tokens
        end = start + num
        table = seq.block_table
        if need_token_ids:
            if num == 1:
                # Decode rows, most of a large step: one token, read without slicing.
                prompt = seq.prompt_token_ids
                chunk = [prompt[start] if start < len(prompt) else seq.output_token_ids[start - len(prompt)]]
            else:
                chunk = seq.token_slice(start, end)
            if (seq.deferred or end > len(seq.prompt_token_ids)) and PLACEHOLDER in chunk:
                _take_deferred(seq, start, chunk, len(token_ids), gathers)
            token_ids.extend(chunk)
        # A token at position p lives in block table[p // block_size], at offset p % block_size.
        if num == 1:
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + num)
        start_positions.append(start)
        context_lens.append(end)
        tables.append((table, (end + block_size - 1) // block_size))
        if sched.sample:
            logits_indices.append(query_start_loc[-1] - 1)
            sampled.append(seq)

    longs = [positions, slots, logits_indices]
    if need_token_ids:
        longs.append(token_ids)
    for _, dst, src in gathers.values():
        longs += [dst, src]
    ints: list[np.ndarray] = []
    width = max((n for _, n in tables), default=0)
    if device_metadata:
        # [num_seqs, width]: each row its blocks, then zeros the kernel never reads; built as
        # one flat list (one conversion, not one per row).
        flat: list[int] = []
        for table, n in tables:
            flat += table[:n]
            if n < width:
                flat += [0] * (width - n)
        padded = np.array(flat, dtype=np.int32).reshape(len(tables), width)
        ints = [np.asarray(query_start_loc, dtype=np.int32), np.asarray(context_lens, dtype=np.int32), padded]
    upload_started = time.perf_counter()
    uploaded = upload_packed([np.asarray(v, dtype=np.int64) for v in longs] + ints, device)
    long_tensors, int_tensors = uploaded[: len(longs)], uploaded[len(longs) :]
    positions_t, slots_t, logits_t = long_tensors[:3]
    input_ids = None
    if need_token_ids:
        input_ids = long_tensors[3]
        pairs = iter(long_tensors[4:])
        for source, _, _ in gathers.values():
            dst, src = next(pairs), next(pairs)
            input_ids.index_copy_(0, dst, source.device_ready().index_select(0, src))

    metadata = AttentionMetadata(
        slot_mapping=slots_t,
        query_start_loc=query_start_loc,
        start_positions=start_positions,
        context_lens=context_lens,
        block_tables=[] if device_metadata else [torch.tensor(t[:n], dtype=torch.long).to(device) for t, n in tables],
        block_size=block_size,
        max_query_len=max((e - s for s, e in zip(query_start_loc, query_start_loc[1:])), default=0),
    )
    if device_metadata:
        metadata.query_start_loc_tensor = int_tensors[0]
        metadata.context_lens_tensor = int_tensors[1]
        metadata.block_tables_tensor = int_tensors[2].view(len(tables), width)
    return InputBatch(
        input_ids=input_ids,
        positions=positions_t,
        attn_metadata=metadata,
        logits_indices=logits_t,
        sampled_seqs=sampled,
        upload_started=upload_started,
    )


def _take_deferred(
    seq: StageSequence,
    start: int,
    chunk: list[int],
    first_row: int,
    gathers: dict[int, tuple[SampledTokens, list[int], list[int]]],
) -> None:
    """Replaces the placeholders of `chunk` (tokens from position `start`) by 0 and records
    where on the device their real ids are, to be gathered into input_ids."""
    num_prompt = len(seq.prompt_token_ids)
    for offset, token in enumerate(chunk):
        if token != PLACEHOLDER:
            continue
        where = seq.deferred.get(start + offset - num_prompt)
        assert where is not None and where.tokens is not None, (
            f"sequence {seq.seq_id}: position {start + offset} is an unknown token with no source"
        )
        _, dst, src = gathers.setdefault(id(where.tokens), (where.tokens, [], []))
        dst.append(first_row + offset)
        src.append(where.row)
        chunk[offset] = 0
        if where.tokens.host_copy is None:
            # Received ids (first stage of a pipeline): this gather is their only use.
            del seq.deferred[start + offset - num_prompt]
