"""Per-step attention inputs, passed explicitly through the model forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes the tokens of one step, sequence by sequence, in batch order.

    Sequence i owns query rows [query_start_loc[i], query_start_loc[i+1]) of the flattened
    token batch; those tokens sit at positions [start_positions[i], context_lens[i]) of the
    sequence, and the tokens before start_positions[i] are already in the paged cache.
    """

    # [num_tokens] int64: cache slot (block_id * block_size + offset) each new token's K/V goes to.
    slot_mapping: torch.Tensor
    # Host lists, len num_seqs + 1 / num_seqs.
    query_start_loc: list[int]
    start_positions: list[int]
    # Tokens in the cache for the sequence once this step's tokens are written.
    context_lens: list[int]
    # Per sequence, the block ids covering its context_len tokens (int64, on the device).
    block_tables: list[torch.Tensor]
    block_size: int
    # False for the profiling forward: no cache, attention among the new tokens only.
    use_cache: bool = True
    # The same description as device tensors, for the Triton path (None on the reference
    # path): int32 [num_seqs + 1], int32 [num_seqs], int32 [num_seqs, max_blocks] with rows
    # padded past each sequence's blocks. Kernels read these, so a CUDA graph can replay
    # with new contents in the same buffers.
    query_start_loc_tensor: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None
    block_tables_tensor: torch.Tensor | None = None
    # Longest query of the step: sizes the Triton grid (1 for decode-only steps).
    max_query_len: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.start_positions)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @classmethod
    def for_prefill_without_cache(
        cls, query_lens: list[int], device: torch.device
    ) -> "AttentionMetadata":
        """Fresh prompts, nothing cached and nothing written: the profiling run."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            slot_mapping=torch.empty(0, dtype=torch.long, device=device),
            query_start_loc=starts,
            start_positions=[0] * len(query_lens),
            context_lens=list(query_lens),
            block_tables=[],
            block_size=1,
            use_cache=False,
        )
