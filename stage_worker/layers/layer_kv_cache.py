"""One attention layer's paged K/V cache, in the model dtype or in FP8 with per-row scales.

An FP8 cache (``--kv-cache-dtype fp8``) stores each (token, kv head) row of K and of V as
float8_e4m3fn values with one float32 scale: scale = amax(|row|) / 448, value =
round(row / scale). A scale per row needs no calibration data and follows whatever range a
model's keys and values have, token by token (a single per-tensor scale of 1.0 would flush
the small values of V rows to FP8's subnormals); it costs 4 bytes per 128-byte row at
head_dim 128. The kernels dequantize as they read: K's scale multiplies the Q.K^T column
(exact, it is one factor per key); V's scale multiplies the P column of its key before the
P.V dot (a float16 model scales the V tile instead, whose small scales float16 could not hold).
The scales are laid out [num_blocks, num_kv_heads, block_size] (viewed as [num_blocks,
block_size, num_kv_heads], the values' order), so a kernel reading one kv head's keys of a
block reads its scales from one contiguous run.

``write`` and ``gather`` are the plain-torch reference (CPU, and the oracle of the Triton
kernels: triton_attention.py's store, which rounds exactly as ``quantize_rows`` does, and
triton_paged_kv.py's tile reader).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
# The largest finite float8_e4m3fn: a row's largest magnitude maps onto it.
FP8_KV_MAX = 448.0
# Floor of a row's scale, so an all-zero row divides by something finite (and stays zero).
FP8_KV_MIN_SCALE = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (FP8 values [..., head_dim], float32 scales [...]), one scale per row."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / FP8_KV_MAX).clamp(min=FP8_KV_MIN_SCALE)
    values = (x / scale.unsqueeze(-1)).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)
    return values, scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_rows (up to its rounding), in `dtype`."""
    return (values.float() * scale.unsqueeze(-1)).to(dtype)


def new_scales(num_blocks: int, block_size: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Zeroed scales [num_blocks, block_size, num_kv_heads] float32, stored head-major within
    each block (see the module docstring)."""
    return torch.zeros(num_blocks, num_kv_heads, block_size, dtype=torch.float32, device=device).transpose(1, 2)


@dataclass(frozen=True)
class LayerKVCache:
    """key/value [num_blocks, block_size, num_kv_heads, head_dim]; for an FP8 cache also
    key_scale/value_scale [num_blocks, block_size, num_kv_heads] float32."""

    key: torch.Tensor
    value: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.key.shape == self.value.shape and self.key.dim() == 4, (self.key.shape, self.value.shape)
        assert (self.key_scale is None) == (self.value_scale is None)
        if self.quantized:
            assert self.key.dtype == self.value.dtype == FP8_KV_DTYPE, (self.key.dtype, self.value.dtype)
            assert self.key_scale.shape == self.value_scale.shape == self.key.shape[:3], (
                self.key_scale.shape, self.key.shape,
            )
            assert self.key_scale.dtype == self.value_scale.dtype == torch.float32
            assert self.key_scale.stride() == self.value_scale.stride()
        else:
            assert self.key.dtype == self.value.dtype, (self.key.dtype, self.value.dtype)

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def write(self, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores key/value [num_tokens, kv_heads, head_dim] at slot_mapping [num_tokens]
        (slot = block_id * block_size + offset: a row of the flattened cache)."""
        num_kv_heads, head_dim = self.key.shape[2:]
        if not self.quantized:
            self.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
            self.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)
            return
        for cache, scales, rows in ((self.key, self.key_scale, key), (self.value, self.value_scale, value)):
            values, scale = quantize_rows(rows)
            # index_copy_ has no FP8 kernel: copy the bytes.
            cache.view(torch.uint8).view(-1, num_kv_heads, head_dim).index_copy_(
                0, slot_mapping, values.view(torch.uint8)
            )
            # The scales are not one flat run of rows (new_scales): index block and offset.
            block_size = scales.shape[1]
            scales[slot_mapping // block_size, slot_mapping % block_size] = scale

    def gather(
        self, blocks: torch.Tensor, context_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first context_len rows of K and V held by `blocks` (a block-table prefix),
        each [context_len, kv_heads, head_dim] in `dtype`."""
        num_kv_heads, head_dim = self.key.shape[2:]
        # [num_blocks, block_size, kv_heads, head_dim] -> [num_blocks * block_size, kv_heads, head_dim]
        k = self.key[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
        v = self.value[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
        if not self.quantized:
            return k, v
        k_scale = self.key_scale[blocks].reshape(-1, num_kv_heads)[:context_len]  # [context_len, kv_heads]
        v_scale = self.value_scale[blocks].reshape(-1, num_kv_heads)[:context_len]
        return dequantize_rows(k, k_scale, dtype), dequantize_rows(v, v_scale, dtype)
