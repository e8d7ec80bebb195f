"""Mixtral (`MixtralForCausalLM`): Mistral's attention and a sparse MoE block on every layer,
stored as `block_sparse_moe.gate` and `block_sparse_moe.experts.N.{w1,w2,w3}` (w1 the gate
projection, w3 the up projection, w2 the down projection). Routing: softmax, top-k (2 in the
released models), the k weights always renormalised, kept in float32 as transformers does."""

from __future__ import annotations

from stage_worker.models.sparse_moe import MoeDecoderLayer, MoeForCausalLM, MoeModel


class MixtralDecoderLayer(MoeDecoderLayer):
    routing_weights_in_model_dtype = False


class MixtralModel(MoeModel):
    decoder_layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(MoeForCausalLM):
    model_cls = MixtralModel
    moe_checkpoint_prefix = "block_sparse_moe"
    expert_checkpoint_names = {"w1": "w1", "w3": "w3", "w2": "w2"}
