"""Tensor-parallel linear layers (vLLM's names, HF's checkpoint layout).

Every parameter carries a `weight_loader(param, loaded[, shard_id])`. `loaded` is either a
tensor or a safetensors slice object (`safe_open(...).get_slice(name)`); the loader indexes
it so that only this rank's part is read from disk.

Checkpoint layout (HF): a linear weight is [out_features, in_features]. Column parallel
splits the out dimension (dim 0), row parallel the in dimension (dim 1).

Which parameters hold the weight is the layer's linear method (layers/linear_methods.py):
`weight` in the model dtype, or block-wise FP8 `weight` plus `weight_scale_inv`. A loader
slices every parameter of its layer by the same element ranges; a block-scale parameter (it
has `block_shape`) takes the blocks those ranges cover, so values and scales stay aligned
under any TP split the method accepted at construction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ConfigError
from shared.quantization import QuantizationConfig
from stage_worker.distributed import get_tp_group
from stage_worker.layers.block_fp8 import cdiv
from stage_worker.layers.linear_methods import linear_method, new_parameter

# A tensor or a safetensors slice object (PySafeSlice): both support `x[a:b]`, `x[:, a:b]`.
Loaded = Any


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ConfigError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def check_loaded_shape(loaded: Loaded, expected: tuple[int, ...], what: str) -> None:
    shape = loaded_shape(loaded)
    if shape != tuple(expected):
        raise ConfigError(
            f"checkpoint tensor for {what} has shape {list(shape)}, but the model config "
            f"expects {list(expected)}"
        )


def copy_shard(
    param: nn.Parameter, loaded: Loaded, dim: int, dst_start: int, src_start: int, size: int,
    full_size: int, what: str,
) -> None:
    """param[dst_start:dst_start+size] = loaded[src_start:src_start+size] along `dim` (0 or 1),
    the ranges in elements of the weight; `full_size` is the checkpoint weight's size along
    `dim`, the other dimensions being the parameter's own (checked against the loaded
    shape). For a block-scale parameter the ranges become the blocks they cover."""
    block = getattr(param, "block_shape", None)
    if block is not None:
        b = block[dim]
        # The linear method refused, at construction, splits that do not start on a block.
        assert src_start % b == 0 and dst_start % b == 0, (what, src_start, dst_start, b)
        # A range ending inside a block (the checkpoint's partial last block) takes that block.
        size = cdiv(src_start + size, b) - src_start // b
        src_start, dst_start, full_size = src_start // b, dst_start // b, cdiv(full_size, b)
    expected = list(param.shape)
    expected[dim] = full_size
    check_loaded_shape(loaded, tuple(expected), what)
    if dim == 0:
        param.data[dst_start : dst_start + size].copy_(loaded[src_start : src_start + size])
    else:
        param.data[:, dst_start : dst_start + size].copy_(loaded[:, src_start : src_start + size])


def _weight_params(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters the linear method created for the weight (weight, its scales)."""
    return [p for name, p in layer.named_parameters(recurse=False) if name != "bias"]


