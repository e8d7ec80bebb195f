"""Configuration shared by the router and the stage workers.

Frozen dataclasses validated in ``__post_init__``. Values discovered at run time (the KV
pool size, say) live in runtime objects elsewhere, never here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.arch_config import QK_NORM_ARCHITECTURES, read_moe_fields
from shared.errors import ConfigError
from shared.quantization import QuantizationConfig, parse_quantization


SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"unsupported dtype {dtype}")


@dataclass(frozen=True)
class ModelConfig:
    """What the serving code needs to know about a decoder-only checkpoint."""

    model_path: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Qwen2 has q/k/v biases; Llama may via `attention_bias`.
    qkv_bias: bool
    # o_proj bias (Llama's `attention_bias` covers it too).
    o_proj_bias: bool
    mlp_bias: bool
    # transformers' normalised rope description: rope_type, rope_theta, and type-specific keys.
    rope_parameters: dict[str, Any]
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # dtype the checkpoint was saved in ("bfloat16", ...); with quantization, the dtype of
    # what stays unquantized and of the activations.
    checkpoint_dtype: str
    # None: plain weights; else how the linear weights are quantized (shared/quantization.py).
    quantization: QuantizationConfig | None = None
    # The transformers config object, for code that defers to transformers (rope init).
    hf_config: Any = field(default=None, compare=False, repr=False)
    # Qwen3: per-head RMSNorm of q and k (q_norm, k_norm) before rotary.
    qk_norm: bool = False
    # Mixture of experts (shared/arch_config.py reads them); num_experts == 0: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # Intermediate size of one expert (Mixtral: its intermediate_size).
    moe_intermediate_size: int = 0
    # Renormalise the top-k routing weights to sum to 1 (Mixtral always does).
    norm_topk_prob: bool = False
    # Global indices of the layers whose feed-forward is a sparse MoE block; the others are
    # dense MLPs of intermediate_size (Qwen3-MoE's mlp_only_layers / decoder_sparse_step).
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        if self.moe_layers:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                    f"({self.num_experts})]"
                )
            if self.moe_intermediate_size < 1:
                raise ConfigError("moe_intermediate_size must be at least 1")
            if not all(0 <= i < self.num_hidden_layers for i in self.moe_layers):
                raise ConfigError(f"MoE layer indices {list(self.moe_layers)} outside the model's layers")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_hidden_layers < 1:
            raise ConfigError("num_hidden_layers must be at least 1")
        if self.quantization is not None and self.num_experts:
            raise ConfigError(
                f"{self.architecture} with linear weights {self.quantization.describe()}: quantized "
                "mixture-of-experts checkpoints are not supported yet (the expert layers hold plain "
                "weights only); serve the bfloat16 checkpoint"
            )

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "ModelConfig":
        """Reads config.json through transformers' AutoConfig (no weights are touched)."""
        from transformers import AutoConfig

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a Hugging Face model folder: config.json is missing")
        raw = json.loads((path / "config.json").read_text())
        archs = raw.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{path}/config.json names architectures {archs}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        # Before AutoConfig: transformers may reject or rewrite a quantization it knows.
        quantization = parse_quantization(path, raw)
        hf = AutoConfig.from_pretrained(str(path))
        # Refuses what these architectures' configs may set but the serving code does not
        # implement (sliding windows on some layers, other routings, shared experts).
        moe = read_moe_fields(archs[0], raw, hf)
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; only 'silu' is")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear", "dynamic", "yarn"):
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; supported: default, llama3, linear, "
                "dynamic, yarn"
            )
        max_pos = int(hf.max_position_embeddings)
        # Sliding-window attention is not implemented: serve only the part of the context
        # where it equals full attention.
        window = getattr(hf, "sliding_window", None)
        uses_window = bool(window) and getattr(hf, "use_sliding_window", True)
        if uses_window and window < max_pos:
            max_pos = int(window)
        heads = int(hf.num_attention_heads)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        eos = hf.eos_token_id
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        dtype = getattr(hf, "dtype", None) or raw.get("torch_dtype") or "float32"
        return cls(
            model_path=str(path),
            architecture=archs[0],
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_hidden_layers=int(hf.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab_size=int(hf.vocab_size),
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=archs[0] == "Qwen2ForCausalLM" or attention_bias,
            o_proj_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_parameters=rope,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(dtype).replace("torch.", ""),
            quantization=quantization,
            hf_config=hf,
            qk_norm=archs[0] in QK_NORM_ARCHITECTURES,
            **moe,
        )


@dataclass(frozen=True)
class StageLayout:
    """Which part of the model one pipeline stage owns."""

    stage_index: int
    num_stages: int
    # Decoder layers [first_layer, last_layer).
    first_layer: int
    last_layer: int

    def __post_init__(self) -> None:
        if not 0 <= self.stage_index < self.num_stages:
            raise ConfigError(f"stage index {self.stage_index} outside [0, {self.num_stages})")
        if not 0 <= self.first_layer < self.last_layer:
            raise ConfigError(
                f"stage {self.stage_index} owns no layers ([{self.first_layer}, {self.last_layer}))"
            )

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer

    def owns_layer(self, layer: int) -> bool:
        return self.first_layer <= layer < self.last_layer


@dataclass(frozen=True)
class ParallelConfig:
    """The (pp, tp) layout of the whole deployment, and where this process sits in it."""

    num_stages: int
    tp_size: int
    # Layers per stage; sums to the model's layer count.
    layer_partition: tuple[int, ...]
    # Megatron-style sequence parallelism inside each stage's TP group (no effect at tp=1).
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ConfigError("the number of pipeline stages must be at least 1")
        if self.tp_size < 1:
            raise ConfigError("the tensor-parallel size must be at least 1")
        if len(self.layer_partition) != self.num_stages:
            raise ConfigError(
                f"layer partition {list(self.layer_partition)} has {len(self.layer_partition)} "
                f"entries for {self.num_stages} stages"
            )
        if any(n < 1 for n in self.layer_partition):
            raise ConfigError(
                f"layer partition {list(self.layer_partition)}: every stage needs at least one layer"
            )

    @property
    def world_size(self) -> int:
        return self.num_stages * self.tp_size

    def stage_layout(self, stage_index: int) -> StageLayout:
        first = sum(self.layer_partition[:stage_index])
        return StageLayout(
            stage_index=stage_index,
            num_stages=self.num_stages,
            first_layer=first,
            last_layer=first + self.layer_partition[stage_index],
        )

    def global_rank(self, stage_index: int, tp_rank: int) -> int:
        # Stages are laid out one after the other: stage s owns ranks [s*tp, (s+1)*tp).
        return stage_index * self.tp_size + tp_rank


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    # Token budget of one step (prefill chunks + decodes).
    max_num_batched_tokens: int = 2048
    # Sequences in one step.
    max_num_seqs: int = 64
    # Waiting requests past which new ones get RESOURCE_EXHAUSTED.
    max_queue_len: int = 4096
    # Micro-batches in flight; 0 means one per pipeline stage, times steps_in_flight_per_seq
    # with async_scheduling.
    max_inflight_steps: int = 0
    enable_prefix_caching: bool = True
    # Send a decode step before the previous step's token has come back: the stages take
    # the token from their own sampler output (the last stage forwards it to the first over
    # NCCL), so the router, gRPC and the stages' host work overlap the GPU instead of
    # running between its steps. Off: every step waits for the tokens it appends.
    async_scheduling: bool = True
    # With pipeline stages, every sequence joins one of num_stages lanes of even size and a
    # micro-batch holds one lane, the lanes taking turns (router/scheduler.py). Off: a
    # micro-batch takes up to max_num_seqs of whatever is not in flight.
    even_micro_batches: bool = True
    # With async_scheduling, how many steps one sequence may have in flight at once (each
    # after the first samples from the one before it on the device). 0: three with one
    # stage, two with a pipeline. Three lets a single stage's GPU run step n while the
    # router and the stage's host prepare step n+2, which a 256-stream decode step (12 ms
    # on an H200) needs: the round trip router -> stage -> router takes longer than one
    # step. Not the default with a pipeline (not measured there): a lane's second look-ahead
    # would wait on the first stage's device for tokens the last stage has not sampled
    # yet, stalling the other lanes' steps queued behind it.
    steps_in_flight_per_seq: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be at least 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if self.max_queue_len < 1:
            raise ConfigError("max_queue_len must be at least 1")
        if self.max_inflight_steps < 0:
            raise ConfigError("max_inflight_steps must be >= 0")
        if self.steps_in_flight_per_seq < 0:
            raise ConfigError("steps_in_flight_per_seq must be >= 0")

    def steps_per_seq(self, num_stages: int) -> int:
        """Steps one sequence may have in flight at once (see steps_in_flight_per_seq)."""
        if not self.async_scheduling:
            return 1
        if self.steps_in_flight_per_seq:
            return self.steps_in_flight_per_seq
        return 3 if num_stages == 1 else 2

    def inflight_steps(self, num_stages: int) -> int:
        """Steps the router keeps in flight: each stage busy, and with async scheduling more
        queued behind each, so a stage never waits for the router between steps."""
        if self.max_inflight_steps:
            return self.max_inflight_steps
        return num_stages * self.steps_per_seq(num_stages)


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
