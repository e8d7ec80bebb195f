"""Mixture-of-experts feed-forward under tensor parallelism (vLLM's FusedMoE layout).

Every TP rank holds 1/tp of every expert's intermediate dimension: the gate and up
projections are column-parallel and stacked as one `w13_weight` [num_experts, 2 * I/tp,
hidden], the down projection row-parallel as `w2_weight` [num_experts, hidden, I/tp]. A
token's routed experts then run on every rank over that rank's slice, and the per-rank
partial sums of the whole block need one all-reduce (or, with sequence parallelism, one
reduce-scatter by the caller), however many experts a token visits. The routing itself is
replicated: every rank computes the same gate logits from the same input and so picks the
same experts.

Checkpoints store each expert separately (HF keys `experts.N.gate_proj`, `.up_proj`,
`.down_proj`, Mixtral's `experts.N.w1`, `.w3`, `.w2`); each loads through the stacked
parameter's weight_loader with the shard id (expert id, "w1" | "w3" | "w2").

The reference path (CPU, and the parity baseline) sorts the (token, expert) pairs by expert
and loops over the experts that received tokens. The Triton path (layers/triton_fused_moe.py,
`kernel_backend == "triton"`) groups the pairs on the device and runs one grouped GEMM launch
per projection; it reads nothing back to the host, so decode steps are captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.distributed import get_tp_group
from stage_worker.layers.linear import Loaded, check_loaded_shape, divide, new_parameter

# Shard ids of one expert's projections: w1 = gate_proj, w3 = up_proj (both column
# parallel, stacked in w13_weight in that order), w2 = down_proj (row parallel).
EXPERT_SHARDS = ("w1", "w2", "w3")


def fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: router_logits [num_tokens, num_experts] -> (weights float32
    [num_tokens, top_k], expert ids int64 [num_tokens, top_k]).

    The softmax runs in float32 over all experts before the top-k, as transformers' Qwen3-MoE
    and Mixtral routers do; `renormalize` rescales the k weights to sum to 1.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, k) pairs grouped by expert: topk_ids [num_tokens, top_k] ->

    * order [num_tokens * top_k]: flat pair indices (token * top_k + k), expert by expert
      (stable: within an expert, by token);
    * counts [num_experts]: pairs per expert, so expert e's pairs are
      order[sum(counts[:e]) : sum(counts[:e + 1])].
    """
    flat = topk_ids.reshape(-1)  # [num_tokens * top_k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


class FusedMoE(nn.Module):
    """The experts of one sparse MoE block: forward(x, topk_weights, topk_ids) -> the weighted
    sum over each token's experts, [num_tokens, hidden], all-reduced over the TP group unless
    reduce_results is False (the caller then reduces, e.g. reduce-scatters by tokens)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_per_partition = divide(intermediate_size, tp.size, "moe_intermediate_size")
        self.reduce_results = reduce_results
        local = self.intermediate_size_per_partition
        # [num_experts, gate rows | up rows, hidden]: this rank's slice of both projections.
        self.w13_weight = new_parameter((num_experts, 2 * local, hidden_size), dtype, device)
        # [num_experts, hidden, this rank's slice of the intermediate dim]
        self.w2_weight = new_parameter((num_experts, hidden_size, local), dtype, device)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        # See layers/kernel_backend.py.
        self.kernel_backend = "reference"

    @property
    def supports_cuda_graphs(self) -> bool:
        """The reference path reads the experts' token counts on the host, so it cannot be
        captured (model_runner.py then runs decode steps eagerly); the Triton path can."""
        return self.kernel_backend == "triton"

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, str]) -> None:
        expert_id, shard = shard_id
        assert 0 <= expert_id < self.num_experts, f"expert {expert_id} of {self.num_experts}"
        local = self.intermediate_size_per_partition
        # This rank's block of the intermediate dimension, as in Column/RowParallelLinear.
        start = self.tp_rank * local
        if shard in ("w1", "w3"):
            check_loaded_shape(loaded, (self.intermediate_size, self.hidden_size), f"expert {expert_id} {shard}")
            offset = 0 if shard == "w1" else local
            param.data[expert_id, offset : offset + local].copy_(loaded[start : start + local])
        elif shard == "w2":
            check_loaded_shape(loaded, (self.hidden_size, self.intermediate_size), f"expert {expert_id} w2")
            param.data[expert_id].copy_(loaded[:, start : start + local])
        else:
            raise AssertionError(f"unknown expert shard {shard!r}")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden]; topk_weights [num_tokens, top_k] (the product with an expert's
        output is taken in their dtype, then cast to x's); topk_ids [num_tokens, top_k]."""
        if self.kernel_backend == "triton":
            from stage_worker.layers.triton_fused_moe import fused_moe

            out = fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        else:
            out = self._forward_reference(x, topk_weights, topk_ids)
        if self.reduce_results and self.tp_size > 1:
            out = get_tp_group().all_reduce(out)
        return out

    def _forward_reference(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        order, counts = sort_by_expert(topk_ids, self.num_experts)
        flat_weights = topk_weights.reshape(-1)  # [num_tokens * top_k]
        local = self.intermediate_size_per_partition
        # One host sync for the counts: the reference path sizes each expert's batch on the host.
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            # Flat pair index -> its token (pairs are token * top_k + k).
            tokens = pairs // self.top_k
            gate_up = F.linear(x[tokens], self.w13_weight[expert])  # [count, 2 * local]
            h = F.silu(gate_up[:, :local]) * gate_up[:, local:]  # [count, local]
            y = F.linear(h, self.w2_weight[expert])  # [count, hidden], a partial sum under TP
            # Experts are added in ascending order, the order transformers' loop adds them.
            out.index_add_(0, tokens, (y * flat_weights[pairs, None]).to(out.dtype))
        return out