def kv_head_partition(
    total_num_heads: int, total_num_kv_heads: int, tp_size: int
) -> tuple[int, int, int]:
    """(query heads per rank, kv heads per rank, ranks sharing one kv head).

    With more ranks than kv heads each rank keeps one kv head, replicated over
    tp_size // total_num_kv_heads ranks.
    """
    num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
    if total_num_kv_heads >= tp_size:
        if total_num_kv_heads % tp_size != 0:
            raise ConfigError(
                f"num_key_value_heads ({total_num_kv_heads}) must be divisible by the "
                f"tensor-parallel size ({tp_size}), or divide it"
            )
        return num_heads, total_num_kv_heads // tp_size, 1
    if tp_size % total_num_kv_heads != 0:
        raise ConfigError(
            f"the tensor-parallel size ({tp_size}) must be a multiple of num_key_value_heads "
            f"({total_num_kv_heads}) when it exceeds it"
        )
    return num_heads, 1, tp_size // total_num_kv_heads


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; each rank holds out/tp rows."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        gather_output: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        member_prefixes: list[str] | None = None,
        output_partition_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, tp.size, "output size")
        self.gather_output = gather_output
        self.quant_method = linear_method(quant_config, prefix, member_prefixes)
        self.quant_method.create_weights(
            self, output_partition_sizes or [self.output_size_per_partition], input_size, False, dtype, device
        )
        for param in _weight_params(self):
            param.weight_loader = self.weight_loader
        if bias:
            self.bias = new_parameter((self.output_size_per_partition,), dtype, device)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        # Same rule for weight (2-D), its scales and bias (1-D): this rank's block of output rows.
        shard = self.output_size_per_partition
        copy_shard(param, loaded, 0, 0, self.tp_rank * shard, shard, self.output_size, "column-parallel layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output:
            out = get_tp_group().all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj -> gate_up_proj).

    On each rank the output is [shard of output 0, shard of output 1, ...], so a split of
    the local result by output_sizes / tp gives this rank's part of every projection.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        member_prefixes: list[str] | None = None,
    ) -> None:
        tp_size = get_tp_group().size
        for size in output_sizes:
            divide(size, tp_size, "output size")
        self.output_sizes = list(output_sizes)
        super().__init__(
            input_size, sum(output_sizes), bias, dtype, device, quant_config=quant_config, prefix=prefix,
            member_prefixes=member_prefixes, output_partition_sizes=[s // tp_size for s in output_sizes],
        )

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:  # type: ignore[override]
        full = self.output_sizes[shard_id]
        shard = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_shard(param, loaded, 0, offset, self.tp_rank * shard, shard, full, f"merged output {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one column-parallel matmul.

    Local output layout: [num_heads * head_size | num_kv_heads * head_size | same for v].
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        member_prefixes: list[str] | None = None,
    ) -> None:
        tp = get_tp_group()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads, self.num_kv_heads, self.num_kv_head_replicas = kv_head_partition(
            total_num_heads, total_num_kv_heads, tp.size
        )
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        # The per-rank output is what ColumnParallelLinear would give for a (possibly
        # kv-replicated) total of tp * local heads.
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp.size
        super().__init__(
            hidden_size, output_size, bias, dtype, device, quant_config=quant_config, prefix=prefix,
            member_prefixes=member_prefixes, output_partition_sizes=[self.q_size, self.kv_size, self.kv_size],
        )

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:  # type: ignore[override]
        if shard_id == "q":
            full_heads, local_heads, offset = self.total_num_heads, self.num_heads, 0
            first_head = self.tp_rank * self.num_heads
        elif shard_id in ("k", "v"):
            full_heads, local_heads = self.total_num_kv_heads, self.num_kv_heads
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            # Covers both cases: rank*kv_local when kv heads are split, and the shared kv
            # head of this rank's query heads when they are replicated.
            first_head = self.tp_rank * self.total_num_kv_heads // self.tp_size
        else:
            raise AssertionError(f"unknown qkv shard id {shard_id!r}")
        size = local_heads * self.head_size
        copy_shard(
            param, loaded, 0, offset, first_head * self.head_size, size, full_heads * self.head_size,
            f"{shard_id}_proj",
        )


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial sums are all-reduced.

    The input arrives already split along its last dimension (the output of a column
    parallel layer). The bias is replicated and added once, after the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool = True,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, tp.size, "input size")
        self.reduce_results = reduce_results
        self.quant_method = linear_method(quant_config, prefix)
        self.quant_method.create_weights(self, [output_size], self.input_size_per_partition, True, dtype, device)
        for param in _weight_params(self):
            param.weight_loader = self.weight_loader
        if bias:
            self.bias = new_parameter((output_size,), dtype, device)
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        shard = self.input_size_per_partition
        copy_shard(param, loaded, 1, 0, self.tp_rank * shard, shard, self.input_size, "row-parallel layer")

    def bias_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, (self.output_size,), "row-parallel bias")
        param.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = self.quant_method.apply(self, x, None)
        if self.reduce_results:
            out = get_tp_group().all_reduce(out)
        # Unreduced partial sums get the bias on one rank only, so that it is counted once
        # whenever the caller reduces them.
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            out = out + self.bias
        return out


class ReplicatedLinear(nn.Module):
    """y = x W^T + b with the whole W on every rank (an MoE block's router gate: small, and
    every rank must pick the same experts from the same logits)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = new_parameter((output_size, input_size), dtype, device)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = new_parameter((output_size,), dtype, device)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, tuple(param.shape), "replicated layer")
        param.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
