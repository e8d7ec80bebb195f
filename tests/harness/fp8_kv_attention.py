"""transformers' attention with K and V rounded as an FP8 KV cache stores them: the reference
for `--kv-cache-dtype fp8`, written here apart from the serving code.

Each (token, kv head) row of K (after rotary) and of V is scaled so its largest magnitude is
448, cast to float8_e4m3fn and back, and scaled back; then transformers' own SDPA attention
runs on the rounded rows. Registered under FP8_KV_ATTENTION for `attn_implementation`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FP8_KV_ATTENTION = "stageserve_test_fp8_kv_rows"


def _round_rows(x: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, seq, head_dim] with each head_dim row rounded through e4m3 at its own scale."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-12)
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, _round_rows(key), _round_rows(value), attention_mask, **kwargs)


AttentionInterface.register(FP8_KV_ATTENTION, _fp8_kv_attention)
