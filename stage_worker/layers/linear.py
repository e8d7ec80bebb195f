"""Tensor-parallel linear layers (vLLM's names, HF's checkpoint layout).

Every parameter carries a `weight_loader(param, loaded[, shard_id])`. `loaded` is either a
tensor or a safetensors slice object (`safe_open(...).get_slice(name)`); the loader indexes
it so that only this rank's part is read from disk.

Checkpoint layout (HF): a linear weight is [out_features, in_features]. Column parallel
splits the out dimension (dim 0), row parallel the in dimension (dim 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ConfigError
from stage_worker.distributed import get_tp_group

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


def new_parameter(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by its weight_loader, and the loader
    # checks that none was left out.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


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
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, tp.size, "output size")
        self.gather_output = gather_output
        self.weight = new_parameter((self.output_size_per_partition, input_size), dtype, device)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = new_parameter((self.output_size_per_partition,), dtype, device)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        # Same rule for weight (2-D) and bias (1-D): this rank's block of output rows.
        check_loaded_shape(loaded, (self.output_size,) + tuple(param.shape[1:]), "column-parallel layer")
        shard = param.shape[0]
        start = self.tp_rank * shard
        param.data.copy_(loaded[start : start + shard])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
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
    ) -> None:
        tp_size = get_tp_group().size
        for size in output_sizes:
            divide(size, tp_size, "output size")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, dtype, device)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:  # type: ignore[override]
        full = self.output_sizes[shard_id]
        check_loaded_shape(loaded, (full,) + tuple(param.shape[1:]), f"merged output {shard_id}")
        shard = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        start = self.tp_rank * shard
        param.data[offset : offset + shard].copy_(loaded[start : start + shard])


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
        super().__init__(hidden_size, output_size, bias, dtype, device)

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
        check_loaded_shape(
            loaded, (full_heads * self.head_size,) + tuple(param.shape[1:]), f"{shard_id}_proj"
        )
        size = local_heads * self.head_size
        start = first_head * self.head_size
        param.data[offset : offset + size].copy_(loaded[start : start + size])


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
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, tp.size, "input size")
        self.reduce_results = reduce_results
        self.weight = new_parameter((output_size, self.input_size_per_partition), dtype, device)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = new_parameter((output_size,), dtype, device)
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, (self.output_size, self.input_size), "row-parallel layer")
        shard = param.shape[1]
        start = self.tp_rank * shard
        param.data.copy_(loaded[:, start : start + shard])

    def bias_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, (self.output_size,), "row-parallel bias")
        param.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight)
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
