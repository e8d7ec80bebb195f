"""Paged KV cache of one stage rank: K and V blocks for each owned layer.

Block ids are global (the router's block manager hands them out and every stage allocates
the same number of blocks), so one block table addresses every stage's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared.config import ModelConfig


def bytes_per_block(
    config: ModelConfig, num_local_kv_heads: int, num_layers: int, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one block id costs on a rank: K and V of block_size tokens in every owned layer."""
    return 2 * num_layers * block_size * num_local_kv_heads * config.head_dim * dtype.itemsize


def compute_slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end) of a sequence: block_table[pos // bs] * bs + pos % bs."""
    assert end <= len(block_table) * block_size, (
        f"positions up to {end} need {(end + block_size - 1) // block_size} blocks, "
        f"the block table has {len(block_table)}"
    )
    return [block_table[pos // block_size] * block_size + pos % block_size for pos in range(start, end)]


class KVCache:
    def __init__(
        self,
        layer_indices: Sequence[int],
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layer_indices = list(layer_indices)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled so that never-written slots hold finite values (they are masked, but
        # 0 * NaN would still poison a matmul).
        self.k_caches: dict[int, torch.Tensor] = {
            i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layer_indices
        }
        self.v_caches: dict[int, torch.Tensor] = {
            i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layer_indices
        }

    @classmethod
    def for_model(cls, model: nn.Module, num_blocks: int, block_size: int) -> "KVCache":
        """A cache shaped for `model`'s owned layers and local kv heads, in its dtype/device."""
        return cls(
            model.layer_indices,
            num_blocks,
            block_size,
            model.num_local_kv_heads,
            model.config.head_dim,
            model.dtype,
            model.device,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_caches.values(), *self.v_caches.values()))

    def bind(self, model: nn.Module) -> None:
        """Attaches each layer's (k, v) to that layer's attention module."""
        layers = model.attention_layers()
        assert sorted(layers) == sorted(self.layer_indices), (
            f"cache layers {self.layer_indices} do not match model layers {sorted(layers)}"
        )
        for i, attn in layers.items():
            assert attn.num_kv_heads == self.num_kv_heads and attn.head_dim == self.head_dim
            attn.kv_cache = (self.k_caches[i], self.v_caches[i])

    @staticmethod
    def unbind(model: nn.Module) -> None:
        """Detaches every layer from its cache (so the cache's memory can be freed)."""
        for attn in model.attention_layers().values():
            attn.kv_cache = None
