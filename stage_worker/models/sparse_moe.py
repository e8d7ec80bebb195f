"""Llama-structured decoders whose feed-forward is a sparse mixture of experts on some or
all layers (Qwen3-MoE, Mixtral): attention, norms, embedding and head are models/llama.py's;
the MoE block is a replicated router gate and the experts of layers/fused_moe.py.

The architectures differ only in checkpoint names, kept per model file (models/qwen3_moe.py,
models/mixtral.py): the block's prefix (`mlp` / `block_sparse_moe`) and the names of an
expert's projections (`gate_proj, up_proj, down_proj` / `w1, w3, w2`). Modules are named as
transformers 5 names them (`mlp.gate`, `mlp.experts`), the experts stacked per block
(`mlp.experts.w13_weight`, `mlp.experts.w2_weight`); `checkpoint_targets` maps each
per-expert checkpoint key (what save_pretrained writes and Hub folders hold) to its slot.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelConfig
from stage_worker.layers.fused_moe import FusedMoE, fused_topk
from stage_worker.layers.linear import ReplicatedLinear
from stage_worker.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel

# A checkpoint key's target: (parameter name, shard id), the shard id None, a fused
# projection's id ("q", 0, ...) or an expert's (expert id, "w1" | "w2" | "w3").
Target = tuple[str, str | int | tuple[int, str] | None]


class SparseMoeBlock(nn.Module):
    """[num_tokens, hidden] -> [num_tokens, hidden]: softmax top-k routing over the experts,
    one all-reduce for the block (none if reduce_results is False: the caller reduces)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool,
        routing_weights_in_model_dtype: bool,
    ) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        # transformers' Qwen3-MoE router rounds the top-k weights to the model dtype before
        # they scale the experts' outputs; Mixtral's keeps them in float32.
        self.routing_weights_in_model_dtype = routing_weights_in_model_dtype
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False, dtype=dtype, device=device)
        self.experts = FusedMoE(
            config.num_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.moe_intermediate_size,
            dtype,
            device,
            reduce_results=reduce_results,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # [num_tokens, num_experts], same on every rank
        weights_dtype = hidden_states.dtype if self.routing_weights_in_model_dtype else torch.float32
        if self.experts.kernel_backend == "triton":
            # One launch for the softmax, top-k, renormalization and cast instead of five torch
            # ops: a small decode step is bound by launches (docs/benchmarks.md, MoE section).
            from stage_worker.layers.triton_fused_moe import fused_topk as triton_fused_topk

            topk_weights, topk_ids = triton_fused_topk(router_logits, self.top_k, self.renormalize, weights_dtype)
        else:
            topk_weights, topk_ids = fused_topk(router_logits, self.top_k, self.renormalize)
            topk_weights = topk_weights.to(weights_dtype)
        return self.experts(hidden_states, topk_weights, topk_ids)


class MoeDecoderLayer(LlamaDecoderLayer):
    # Set by the model file: see SparseMoeBlock.
    routing_weights_in_model_dtype: bool = True

    def make_mlp(
        self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device: torch.device, reduce_results: bool
    ) -> nn.Module:
        if config.is_moe_layer(layer_index):
            return SparseMoeBlock(config, dtype, device, reduce_results, self.routing_weights_in_model_dtype)
        # A dense layer (Qwen3-MoE's mlp_only_layers / decoder_sparse_step) of intermediate_size.
        return LlamaMLP(config, dtype, device, reduce_results=reduce_results, prefix=f"model.layers.{layer_index}.mlp")


class MoeModel(LlamaModel):
    decoder_layer_cls = MoeDecoderLayer


class MoeForCausalLM(LlamaForCausalLM):
    model_cls = MoeModel
    # Checkpoint prefix of a sparse block inside a layer (the module is always `mlp`).
    moe_checkpoint_prefix = "mlp"
    # FusedMoE shard id -> the checkpoint's name of that expert projection.
    expert_checkpoint_names: dict[str, str] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def _build_checkpoint_targets(self) -> dict[str, Target]:  # type: ignore[override]
        moe_blocks = {
            name: module for name, module in self.named_modules() if isinstance(module, SparseMoeBlock)
        }
        targets: dict[str, Target] = {}
        for key, target in super()._build_checkpoint_targets().items():
            block = next((b for b in moe_blocks if key.startswith(b + ".")), None)
            if block is None:
                targets[key] = target
            elif not key.startswith(block + ".experts."):
                # The gate: only the block's prefix may differ ("model.layers.3.mlp" ->
                # "model.layers.3.block_sparse_moe").
                targets[self._checkpoint_block(block) + key[len(block) :]] = target
        for block, module in moe_blocks.items():
            prefix = self._checkpoint_block(block)
            for expert in range(module.experts.num_experts):
                for shard, ckpt_name in self.expert_checkpoint_names.items():
                    param = f"{block}.experts.{'w2_weight' if shard == 'w2' else 'w13_weight'}"
                    targets[f"{prefix}.experts.{expert}.{ckpt_name}.weight"] = (param, (expert, shard))
        return targets

    def _checkpoint_block(self, block: str) -> str:
        """Module path of a sparse block ("model.layers.3.mlp") -> its checkpoint prefix."""
        head, _, last = block.rpartition(".")
        assert last == "mlp", block
        return f"{head}.{self.moe_checkpoint_prefix}"
