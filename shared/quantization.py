"""A checkpoint's quantization, read from config.json with the rest of the config.

Every process that reads a model (router, stages, `plan`, `save-sharded`, `up`) parses it
through ModelConfig.from_pretrained, so a checkpoint quantized in a way the stage workers do
not implement is refused there, before any rank starts or any weight is read: serving it by
casting its packed or scaled values to the compute dtype would give wrong tokens silently.

Supported: block-wise FP8 as Hugging Face's fine-grained FP8 writes it (Qwen3-*-FP8,
DeepSeek-V3): each quantized linear weight is float8_e4m3fn with a float32
`weight_scale_inv` of shape [ceil(out / block_n), ceil(in / block_k)], the real weight being
`weight * weight_scale_inv` block by block; activations are quantized at run time
(`activation_scheme: dynamic`). Embeddings, norms, MoE router gates and lm_head stay in the
checkpoint's dtype, as in those checkpoints.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

SUPPORTED_QUANTIZATION = (
    "fp8 with weight_block_size (block-wise float8_e4m3fn weights with float32 "
    "weight_scale_inv, activation_scheme 'dynamic': Hugging Face's fine-grained FP8, as in "
    "Qwen3-*-FP8 and DeepSeek-V3)"
)

# Files some quantization tools write beside config.json instead of a quantization_config.
_SIDE_FILES = {
    "quantize_config.json": "GPTQ (AutoGPTQ's quantize_config.json)",
    "quant_config.json": "AWQ (AutoAWQ's quant_config.json)",
}

# quantization_config keys of the fine-grained FP8 layout that need no code of ours, with
# the values we accept; any other key is refused rather than ignored.
_FP8_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "activation_scheme": ("dynamic",),
    "fmt": ("e4m3",),
    # Transformers' own load-time switch (widen the weights while loading); it does not
    # change the checkpoint, and we keep the weights in FP8.
    "dequantize": (False,),
    # The scales are float32 multipliers either way; "ue8m0" says they are powers of two.
    "scale_fmt": ("float", "ue8m0"),
    "expert_dtype": ("fp8",),
    "modules_to_convert": (None,),
}


@dataclass(frozen=True)
class QuantizationConfig:
    """How a checkpoint's linear weights are quantized (only block-wise FP8 today)."""

    method: str
    # (block_n, block_k): rows x columns of a weight covered by one scale.
    weight_block_size: tuple[int, int]
    # Module-name patterns left unquantized (modules_to_not_convert / ignored_layers).
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method != "fp8":
            raise ConfigError(f"quantization {self.method!r} is not supported; supported: {SUPPORTED_QUANTIZATION}")
        if len(self.weight_block_size) != 2 or min(self.weight_block_size) < 1:
            raise ConfigError(
                f"fp8 weight_block_size must be two positive integers, got {list(self.weight_block_size)}"
            )

    @property
    def block_n(self) -> int:
        return self.weight_block_size[0]

    @property
    def block_k(self) -> int:
        return self.weight_block_size[1]

    def is_quantized(self, prefix: str) -> bool:
        """Whether the linear layer at checkpoint prefix `prefix` (`model.layers.3.mlp.down_proj`,
        for a fused layer its first member) holds FP8 weights."""
        for pattern in self.modules_to_not_convert:
            if fnmatch.fnmatchcase(prefix, pattern) or _names_module(prefix, pattern):
                return False
        return True

    def describe(self) -> str:
        return f"fp8 in {self.block_n}x{self.block_k} blocks"


def _names_module(prefix: str, name: str) -> bool:
    """HF matches modules_to_not_convert by name component: "lm_head" or "mlp.gate" name the
    module wherever it sits ("model.layers.0.mlp.gate")."""
    return prefix == name or prefix.endswith("." + name) or ("." + name + ".") in ("." + prefix + ".")


def _refuse(method: str, detail: str = "") -> ConfigError:
    return ConfigError(
        f"quantization method {method!r}{detail} is not supported; stageserve serves {SUPPORTED_QUANTIZATION}. "
        "Serve a checkpoint in one of those formats or in bfloat16/float16/float32"
    )


def parse_quantization(model_dir: Path, raw_config: dict[str, Any]) -> QuantizationConfig | None:
    """config.json's `quantization_config` (and the side files some tools write instead) ->
    the QuantizationConfig, None for an unquantized checkpoint, or ConfigError naming what
    is not supported."""
    for name, what in _SIDE_FILES.items():
        if (model_dir / name).is_file() and "quantization_config" not in raw_config:
            raise _refuse(what)
    quant = raw_config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json's quantization_config must be an object, got {json.dumps(quant)[:80]}")
    method = str(quant.get("quant_method", "")).lower()
    if not method:
        raise ConfigError("config.json's quantization_config names no quant_method")
    if method != "fp8":
        bits = quant.get("bits", quant.get("w_bit"))
        raise _refuse(method, f" ({bits}-bit)" if bits is not None else "")
    block = quant.get("weight_block_size")
    if block is None:
        raise _refuse(
            "fp8",
            " with per-tensor scales (no weight_block_size: the `weight_scale` layout of AutoFP8 / "
            "llm-compressor)",
        )
    known = {"quant_method", "weight_block_size", "modules_to_not_convert", "ignored_layers"}
    for key, value in quant.items():
        if key in known:
            continue
        if key not in _FP8_ACCEPTED_VALUES:
            raise _refuse("fp8", f" with quantization_config key {key!r}")
        if value not in _FP8_ACCEPTED_VALUES[key]:
            allowed = ", ".join(json.dumps(v) for v in _FP8_ACCEPTED_VALUES[key])
            raise _refuse("fp8", f" with {key}={json.dumps(value)} (accepted: {allowed})")
    if not isinstance(block, (list, tuple)) or not all(isinstance(b, int) for b in block):
        raise ConfigError(f"fp8 weight_block_size must be two integers, got {json.dumps(block)}")
    skipped = tuple(quant.get("modules_to_not_convert") or ()) + tuple(quant.get("ignored_layers") or ())
    return QuantizationConfig("fp8", tuple(block), tuple(str(s) for s in skipped))  # type: ignore[arg-type]
