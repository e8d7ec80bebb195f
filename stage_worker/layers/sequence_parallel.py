"""Megatron-style sequence parallelism: between the TP matmuls the residual stream (and
the norms) live sharded by tokens.

Where plain TP ends a block with an all-reduce followed by a norm that every rank repeats on
every token, sequence parallelism reduce-scatters over the token dimension, runs the
residual add and the norm on 1/tp of the tokens, and all-gathers right before the next
column-parallel matmul. The bytes moved are the same (an all-reduce is a reduce-scatter plus
an all-gather); what shrinks is the norm work and the activation memory of the residual
stream, and a stage hop carries each rank's shard as it is.

Token counts that do not divide by tp are padded with zero rows up to a multiple of tp
(a decode batch of 3 at tp=2 runs as 4 rows): the padding rows stay zero through the adds
and RMSNorm (0 * rsqrt(eps) = 0) and are dropped whenever the full token set is gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_worker.distributed import get_tp_group


def padded_num_tokens(num_tokens: int, tp_size: int) -> int:
    return -(-num_tokens // tp_size) * tp_size


def shard_rows(num_tokens: int, tp_size: int) -> int:
    """Rows of the token-sharded stream each rank holds."""
    return padded_num_tokens(num_tokens, tp_size) // tp_size


def gather_tokens(shard: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[rows, hidden] on each rank -> [num_tokens, hidden] on every rank (padding dropped)."""
    return get_tp_group().all_gather(shard, dim=0)[:num_tokens]


def reduce_scatter_tokens(partial: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-rank partial sums [num_tokens, hidden] -> this rank's summed shard [rows, hidden]."""
    tp = get_tp_group()
    padded = padded_num_tokens(num_tokens, tp.size)
    if padded != num_tokens:
        partial = F.pad(partial, (0, 0, 0, padded - num_tokens))
    return tp.reduce_scatter(partial)
