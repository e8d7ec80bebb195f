"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) holding one pipeline stage's part.

Only what the stage owns is built: the embedding on the first stage, decoder layers
[first_layer, last_layer) under their global HF indices, the final norm and lm_head on the
last stage. Module names follow HF's checkpoint keys, except for the fused projections
(qkv_proj, gate_up_proj), which `checkpoint_targets` maps back to HF names.

Models with experts (models/sparse_moe.py) reuse these classes through two hooks: a decoder
layer's `make_mlp` builds its feed-forward block, and `LlamaModel.decoder_layer_cls` /
`LlamaForCausalLM.model_cls` say which classes to build.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ConfigError, ModelConfig, StageLayout
from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.distributed import get_tp_group
from stage_worker.layers.activation import SiluAndMul
from stage_worker.layers.attention import Attention
from stage_worker.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from stage_worker.layers.layernorm import RMSNorm
from stage_worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from stage_worker.layers.rotary_embedding import RotaryEmbedding
from stage_worker.layers.sequence_parallel import gather_tokens, reduce_scatter_tokens

# (fused module name, checkpoint module name, shard id): how HF's separate projections
# load into the fused ones.
STACKED_PARAMS_MAPPING: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=config.mlp_bias,
            dtype=dtype,
            device=device,
            quant_config=config.quantization,
            prefix=f"{prefix}.gate_up_proj",
            member_prefixes=[f"{prefix}.gate_proj", f"{prefix}.up_proj"],
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=config.mlp_bias,
            dtype=dtype,
            device=device,
            reduce_results=reduce_results,
            quant_config=config.quantization,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary_emb: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.qkv_bias,
            dtype=dtype,
            device=device,
            quant_config=config.quantization,
            prefix=f"{prefix}.qkv_proj",
            member_prefixes=[f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")],
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim,
            config.hidden_size,
            bias=config.o_proj_bias,
            dtype=dtype,
            device=device,
            reduce_results=reduce_results,
            quant_config=config.quantization,
            prefix=f"{prefix}.o_proj",
        )
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, scale=head_dim**-0.5
        )
        self.head_dim = head_dim
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # Qwen3: RMSNorm over each head's vector of q and k, before rotary; the weight
            # [head_dim] is shared by all heads, so it is replicated over TP ranks.
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            # Per head: [num_tokens, heads * head_dim] -> [num_tokens * heads, head_dim] -> back.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, attn_metadata)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary_emb: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device,
        sequence_parallel: bool = False,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        # With sequence parallelism the row-parallel outputs are reduce-scattered by the
        # layer instead of all-reduced inside the projection.
        self.sequence_parallel = sequence_parallel
        self.self_attn = LlamaAttention(
            config, rotary_emb, dtype, device, reduce_results=not sequence_parallel,
            prefix=f"model.layers.{layer_index}.self_attn",
        )
        self.mlp = self.make_mlp(config, layer_index, dtype, device, reduce_results=not sequence_parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # `residual` is the stream before this layer's input; `hidden_states` the previous
        # sublayer's output still to be added to it (None/stream at a stage's first layer).
        # With sequence parallelism both are this rank's token shard [rows, hidden].
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        num_tokens = attn_metadata.num_tokens
        if self.sequence_parallel:
            hidden_states = gather_tokens(hidden_states, num_tokens)  # [num_tokens, hidden]
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        if self.sequence_parallel:
            hidden_states = reduce_scatter_tokens(hidden_states, num_tokens)  # [rows, hidden]
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        if self.sequence_parallel:
            hidden_states = gather_tokens(hidden_states, num_tokens)
        hidden_states = self.mlp(hidden_states)
        if self.sequence_parallel:
            hidden_states = reduce_scatter_tokens(hidden_states, num_tokens)
        return hidden_states, residual

    def make_mlp(
        self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device: torch.device, reduce_results: bool
    ) -> nn.Module:
        """The feed-forward block of global layer `layer_index`: [num_tokens, hidden] ->
        [num_tokens, hidden], all-reduced over TP unless reduce_results is False."""
        return LlamaMLP(config, dtype, device, reduce_results=reduce_results, prefix=f"model.layers.{layer_index}.mlp")


class LlamaModel(nn.Module):
    """HF's `model.` prefix: embedding, layers and final norm (the owned ones)."""

    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(
        self,
        config: ModelConfig,
        layout: StageLayout,
        dtype: torch.dtype,
        device: torch.device,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.sequence_parallel = sequence_parallel
        if layout.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_parameters,
            config.hf_config,
            dtype,
            device,
        )
        # Keyed by the global layer index so parameter names equal the checkpoint keys.
        self.layers = nn.ModuleDict(
            {
                str(i): self.decoder_layer_cls(config, rotary_emb, dtype, device, sequence_parallel, layer_index=i)
                for i in range(layout.first_layer, layout.last_layer)
            }
        )
        if layout.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if self.layout.is_first:
            assert input_ids is not None, "the first stage takes input_ids"
            if self.sequence_parallel:
                partial = self.embed_tokens(input_ids, reduce=False)  # [num_tokens, hidden]
                hidden_states = reduce_scatter_tokens(partial, attn_metadata.num_tokens)  # [rows, hidden]
            else:
                hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        else:
            assert hidden_states is not None, "a later stage takes the previous stage's hidden states"
        residual = None
        for layer in self.layers.values():
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        if self.layout.is_last:
            hidden_states, _ = self.norm(hidden_states, residual)
            if self.sequence_parallel:
                hidden_states = gather_tokens(hidden_states, attn_metadata.num_tokens)
            return hidden_states
        # One tensor on the wire: the next stage starts from the full residual stream
        # (with sequence parallelism, this rank's token shard of it).
        return hidden_states + residual


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(
        self,
        config: ModelConfig,
        layout: StageLayout,
        dtype: torch.dtype,
        device: torch.device,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if layout.last_layer > config.num_hidden_layers:
            raise ConfigError(
                f"stage {layout.stage_index} owns layers [{layout.first_layer}, {layout.last_layer}) "
                f"but the model has {config.num_hidden_layers} layers"
            )
        device = torch.device(device)
        self.config = config
        self.layout = layout
        self.dtype = dtype
        self.device = device
        tp = get_tp_group()
        # Sequence parallelism needs a TP group to shard over.
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.model = self.model_cls(config, layout, dtype, device, self.sequence_parallel)
        if layout.is_last:
            shared = None
            if config.tie_word_embeddings and layout.is_first:
                # One stage holds both ends: the head reuses the embedding's shard.
                shared = self.model.embed_tokens.weight
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, dtype, device, weight=shared
            )
        self.tp_rank, self.tp_size = tp.rank, tp.size
        first_attn = next(iter(self.attention_layers().values()))
        self.num_local_heads = first_attn.num_heads
        self.num_local_kv_heads = first_attn.num_kv_heads
        self._checkpoint_targets = self._build_checkpoint_targets()

    # ----- forward -----

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """First stage: input_ids [num_tokens]; others: hidden_states [num_tokens, hidden].

        Returns [num_tokens, hidden]: the residual stream for the next stage, or on the last
        stage the final-normed hidden states for compute_logits. With sequence parallelism
        the hidden states coming in and the stream going out are this rank's token shard
        [padded_num_tokens / tp, hidden]; the last stage still returns every token.
        """
        return self.model(input_ids, positions, hidden_states, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 [n, vocab_size], gathered over TP (same on every rank)."""
        assert self.layout.is_last, "compute_logits runs on the last stage only"
        return self.lm_head.compute_logits(hidden_states)

    # ----- structure -----

    @property
    def layer_indices(self) -> list[int]:
        return list(range(self.layout.first_layer, self.layout.last_layer))

    def attention_layers(self) -> dict[int, Attention]:
        """Global layer index -> that layer's attention (where KVCache.bind attaches caches)."""
        return {int(i): layer.self_attn.attn for i, layer in self.model.layers.items()}

    def _build_checkpoint_targets(self) -> dict[str, tuple[str, str | int | None]]:
        targets: dict[str, tuple[str, str | int | None]] = {}
        # named_parameters yields a tied parameter once, under its first name
        # (model.embed_tokens.weight), so a single-stage tied model loads it once.
        for name, _ in self.named_parameters():
            for fused, ckpt, shard_id in STACKED_PARAMS_MAPPING:
                if f".{fused}." in name:
                    targets[name.replace(f".{fused}.", f".{ckpt}.")] = (name, shard_id)
            if any(f".{fused}." in name for fused, _, _ in STACKED_PARAMS_MAPPING):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                # Tied checkpoints store the head only as the embedding.
                targets["model.embed_tokens.weight"] = (name, None)
            else:
                targets[name] = (name, None)
        return targets

    def checkpoint_targets(self) -> dict[str, tuple[str, str | int | None]]:
        """Checkpoint key -> (parameter name, shard id for fused parameters, else None)."""
        return dict(self._checkpoint_targets)

    def checkpoint_parameter_names(self) -> list[str]:
        """The HF checkpoint keys this stage owns (what it reports in GetInfo)."""
        return list(self._checkpoint_targets)

    def parameter_bytes(self) -> int:
        """Bytes of parameters this rank holds (its TP shards, vocab padding included)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())
