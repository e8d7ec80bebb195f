"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (per-head q/k RMSNorm, free head_dim)
and a sparse MoE block (`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`) on every layer but
those mlp_only_layers / decoder_sparse_step make dense. Routing: softmax top-k, renormalised
when norm_topk_prob is set (ModelConfig carries both; shared/arch_config.py reads them)."""

from __future__ import annotations

from stage_worker.models.sparse_moe import MoeDecoderLayer, MoeForCausalLM, MoeModel


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    routing_weights_in_model_dtype = True


class Qwen3MoeModel(MoeModel):
    decoder_layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoeForCausalLM):
    model_cls = Qwen3MoeModel
    moe_checkpoint_prefix = "mlp"
    expert_checkpoint_names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
