"""The config keys of Qwen3, Qwen3-MoE and Mixtral beyond Llama's: what the serving code
reads, and what it refuses because it does not implement it.

transformers 5 reads config.json into its config classes (Qwen3MoeConfig keeps `num_experts`
as `num_local_experts`, Mixtral's `block_sparse_moe` becomes `mlp` in its modules); the
decisions per key, for these architectures:

* read: `head_dim` (any value, not only hidden / heads), `num_experts` / `num_local_experts`,
  `num_experts_per_tok`, `moe_intermediate_size` (Mixtral: `intermediate_size` is the
  expert's), `norm_topk_prob` (Mixtral always renormalises), `mlp_only_layers`,
  `decoder_sparse_step`;
* accepted and unused, because they only matter in training: `output_router_logits`,
  `router_aux_loss_coef`, `router_jitter_noise` (transformers applies the noise only with
  `model.train()`), `attention_dropout`, `initializer_range`;
* refused (ConfigError naming the key): a sliding window on Qwen3 / Qwen3-MoE layers
  (`use_sliding_window`, `layer_types` other than full attention: a window on some layers
  only), shared experts, routing other than softmax top-k, grouped or scaled routing.
  Mixtral's `sliding_window` applies to every layer; like Mistral's, it caps the served
  context (shared/config.py), where it equals full attention.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ConfigError

QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")

# config.json keys of other MoE families (Qwen2-MoE, DeepSeek, ...) that change the block's
# function, with the value that means "not used". Any other value is refused.
_UNIMPLEMENTED_MOE_KEYS: dict[str, tuple[Any, ...]] = {
    "shared_expert_intermediate_size": (None, 0),
    "n_shared_experts": (None, 0),
    "num_shared_experts": (None, 0),
    "scoring_func": (None, "softmax"),
    "topk_method": (None, "greedy"),
    "n_group": (None, 1),
    "topk_group": (None, 1),
    "routed_scaling_factor": (None, 1, 1.0),
    "moe_layer_freq": (None, 1),
    "first_k_dense_replace": (None, 0),
}


def _refuse_sliding_window(architecture: str, raw: dict[str, Any], hf: Any) -> None:
    if raw.get("use_sliding_window") or getattr(hf, "use_sliding_window", False):
        raise ConfigError(
            f"{architecture}: use_sliding_window=true is not supported (sliding-window attention "
            "on some layers is not implemented); set it to false to serve full attention"
        )
    layer_types = getattr(hf, "layer_types", None) or raw.get("layer_types") or []
    others = sorted({t for t in layer_types if t != "full_attention"})
    if others:
        raise ConfigError(
            f"{architecture}: layer_types {others} are not supported; only full_attention is"
        )


def _refuse_unimplemented_moe_keys(architecture: str, raw: dict[str, Any]) -> None:
    for key, unused in _UNIMPLEMENTED_MOE_KEYS.items():
        if key in raw and raw[key] not in unused:
            raise ConfigError(
                f"{architecture}: {key}={raw[key]!r} is not supported (the MoE block implemented "
                "is softmax top-k routing over routed experts only, no shared experts)"
            )


def read_moe_fields(architecture: str, raw: dict[str, Any], hf: Any) -> dict[str, Any]:
    """ModelConfig's MoE fields for `architecture` from config.json (`raw`) and transformers'
    config (`hf`); refuses what is not implemented. Empty for other architectures."""
    if architecture in QK_NORM_ARCHITECTURES:
        _refuse_sliding_window(architecture, raw, hf)
    if architecture not in MOE_ARCHITECTURES:
        return {}
    _refuse_unimplemented_moe_keys(architecture, raw)
    num_layers = int(hf.num_hidden_layers)
    if architecture == "MixtralForCausalLM":
        num_experts = int(hf.num_local_experts)
        # Every Mixtral layer is sparse; its experts have the config's intermediate_size,
        # and the top-k weights are always renormalised (transformers' MixtralTopKRouter).
        return dict(
            num_experts=num_experts,
            num_experts_per_tok=int(hf.num_experts_per_tok),
            moe_intermediate_size=int(hf.intermediate_size),
            norm_topk_prob=True,
            moe_layers=tuple(range(num_layers)) if num_experts > 0 else (),
        )
    num_experts = int(getattr(hf, "num_experts", 0) or 0)
    step = int(getattr(hf, "decoder_sparse_step", 1))
    if step < 1:
        raise ConfigError(f"{architecture}: decoder_sparse_step must be at least 1, got {step}")
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    # transformers' Qwen3MoeDecoderLayer: sparse unless listed in mlp_only_layers, and then
    # only every decoder_sparse_step-th layer (1-based).
    moe_layers = tuple(
        i for i in range(num_layers) if num_experts > 0 and i not in dense and (i + 1) % step == 0
    )
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(hf.num_experts_per_tok),
        moe_intermediate_size=int(hf.moe_intermediate_size),
        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)),
        moe_layers=moe_layers,
    )
