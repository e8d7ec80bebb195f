"""Block-FP8 checkpoints for the tests, written here without the serving code: a tiny model
from transformers, its linear weights quantized as Hugging Face's fine-grained FP8 lays them
out, and beside it the same model with the dequantized weights in float32 (what
transformers runs as the reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stageserve.demo_model import write_tiny_model

BLOCK = (128, 128)
FP8_MAX = 448.0  # the largest float8_e4m3fn
# Layer names the fine-grained FP8 layout quantizes (lm_head, embeddings and norms stay).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn values, float32 scale_inv [ceil(out/bn), ceil(in/bk)]),
    one block at a time, each scaled so its largest magnitude becomes FP8_MAX."""
    bn, bk = block
    out, inp = weight.shape
    rows, cols = -(-out // bn), -(-inp // bk)
    values = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            tile = weight[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk].float()
            s = max(float(tile.abs().max()), 1e-12) / FP8_MAX
            scale_inv[r, c] = s
            values[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] = (tile / s).to(torch.float8_e4m3fn)
    return values, scale_inv


def dequantize_blocks(values: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    bn, bk = block
    out = values.to(torch.float32)
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            out[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] *= scale_inv[r, c]
    return out


def write_fp8_pair(source: Path, fp8_dir: Path, dequantized_dir: Path) -> None:
    """From a float32 HF folder: `fp8_dir` with block-FP8 linear weights and a fine-grained
    FP8 quantization_config, `dequantized_dir` the same model with weights = values * scales."""
    state = load_file(str(source / "model.safetensors"))
    fp8_state: dict[str, torch.Tensor] = {}
    plain_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module = key.rsplit(".", 2)[-2] if key.endswith(".weight") else ""
        if module in QUANTIZED:
            values, scale_inv = quantize_blocks(tensor)
            fp8_state[key] = values
            fp8_state[key + "_scale_inv"] = scale_inv
            plain_state[key] = dequantize_blocks(values, scale_inv)
        else:
            fp8_state[key] = tensor
            plain_state[key] = tensor
    for folder, tensors in ((fp8_dir, fp8_state), (dequantized_dir, plain_state)):
        shutil.copytree(source, folder)
        (folder / "model.safetensors").unlink()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(BLOCK),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_fp8_pair(root: Path) -> tuple[Path, Path]:
    """(FP8 folder, dequantized float32 folder) of a tiny Llama under `root`: head_dim 128 and
    an intermediate size of 1024, so every TP=2 part is whole 128-blocks."""
    source = write_tiny_model(
        root / "source", "LlamaForCausalLM", num_layers=4, hidden_size=512, num_heads=4, num_kv_heads=2,
        intermediate_size=1024, seed=11, initializer_range=0.05,
    )
    write_fp8_pair(source, root / "fp8", root / "dequantized")
    return root / "fp8", root / "dequantized"
