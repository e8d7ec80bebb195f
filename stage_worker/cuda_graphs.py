"""CUDA graphs for decode steps: one graph per bucketed batch size.

A decode step of a large model at small batch is dominated by kernel launches, not by the
GPU: a 32-layer stage launches hundreds of kernels per token. Each graph replays a whole
stage forward (embedding or received hidden states -> layers -> final norm) with one launch.
A step of n sequences runs the smallest captured size >= n; the padding rows have slot -1
(their K/V is not written) and context length 0 (their attention output is zero), so they
change nothing a real row sees.

Inputs live in static buffers that every graph reads; a step copies its tensors into them
before the replay. Only decode steps (one new token per sequence) use graphs: prefill
shapes vary too much, and a prefill's matrix products are long enough that launches do not
matter. The hop and the sampler stay outside the graphs.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.input_batch import InputBatch

logger = logging.getLogger(__name__)

# Dense where batches are small (each size is one more graph to capture and hold), sparser
# above: a step of n sequences pays for the rows up to the next size.
BUCKET_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                320, 384, 448, 512)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The bucket sizes up to max_num_seqs, plus max_num_seqs itself."""
    sizes = [s for s in BUCKET_SIZES if s < max_num_seqs]
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        hidden_size: int,
        takes_input_ids: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        assert device.type == "cuda", "CUDA graphs need a CUDA device"
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_num_seqs = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.takes_input_ids = takes_input_ids
        n = self.max_num_seqs
        # Zeros are valid values for every input (token 0, position 0, slot -1 below), so
        # rows past a step's batch are always safe to read.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.hidden_in = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        # Decode: sequence i's one query is row i, for every batch.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=list(range(size + 1)),
            start_positions=[0] * size,
            context_lens=[1] * size,
            block_tables=[],
            block_size=self.block_size,
            query_start_loc_tensor=self.query_start_loc[: size + 1],
            context_lens_tensor=self.context_lens[:size],
            block_tables_tensor=self.block_tables[:size],
            max_query_len=1,
        )

    def _forward(self, size: int) -> torch.Tensor:
        input_ids = self.input_ids[:size] if self.takes_input_ids else None
        hidden = None if self.takes_input_ids else self.hidden_in[:size]
        return self.model(input_ids, self.positions[:size], hidden, self._metadata(size))

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures every size, largest first (the smaller ones reuse its memory pool);
        returns the seconds it took. Every rank of a TP group must call this together:
        the graphs hold the group's collectives."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            # The eager run first: lazy state (rotary tables, Triton's compiled kernels, NCCL
            # communicators) must exist before capture.
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        logger.info("captured %d decode graphs (batch %s) in %.1f s", len(self.sizes), self.sizes, seconds)
        return seconds

    def covers(self, batch: InputBatch) -> bool:
        md = batch.attn_metadata
        return (
            bool(self.graphs)
            and md.max_query_len == 1
            and md.num_tokens == md.num_seqs
            and 0 < md.num_seqs <= self.max_num_seqs
            and md.block_tables_tensor is not None
            and md.block_tables_tensor.shape[1] <= self.max_blocks_per_seq
        )

    def run(self, batch: InputBatch, hidden_in: torch.Tensor | None) -> torch.Tensor:
        """The stage forward of a decode batch `covers` accepted: [num_seqs, hidden].

        The result is a view of the graph's output buffer, overwritten by the next replay.
        """
        md = batch.attn_metadata
        n = md.num_seqs
        size = next(s for s in self.sizes if s >= n)
        if self.takes_input_ids:
            assert batch.input_ids is not None
            self.input_ids[:n].copy_(batch.input_ids)
        else:
            assert hidden_in is not None and hidden_in.shape[0] == n
            self.hidden_in[:n].copy_(hidden_in)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.context_lens[:n].copy_(md.context_lens_tensor)
        width = md.block_tables_tensor.shape[1]
        self.block_tables[:n, :width].copy_(md.block_tables_tensor)
        if size > n:
            # Rows n..size belong to no sequence: write nothing, attend to nothing.
            self.slot_mapping[n:size].fill_(-1)
            self.context_lens[n:size].fill_(0)
        self.graphs[size].replay()
        return self.outputs[size][:n]
