"""How a linear layer stores its weight and computes with it: plain, or block-wise FP8.

A linear layer (layers/linear.py) owns the tensor-parallel split; its linear method owns the
parameters that hold the weight (`create_weights`) and the product (`apply`). The method
comes from the checkpoint's quantization_config (shared/quantization.py), per layer, so a
layer listed in modules_to_not_convert stays plain.

Block-wise FP8 keeps the checkpoint's float8_e4m3fn values and float32 `weight_scale_inv`
blocks in memory (1 byte per weight). The reference path (CPU, and the parity tests)
multiplies with the dequantized weight in the activation dtype; the "triton" kernel backend
(GPUs) runs an FP8 GEMM on activations quantized per token and 128-column group at run time
(layers/triton_fp8_matmul.py) for up to FP8_GEMM_MAX_ROWS rows, and above that dequantizes the
weight in one launch for cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ConfigError
from shared.quantization import QuantizationConfig
from stage_worker.layers.block_fp8 import FP8_DTYPE, cdiv, dequantize_block_fp8

# Rows up to which the GPU path runs the FP8 GEMM; above, the dequantized weight and cuBLAS.
FP8_GEMM_MAX_ROWS = 64


def new_parameter(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by its weight_loader, and the loader
    # checks that none was left out.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class UnquantizedLinearMethod:
    """The weight in the model dtype, F.linear."""

    def create_weights(
        self, layer: nn.Module, output_sizes: list[int], input_size: int, input_is_split: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        layer.weight = new_parameter((sum(output_sizes), input_size), dtype, device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class BlockFp8LinearMethod:
    """float8_e4m3fn weight [out, in] with float32 weight_scale_inv [cdiv(out, bn), cdiv(in, bk)]."""

    def __init__(self, quant: QuantizationConfig, prefix: str) -> None:
        self.block = quant.weight_block_size
        self.prefix = prefix

    def create_weights(
        self, layer: nn.Module, output_sizes: list[int], input_size: int, input_is_split: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        """`output_sizes`: this rank's part of each fused output (one entry if not fused);
        `input_is_split`: row-parallel (the input columns are split, the output rows whole)."""
        bn, bk = self.block
        tp_size = layer.tp_size
        # One scale covers a bn x bk block of the checkpoint tensor. A rank's slice, or a fused
        # member placed after another, must start on a block boundary, or its scales would
        # belong partly to rows or columns of another rank or member.
        output_is_split = tp_size > 1 and not input_is_split
        if (len(output_sizes) > 1 or output_is_split) and any(size % bn for size in output_sizes):
            raise ConfigError(
                f"{self.prefix}: this rank's output parts {output_sizes} at tensor-parallel size "
                f"{tp_size} are not multiples of the FP8 block's {bn} rows; the split would cut "
                "through a block of scales. Use a tensor-parallel size that keeps each part a "
                f"multiple of {bn}"
            )
        if input_is_split and tp_size > 1 and input_size % bk:
            raise ConfigError(
                f"{self.prefix}: this rank's {input_size} input columns at tensor-parallel size "
                f"{tp_size} are not a multiple of the FP8 block's {bk} columns; the split would "
                f"cut through a block of scales. Use a tensor-parallel size that keeps it a multiple of {bk}"
            )
        out = sum(output_sizes)
        layer.weight = new_parameter((out, input_size), FP8_DTYPE, device)
        layer.weight_scale_inv = new_parameter((cdiv(out, bn), cdiv(input_size, bk)), torch.float32, device)
        # Read by the weight loaders: ranges along dim d of this parameter are in blocks of
        # block_shape[d] elements of the weight.
        layer.weight_scale_inv.block_shape = (bn, bk)
        layer.kernel_backend = "reference"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.kernel_backend == "triton":
            from stage_worker.layers.triton_fp8_matmul import dequantize_block_fp8_triton, fp8_block_linear

            if x.numel() // x.shape[-1] <= FP8_GEMM_MAX_ROWS:
                out = fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.block)
                return out if bias is None else out + bias
            # Many rows (prefill, mixed steps): the FP8 kernel's tiles are not tuned for
            # compute-bound shapes yet and run at a third of cuBLAS's bf16 rate there
            # (docs/benchmarks.md); widening the weight once costs less.
            weight = dequantize_block_fp8_triton(layer.weight, layer.weight_scale_inv, self.block, x.dtype)
            return F.linear(x, weight, bias)
        weight = dequantize_block_fp8(layer.weight, layer.weight_scale_inv, self.block, x.dtype)
        return F.linear(x, weight, bias)


def linear_method(
    quant: QuantizationConfig | None, prefix: str, member_prefixes: list[str] | None = None
) -> UnquantizedLinearMethod | BlockFp8LinearMethod:
    """The method of the linear layer at `prefix`; a fused layer gives the checkpoint prefixes
    of its members (q/k/v_proj), which must agree on being quantized."""
    if quant is None:
        return UnquantizedLinearMethod()
    members = member_prefixes or [prefix]
    flags = {quant.is_quantized(p) for p in members}
    if len(flags) > 1:
        raise ConfigError(
            f"modules_to_not_convert leaves only some of {', '.join(members)} unquantized; they run "
            "as one fused matmul here, so all or none of them must be quantized"
        )
    return BlockFp8LinearMethod(quant, prefix) if flags.pop() else UnquantizedLinearMethod()
