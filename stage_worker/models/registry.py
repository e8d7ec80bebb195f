"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ConfigError, ModelConfig, StageLayout
from stage_worker.models.llama import LlamaForCausalLM
from stage_worker.models.mixtral import MixtralForCausalLM
from stage_worker.models.qwen3_moe import Qwen3MoeForCausalLM

# Mistral, Qwen2 and Qwen3 share Llama's structure; their differences (qkv bias, tied
# embeddings, rope, Qwen3's q/k norm) come from ModelConfig.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def build_model(
    config: ModelConfig,
    layout: StageLayout,
    dtype: torch.dtype,
    device: torch.device,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Builds the stage's part of the model directly on `device` (weights not loaded yet)."""
    try:
        cls = MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ConfigError(
            f"architecture {config.architecture!r} is not supported; supported: "
            + ", ".join(sorted(MODEL_REGISTRY))
        ) from None
    return cls(config, layout, dtype, device, sequence_parallel=sequence_parallel)
