"""Rotary position embedding (NeoX / HF layout: the two halves of the head are rotated).

Inverse frequencies come from transformers' own rope initialisers for every scaled variant
(llama3, linear, yarn, dynamic), so scaling rules match the reference exactly; only the
plain 'default' rope is computed here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.config import ConfigError


def compute_inv_freq(
    head_dim: int, rope_parameters: dict[str, Any], hf_config: Any, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        base = float(rope_parameters.get("rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(
            f"rope type {rope_type!r} is not supported; supported: default, "
            + ", ".join(sorted(ROPE_INIT_FUNCTIONS))
        )
    if hf_config is None:
        raise ConfigError(
            f"rope type {rope_type!r} needs the transformers config (ModelConfig.hf_config); "
            "build the ModelConfig with ModelConfig.from_pretrained"
        )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device)
    # Dynamic NTK rescales only past max_position_embeddings, which we never serve.
    return inv_freq.float().to(device), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_parameters: dict[str, Any],
        hf_config: Any,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope_parameters = rope_parameters
        self.hf_config = hf_config
        self.dtype = dtype
        self.device = device
        inv_freq, self.attention_scaling = compute_inv_freq(head_dim, rope_parameters, hf_config, device)
        # Plain attributes, not buffers: nothing here belongs in a state dict.
        self.inv_freq = inv_freq
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        # See layers/kernel_backend.py.
        self.kernel_backend = "reference"

    def _build_cache(self) -> None:
        # Built on first use rather than at construction so that building a model stays
        # cheap; [max_position, head_dim // 2] each, in the model dtype like HF's cos/sin.
        positions = torch.arange(self.max_position, dtype=torch.int64, device=self.device).float()
        freqs = positions[:, None] * self.inv_freq[None, :]  # [max_position, head_dim // 2]
        self._cos = (freqs.cos() * self.attention_scaling).to(self.dtype)
        self._sin = (freqs.sin() * self.attention_scaling).to(self.dtype)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens]; query [num_tokens, heads * head_dim], key likewise."""
        if self._cos is None:
            self._build_cache()
        if self.kernel_backend == "triton":
            from stage_worker.layers.triton_fused import rotary_embedding

            return rotary_embedding(positions, query, key, self._cos, self._sin, self.head_dim)
        cos = self._cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
        sin = self._sin[positions].unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_dim)  # [num_tokens, heads, head_dim]
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        # Equal to HF's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), term by term.
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.view(num_tokens, -1)  # [num_tokens, heads * head_dim]
