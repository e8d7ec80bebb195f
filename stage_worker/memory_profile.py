"""The steps a stage runs before sizing its KV cache, to measure their peak activation memory.

The KV budget is what is left of the memory target after the weights and the peak of the
steps the stage will actually serve. So the profile runs the path that serves: on the
Triton backend the paged kernels of a real step, whose prefill attention never builds a
score matrix, with logits only for the rows that sample; plus, where decode CUDA graphs
will be captured, a decode step of the largest captured batch (its intermediates stay
allocated in the graphs' pool for the stage's lifetime, beside the eager steps' peak).
The reference backend's per-sequence attention builds a [heads, q, k] score matrix, so
there the worst case is one prompt as long as the step budget (see model_runner).

These steps read and write a one-block scratch cache: every block-table entry is block 0,
so their K/V writes land on top of each other. Their outputs are garbage and unused; what
matters is that every kernel and buffer of a real step of that shape runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stage_worker.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class ProfileStep:
    """Shape of one profiled step: the query length of each sequence (every sequence samples
    one row) and the width of the block tables the kernels are given."""

    query_lens: tuple[int, ...]
    block_table_width: int

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def heaviest_step(max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> ProfileStep:
    """The largest step the scheduler can build: the whole token budget, spread over as many
    sequences as it may run (one prefill chunk, the rest one decode token each), every one
    sampling. The most tokens set the matmuls' intermediates, the most rows the logits."""
    num_tokens = max(1, max_num_batched_tokens)
    num_seqs = max(1, min(max_num_seqs, num_tokens))
    prefill = num_tokens - (num_seqs - 1)
    return ProfileStep((prefill,) + (1,) * (num_seqs - 1), -(-prefill // block_size))


def largest_decode_step(num_seqs: int, max_blocks_per_seq: int) -> ProfileStep:
    """A decode step as the largest CUDA graph captures it: block tables of the graphs'
    width, which sets the split-KV kernels' scratch."""
    return ProfileStep((1,) * max(1, num_seqs), max_blocks_per_seq)


def scratch_metadata(step: ProfileStep, block_size: int, device: torch.device) -> AttentionMetadata:
    """Device metadata for `step` over a one-block scratch cache (block 0 everywhere).
    Each sequence's query covers positions [0, query_len), so its context is its query."""
    query_start_loc = [0]
    for n in step.query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    lens = list(step.query_lens)
    # Positions 0.. of each sequence, each at offset pos % block_size of block 0.
    slots = torch.cat([torch.arange(n, device=device) % block_size for n in lens])
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=query_start_loc,
        start_positions=[0] * len(lens),
        context_lens=lens,
        block_tables=[],
        block_size=block_size,
        query_start_loc_tensor=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        context_lens_tensor=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables_tensor=torch.zeros(len(lens), step.block_table_width, dtype=torch.int32, device=device),
        max_query_len=max(lens),
    )


def positions_of(step: ProfileStep, max_position: int, device: torch.device) -> torch.Tensor:
    """[num_tokens] int64: each sequence's positions 0..query_len-1."""
    return torch.cat([torch.arange(n, device=device) for n in step.query_lens]) % max_position


def logits_rows(step: ProfileStep, device: torch.device) -> torch.Tensor:
    """[num_seqs] int64: the last token row of each sequence (the rows that sample)."""
    ends = torch.tensor(step.query_lens, device=device).cumsum(0)
    return ends - 1
