"""Paged KV cache of one stage rank: K and V blocks for each owned layer.

Block ids are global (the router's block manager hands them out and every stage allocates
the same number of blocks), so one block table addresses every stage's cache.

The cache is in the model dtype, or with ``--kv-cache-dtype fp8`` in float8_e4m3fn with a
float32 scale per (token, kv head) row (layers/layer_kv_cache.py): about half the bytes per
block, so about twice the blocks, and half the bytes a decode step reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared.config import ConfigError, ModelConfig
from stage_worker.layers.layer_kv_cache import FP8_KV_DTYPE, LayerKVCache, new_scales

# --kv-cache-dtype: "auto" stores K/V in the model dtype, "fp8" in float8_e4m3fn.
KV_CACHE_DTYPES = ("auto", "fp8")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype `--kv-cache-dtype name` gives a model computing in model_dtype."""
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return FP8_KV_DTYPE
    raise ConfigError(f"unknown KV cache dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")


def check_kv_cache_dtype(name: str, device: torch.device) -> None:
    """Refuses an FP8 cache on a GPU without FP8 conversions (before compute capability 8.9),
    where the kernels could not read it, at start-up rather than at the first step."""
    if name == "fp8" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError(
                f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                f"this one is {capability[0]}.{capability[1]}: use --kv-cache-dtype auto"
            )


def kv_block_bytes_per_layer(block_size: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype) -> int:
    """Bytes of K and V of one block in one layer: block_size rows per kv head, each head_dim
    values, plus a float32 scale per row in an FP8 cache."""
    row = head_dim * cache_dtype.itemsize + (4 if cache_dtype == FP8_KV_DTYPE else 0)
    return 2 * block_size * num_kv_heads * row


def bytes_per_block(
    config: ModelConfig, num_local_kv_heads: int, num_layers: int, block_size: int, cache_dtype: torch.dtype
) -> int:
    """Bytes one block id costs on a rank: K and V of block_size tokens in every owned layer."""
    return num_layers * kv_block_bytes_per_layer(block_size, num_local_kv_heads, config.head_dim, cache_dtype)


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
        quantized = dtype == FP8_KV_DTYPE

        # Zero-filled so that never-written slots hold finite values (they are masked, but
        # 0 * NaN would still poison a matmul).
        def layer() -> LayerKVCache:
            return LayerKVCache(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                new_scales(num_blocks, block_size, num_kv_heads, device) if quantized else None,
                new_scales(num_blocks, block_size, num_kv_heads, device) if quantized else None,
            )

        self.layers: dict[int, LayerKVCache] = {i: layer() for i in self.layer_indices}

    @classmethod
    def for_model(
        cls, model: nn.Module, num_blocks: int, block_size: int, cache_dtype: torch.dtype | None = None
    ) -> "KVCache":
        """A cache shaped for `model`'s owned layers and local kv heads on its device, in
        cache_dtype (None: the model's dtype)."""
        return cls(
            model.layer_indices,
            num_blocks,
            block_size,
            model.num_local_kv_heads,
            model.config.head_dim,
            cache_dtype or model.dtype,
            model.device,
        )

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for c in self.layers.values()
            for t in (c.key, c.value, c.key_scale, c.value_scale)
            if t is not None
        )

    def bind(self, model: nn.Module) -> None:
        """Attaches each layer's LayerKVCache to that layer's attention module."""
        layers = model.attention_layers()
        assert sorted(layers) == sorted(self.layer_indices), (
            f"cache layers {self.layer_indices} do not match model layers {sorted(layers)}"
        )
        for i, attn in layers.items():
            assert attn.num_kv_heads == self.num_kv_heads and attn.head_dim == self.head_dim
            attn.kv_cache = self.layers[i]

    @staticmethod
    def unbind(model: nn.Module) -> None:
        """Detaches every layer from its cache (so the cache's memory can be freed)."""
        for attn in model.attention_layers().values():
            attn.kv_cache = None
