"""Runs one rank's share of each step: its layers, the hop to the next stage, the sampler.

Every rank of every stage executes every step in the same order (SPMD), which is what
keeps the collectives of the TP group and the stage hops matched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shared.config import ModelConfig, StageLayout
from shared.proto import stage_worker_pb2 as pb
from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.distributed import RankPlacement, StageHop, get_tp_group
from stage_worker.input_batch import InputBatch, build_input_batch
from stage_worker.kv_cache import KVCache, bytes_per_block
from stage_worker.layers.sampler import Sampler, SamplerOutput
from stage_worker.layers.sequence_parallel import padded_num_tokens, shard_rows
from stage_worker.loader import load_weights
from stage_worker.models.registry import build_model
from stage_worker.sequence_state import SequenceTable, StepLimits, StepRejected

# The CPU has no memory to profile against: without an explicit budget the cache gets this.
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LoadSummary:
    parameter_names: list[str]
    parameter_bytes: int
    bytes_read: int
    load_seconds: float


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        layout: StageLayout,
        placement: RankPlacement,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.layout = layout
        self.placement = placement
        self.dtype = dtype
        self.device = device
        self.model = build_model(
            config, layout, dtype, device, sequence_parallel=placement.parallel.sequence_parallel
        )
        # The residual stream stays token-sharded between the TP matmuls, and across the hop.
        self.sequence_parallel: bool = self.model.sequence_parallel
        self.sampler = Sampler() if layout.is_last else None
        self.sequences = SequenceTable()
        self.kv_cache: KVCache | None = None
        self.block_size = 0
        self.hop: StageHop | None = None

    # ---- setup -------------------------------------------------------------------------

    def load(self) -> LoadSummary:
        report = load_weights(self.model, self.config.model_path)
        return LoadSummary(
            parameter_names=self.model.checkpoint_parameter_names(),
            parameter_bytes=self.model.parameter_bytes(),
            bytes_read=report.bytes_read,
            load_seconds=report.seconds,
        )

    def attach_hop(self) -> None:
        """After the process group exists."""
        self.hop = StageHop(self.placement)

    @torch.inference_mode()
    def profile(self, request: pb.ProfileRequest) -> pb.ProfileResponse:
        """Runs a peak-sized forward of this stage's own layers (no hop) and sizes the KV cache."""
        block_bytes = bytes_per_block(
            self.config,
            self.model.num_local_kv_heads,
            self.layout.num_layers,
            request.block_size,
            self.dtype,
        )
        weight_bytes = self.model.parameter_bytes()
        num_tokens = max(1, request.max_num_batched_tokens)
        peak_activation = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        self._profile_forward(num_tokens, max(1, min(request.max_num_seqs, num_tokens)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak_activation = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
        if request.kv_cache_bytes > 0:
            budget = request.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Memory outside this process's allocator (CUDA context, NCCL buffers, other
            # processes) counts against the utilisation target too.
            outside = total - free - torch.cuda.memory_reserved(self.device)
            util = request.gpu_memory_utilization or 0.9
            budget = int(total * util) - outside - weight_bytes - peak_activation
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = max(0, budget // block_bytes)
        return pb.ProfileResponse(
            num_blocks=int(num_blocks),
            weight_bytes=weight_bytes,
            peak_activation_bytes=max(0, peak_activation),
            block_bytes=block_bytes,
            kv_budget_bytes=max(0, budget),
        )

    def _profile_forward(self, num_tokens: int, num_seqs: int) -> None:
        # One long prompt is the worst case for the reference attention's score matrix.
        metadata = AttentionMetadata.for_prefill_without_cache([num_tokens], self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.max_position_embeddings
        if self.layout.is_first:
            input_ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
            hidden = self.model(input_ids, positions, None, metadata)
        else:
            in_rows = shard_rows(num_tokens, get_tp_group().size) if self.sequence_parallel else num_tokens
            hidden = torch.randn(in_rows, self.config.hidden_size, device=self.device, dtype=self.dtype)
            hidden = self.model(None, positions, hidden, metadata)
        if self.layout.is_last:
            assert self.sampler is not None
            rows = hidden[-num_seqs:]
            logits = self.model.compute_logits(rows)
            params = [pb.StageSamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(num_seqs)]
            self.sampler(logits, params, [[0]] * num_seqs, [[]] * num_seqs)

    def init_cache(self, request: pb.InitCacheRequest) -> pb.InitCacheResponse:
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv_cache = KVCache.for_model(self.model, request.num_blocks, request.block_size)
        self.kv_cache.bind(self.model)
        self.block_size = request.block_size
        return pb.InitCacheResponse(kv_cache_bytes=self.kv_cache.nbytes)

    # ---- steps -------------------------------------------------------------------------

    def limits(self) -> StepLimits:
        return StepLimits(
            vocab_size=self.config.vocab_size,
            max_position=self.config.max_position_embeddings,
            block_size=self.block_size,
            num_blocks=self.kv_cache.num_blocks if self.kv_cache is not None else 0,
        )

    @torch.inference_mode()
    def execute(self, step: pb.StepRequest) -> pb.StepResult:
        started = time.perf_counter()
        result = pb.StepResult(step_id=step.step_id, stage_index=self.layout.stage_index)
        try:
            batch_seqs = self.sequences.apply(step, self.limits())
        except StepRejected as exc:
            # Every stage rejects the same step the same way, before any collective or hop.
            result.error = str(exc)
            return result
        batch = build_input_batch(
            list(step.seqs), batch_seqs, self.block_size, self.device, self.layout.is_first
        )
        hidden = self._forward(batch)
        if self.layout.is_last and batch.sampled_seqs:
            output = self._sample(hidden, batch)
            if self.placement.tp_rank == 0:
                _fill_tokens(result, batch, output)
        result.compute_seconds = time.perf_counter() - started
        return result

    def _forward(self, batch: InputBatch) -> torch.Tensor:
        num_tokens = batch.num_tokens
        tp = get_tp_group()
        # Each TP rank carries 1/tp of the token rows over the hop; pad rows to a multiple of tp.
        padded = padded_num_tokens(num_tokens, tp.size)
        rows = padded // tp.size
        if self.layout.is_first:
            hidden = self.model(batch.input_ids, batch.positions, None, batch.attn_metadata)
        else:
            assert self.hop is not None
            part = self.hop.recv((rows, self.config.hidden_size), self.dtype, self.device)
            if not self.sequence_parallel:
                # [padded, hidden] once every rank's slice is gathered, then the padding dropped.
                part = tp.all_gather(part, dim=0)[:num_tokens]
            hidden = self.model(None, batch.positions, part, batch.attn_metadata)
        if not self.layout.is_last:
            assert self.hop is not None
            if self.sequence_parallel:
                # Already this rank's token shard: it goes over the hop as it is.
                self.hop.send(hidden)
            else:
                if padded != num_tokens:
                    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padded - num_tokens))
                self.hop.send(hidden[tp.rank * rows : (tp.rank + 1) * rows])
        return hidden

    def _sample(self, hidden: torch.Tensor, batch: InputBatch) -> SamplerOutput:
        assert self.sampler is not None
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        seqs = batch.sampled_seqs
        return self.sampler(
            logits,
            [s.sampling for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
        )


def _fill_tokens(result: pb.StepResult, batch: InputBatch, output: SamplerOutput) -> None:
    # One device-to-host copy per tensor for the whole batch.
    token_ids = output.token_ids.tolist()
    logprobs = output.logprobs.tolist()
    top_ids = output.top_token_ids.tolist()
    top_lps = output.top_logprobs.tolist()
    for i, seq in enumerate(batch.sampled_seqs):
        token = result.tokens.add(seq_id=seq.seq_id, token_id=token_ids[i], logprob=logprobs[i])
        k = seq.sampling.top_logprobs
        for tid, lp in zip(top_ids[i][:k], top_lps[i][:k]):
            token.top.add(token_id=tid, logprob=lp)
