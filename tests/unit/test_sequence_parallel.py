"""Sequence-parallel collectives on gloo (reduce-scatter is emulated there) and the token
sharding helpers, in real spawned processes. End-to-end parity with transformers under
--sequence-parallel runs in tests/system/test_e2e.py (the `-sp` systems)."""

from __future__ import annotations

import torch

from tests.harness.tp import run_tp


def _reduce_scatter_and_gather(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from stage_worker.distributed import get_tp_group
    from stage_worker.layers.sequence_parallel import gather_tokens, reduce_scatter_tokens

    rank = get_tp_group().rank
    # Each rank's partial sums: rank r contributes (r + 1) * base.
    base = torch.arange(num_tokens * 3, dtype=torch.float32).reshape(num_tokens, 3)
    shard = reduce_scatter_tokens(base * (rank + 1), num_tokens)
    return shard, gather_tokens(shard, num_tokens)


def test_reduce_scatter_then_gather_round_trips_odd_token_counts() -> None:
    for num_tokens in (3, 8):
        results = run_tp(2, _reduce_scatter_and_gather, num_tokens)
        base = torch.arange(num_tokens * 3, dtype=torch.float32).reshape(num_tokens, 3)
        total = base * 3  # 1x + 2x
        rows = -(-num_tokens // 2)
        padded = torch.nn.functional.pad(total, (0, 0, 0, 2 * rows - num_tokens))
        for rank, (shard, full) in enumerate(results):
            assert torch.equal(shard, padded[rank * rows : (rank + 1) * rows])
            assert torch.equal(full, total)
