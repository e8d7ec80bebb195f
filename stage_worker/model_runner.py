"""Runs one rank's share of each step: its layers, the hop to the next stage, the sampler.

Every rank of every stage executes every step in the same order (SPMD), which is what
keeps the collectives of the TP group and the stage hops matched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.config import ModelConfig, StageLayout
from shared.proto import stage_worker_pb2 as pb
from shared.sampling_params import SamplingParams
from shared.step_timeline import open_timeline
from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.cuda_graphs import DecodeGraphs, capture_sizes
from stage_worker.distributed import RankPlacement, StageHop, get_tp_group
from stage_worker.input_batch import InputBatch, build_input_batch
from stage_worker.kv_cache import KVCache, bytes_per_block, check_kv_cache_dtype, resolve_kv_cache_dtype
from stage_worker.layers.kernel_backend import resolve_kernel_backend, set_kernel_backend
from stage_worker.layers.sampler import Sampler, SamplerOutput, uses_penalties
from stage_worker.layers.sequence_parallel import padded_num_tokens, shard_rows
from stage_worker.loader import load_weights
from stage_worker.memory_profile import (
    ProfileStep,
    heaviest_step,
    largest_decode_step,
    logits_rows,
    positions_of,
    scratch_metadata,
)
from stage_worker.models.registry import build_model
from stage_worker.rank_timeline import RankTimeline, timing_event
from stage_worker.sampled_tokens import SampledTokens, SamplerHostCopy, TokenForward
from stage_worker.sequence_state import SequenceTable, StageSequence, StepLimits, StepRejected

logger = logging.getLogger(__name__)

# The CPU has no memory to profile against: without an explicit budget the cache gets this.
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass
class LaunchedStep:
    """A step whose device work is enqueued; `ModelRunner.finish` completes its result."""

    result: pb.StepResult
    started: float
    # When `launch` returned (None for a step rejected before launching): the "wait" phase
    # runs from here to the result being ready.
    launched_at: float | None = None
    # Last stage only: the sampler's output and its copy to the host, and for each sampled
    # row its sequence id and top-logprob count (read here, not from the sequence table,
    # which later steps change while this one finishes).
    output: SamplerOutput | None = None
    host_copy: SamplerHostCopy | None = None
    seq_ids: list[int] = field(default_factory=list)
    top_logprobs: list[int] = field(default_factory=list)
    # Last stage on CUDA, a step that samples: events around its device work ("device" phase).
    device_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None


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
        load_format: str = "auto",
        kernel_backend: str = "auto",
        enforce_eager: bool = False,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.config = config
        # "auto": the checkpoint in config.model_path; "dummy": random weights, no files read.
        self.load_format = load_format
        self.layout = layout
        self.placement = placement
        self.dtype = dtype
        self.device = device
        check_kv_cache_dtype(kv_cache_dtype, device)
        # K/V storage: the model dtype, or FP8 (--kv-cache-dtype fp8).
        self.cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        self.model = build_model(
            config, layout, dtype, device, sequence_parallel=placement.parallel.sequence_parallel
        )
        # The residual stream stays token-sharded between the TP matmuls, and across the hop.
        self.sequence_parallel: bool = self.model.sequence_parallel
        self.kernel_backend = resolve_kernel_backend(kernel_backend, device)
        set_kernel_backend(self.model, self.kernel_backend)
        # Graphs replay the Triton path only (the reference loops over sequences on the
        # host), and a sequence-parallel stage's decode rows are too few to be worth it.
        # A layer whose path in this backend is not graph-safe says so with
        # supports_cuda_graphs False (read after set_kernel_backend: FusedMoE's reference loop
        # sizes each expert's batch on the host, its Triton path does not).
        self.use_cuda_graphs = (
            device.type == "cuda"
            and self.kernel_backend == "triton"
            and not self.sequence_parallel
            and not enforce_eager
            and all(getattr(m, "supports_cuda_graphs", True) for m in self.model.modules())
        )
        self.graphs: DecodeGraphs | None = None
        self.sampler = Sampler() if layout.is_last else None
        self.sequences = SequenceTable()
        self.kv_cache: KVCache | None = None
        self.block_size = 0
        self.hop: StageHop | None = None
        # Last stage -> first stage, for sampled ids (pipelines only; see sampled_tokens.py).
        self.token_forward: TokenForward | None = None
        # STAGESERVE_TIMELINE_DIR set: this rank's rows of the step timeline.
        timeline = open_timeline(f"stage{layout.stage_index}-rank{placement.tp_rank}")
        self.timeline = RankTimeline(timeline, device) if timeline is not None else None

    # ---- setup -------------------------------------------------------------------------

    def load(self) -> LoadSummary:
        report = load_weights(self.model, self.config.model_path, load_format=self.load_format)
        return LoadSummary(
            parameter_names=self.model.checkpoint_parameter_names(),
            parameter_bytes=self.model.parameter_bytes(),
            bytes_read=report.bytes_read,
            load_seconds=report.seconds,
        )

    def attach_hop(self) -> None:
        """After the process group exists."""
        self.hop = StageHop(self.placement)
        parallel, placement = self.placement.parallel, self.placement
        if parallel.num_stages > 1 and (placement.is_first_stage or placement.is_last_stage):
            self.token_forward = TokenForward(
                first_rank=parallel.global_rank(0, placement.tp_rank),
                last_rank=parallel.global_rank(parallel.num_stages - 1, placement.tp_rank),
                is_first=placement.is_first_stage,
            )

    @torch.inference_mode()
    def profile(self, request: pb.ProfileRequest) -> pb.ProfileResponse:
        """Runs the peak-sized steps of this stage's own layers (no hop, see memory_profile.py)
        and sizes the KV cache from what is left."""
        block_bytes = bytes_per_block(
            self.config,
            self.model.num_local_kv_heads,
            self.layout.num_layers,
            request.block_size,
            self.cache_dtype,
        )
        weight_bytes = self.model.parameter_bytes()
        peak_activation = self._profile_peak(request)
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

    def _profile_peak(self, request: pb.ProfileRequest) -> int:
        """Bytes the served steps need beyond the weights and the KV cache (0 on the CPU,
        which has no allocator statistics; the steps still run, so a shape that fails fails
        here, before serving)."""
        num_tokens = max(1, request.max_num_batched_tokens)
        num_seqs = max(1, min(request.max_num_seqs, num_tokens))
        on_cuda = self.device.type == "cuda"
        if self.kernel_backend != "triton" or not on_cuda:
            # The CPU measures nothing; the forward still checks that a step of the budget runs.
            return self._measured(lambda: self._profile_reference_forward(num_tokens, num_seqs))
        block_size = max(1, request.block_size)
        scratch = KVCache.for_model(self.model, 1, block_size, self.cache_dtype)
        scratch.bind(self.model)
        try:
            step_peak = self._measured(
                lambda: self._profile_step(heaviest_step(num_tokens, num_seqs, block_size), block_size)
            )
            graph_pool = 0
            if self.use_cuda_graphs and request.max_num_seqs > 0:
                width = -(-self.config.max_position_embeddings // block_size)
                decode = largest_decode_step(capture_sizes(request.max_num_seqs)[-1], width)
                graph_pool = self._measured(lambda: self._profile_step(decode, block_size, sample=False))
        finally:
            if self.kv_cache is not None:
                self.kv_cache.bind(self.model)
            else:
                KVCache.unbind(self.model)
            del scratch
            torch.cuda.empty_cache()
        logger.info(
            "stage %d rank %d: profiled peak %.0f MiB for a step of %d tokens / %d sequences, "
            "%.0f MiB held for the decode graphs",
            self.layout.stage_index, self.placement.tp_rank, step_peak / 2**20, num_tokens, num_seqs,
            graph_pool / 2**20,
        )
        return step_peak + graph_pool

    def _measured(self, run: Callable[[], None]) -> int:
        """Peak bytes allocated while `run` runs, above what was allocated before it."""
        if self.device.type != "cuda":
            run()
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return max(0, peak)

    def _profile_step(self, step: ProfileStep, block_size: int, sample: bool = True) -> None:
        """One step of `step`'s shape through the kernels that serve it (scratch cache bound)."""
        metadata = scratch_metadata(step, block_size, self.device)
        positions = positions_of(step, self.config.max_position_embeddings, self.device)
        hidden = self._profile_layers(step.num_tokens, positions, metadata)
        if self.layout.is_last and sample:
            self._profile_sample(hidden[logits_rows(step, self.device)])

    def _profile_reference_forward(self, num_tokens: int, num_seqs: int) -> None:
        # One long prompt is the worst case for the reference attention's score matrix.
        metadata = AttentionMetadata.for_prefill_without_cache([num_tokens], self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.max_position_embeddings
        hidden = self._profile_layers(num_tokens, positions, metadata)
        if self.layout.is_last:
            self._profile_sample(hidden[-num_seqs:])

    def _profile_layers(
        self, num_tokens: int, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        if self.layout.is_first:
            input_ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
            return self.model(input_ids, positions, None, metadata)
        in_rows = shard_rows(num_tokens, get_tp_group().size) if self.sequence_parallel else num_tokens
        hidden = torch.randn(in_rows, self.config.hidden_size, device=self.device, dtype=self.dtype)
        return self.model(None, positions, hidden, metadata)

    def _profile_sample(self, rows: torch.Tensor) -> None:
        """The logits and sampler of `rows` (one per sampling sequence), nucleus sampling
        with per-sequence seeds: the sampler's most memory-hungry configuration."""
        assert self.sampler is not None
        num_seqs = rows.shape[0]
        logits = self.model.compute_logits(rows)
        params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i).to_proto() for i in range(num_seqs)]
        self.sampler(logits, params, [[0]] * num_seqs, [[]] * num_seqs)

    def init_cache(self, request: pb.InitCacheRequest) -> pb.InitCacheResponse:
        self.kv_cache = None
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv_cache = KVCache.for_model(self.model, request.num_blocks, request.block_size, self.cache_dtype)
        self.kv_cache.bind(self.model)
        self.block_size = request.block_size
        response = pb.InitCacheResponse(kv_cache_bytes=self.kv_cache.nbytes)
        if self.use_cuda_graphs and request.max_num_seqs > 0:
            # The graphs read the cache's addresses: captured after it exists, again if it changes.
            self.graphs = DecodeGraphs(
                self.model,
                max_num_seqs=request.max_num_seqs,
                max_blocks_per_seq=-(-self.config.max_position_embeddings // request.block_size),
                block_size=request.block_size,
                hidden_size=self.config.hidden_size,
                takes_input_ids=self.layout.is_first,
                dtype=self.dtype,
                device=self.device,
            )
            response.graph_capture_seconds = self.graphs.capture()
            response.cuda_graph_sizes.extend(self.graphs.sizes)
        return response

    # ---- steps -------------------------------------------------------------------------

    def limits(self) -> StepLimits:
        return StepLimits(
            vocab_size=self.config.vocab_size,
            max_position=self.config.max_position_embeddings,
            block_size=self.block_size,
            num_blocks=self.kv_cache.num_blocks if self.kv_cache is not None else 0,
            num_stages=self.placement.parallel.num_stages,
        )

    @torch.inference_mode()
    def launch(self, step: pb.StepRequest) -> "LaunchedStep":
        """Applies the step's deltas and enqueues its device work, without waiting for it:
        the caller can launch the next step before `finish`ing this one, so the host work of
        step n+1 overlaps the GPU's step n. Steps launch strictly in order."""
        started = time.perf_counter()
        result = pb.StepResult(step_id=step.step_id, stage_index=self.layout.stage_index)
        try:
            batch_seqs = self.sequences.apply(step, self.limits())
        except StepRejected as exc:
            # Every stage rejects the same step the same way, before any collective or hop.
            result.error = str(exc)
            return LaunchedStep(result, started)
        phases = result.phase_seconds
        applied = time.perf_counter()
        phases["prepare.apply"] = applied - started
        if self.layout.is_last:
            self._resolve_known_tokens(batch_seqs)
        batch = build_input_batch(
            list(step.seqs),
            batch_seqs,
            self.block_size,
            self.device,
            self.layout.is_first,
            device_metadata=self.kernel_backend == "triton",
        )
        mark = time.perf_counter()
        phases["prepare"] = mark - started
        phases["prepare.build"] = mark - applied
        phases["prepare.upload"] = mark - batch.upload_started
        # Only where the result waits for the step's device work anyway (the last stage's
        # sampled tokens) is its device time read: elsewhere reading it would hold back a
        # result that is otherwise ready at launch.
        timed = self.layout.is_last and self.device.type == "cuda" and bool(batch.sampled_seqs)
        # The step timeline (when on) brackets every step's device work, with the same events.
        timeline_device = self.timeline is not None and self.timeline.wants_device_span()
        device_start = timing_event() if timed or timeline_device else None
        hidden = self._forward(batch)
        phases["launch.forward"] = time.perf_counter() - mark
        launched = LaunchedStep(result, started)
        if batch.sampled_seqs:
            tokens = self._sampled_tokens(step, hidden, batch, launched)
            for seq in batch.sampled_seqs:
                assert seq.pending_sample is not None
                seq.pending_sample.tokens = tokens
        device_span = (device_start, timing_event()) if device_start is not None else None
        if timed:
            launched.device_span = device_span
        launched.launched_at = time.perf_counter()
        phases["launch"] = launched.launched_at - mark
        if self.timeline is not None:
            self.timeline.launched(step.step_id, len(step.seqs), started, mark, launched.launched_at, device_span)
        return launched

    def finish(self, launched: "LaunchedStep", report: bool = True) -> pb.StepResult:
        """Waits for the step's sampled tokens (last stage) and fills the result; `report`
        False (ranks whose results nobody reads) skips both. Thread-safe against `launch` of
        later steps: it reads only what `launched` holds."""
        result = launched.result
        ended: float | None = None
        if report and launched.launched_at is not None:
            # From launch to the result being ready: the sampled tokens reaching the host on
            # the last stage (the device work still running, the steps queued before it
            # included), and on every stage the time the step waited for this thread.
            packed = launched.host_copy.values() if launched.host_copy is not None else None
            ended = mark = time.perf_counter()
            result.phase_seconds["wait"] = mark - launched.launched_at
            if packed is not None:
                assert launched.output is not None  # set with host_copy, by the sampler
                _fill_tokens(result, launched.seq_ids, launched.top_logprobs, launched.output, packed)
                ended = time.perf_counter()
                result.phase_seconds["reply"] = ended - mark
            if launched.device_span is not None:
                start, end = launched.device_span
                end.synchronize()  # recorded after the host copy's event: no wait in practice
                result.phase_seconds["device"] = start.elapsed_time(end) / 1e3
        # A reported step's phases share their clock readings, so its time is exactly their
        # sum: a thread switch between two readings cannot open a gap that no phase counts.
        result.compute_seconds = (ended if ended is not None else time.perf_counter()) - launched.started
        if self.timeline is not None and launched.launched_at is not None:
            self.timeline.finished(result.step_id, launched.launched_at, launched.started + result.compute_seconds)
        return result

    def _sampled_tokens(
        self, step: pb.StepRequest, hidden: torch.Tensor, batch: InputBatch, launched: "LaunchedStep"
    ) -> SampledTokens | None:
        """Where this step's sampled ids are on this stage: the sampler's output (last stage),
        the ids the last stage forwards (first stage of a pipeline), or nowhere (middle)."""
        if self.layout.is_last:
            output = self._sample(hidden, batch)
            if step.forward_sampled_tokens and not self.layout.is_first:
                assert self.token_forward is not None
                self.token_forward.send(output.token_ids)
            # Every rank copies its tokens to the host (a later step's penalties may need
            # them); rank 0 also reports them.
            launched.output = output
            launched.host_copy = SamplerHostCopy(output)
            launched.seq_ids = [s.seq_id for s in batch.sampled_seqs]
            launched.top_logprobs = [s.sampling.top_logprobs for s in batch.sampled_seqs]
            return SampledTokens(output.token_ids, host_copy=launched.host_copy)
        if self.layout.is_first and step.forward_sampled_tokens:
            assert self.token_forward is not None
            return self.token_forward.recv(len(batch.sampled_seqs), self.device)
        return None

    def _resolve_known_tokens(self, seqs: list[StageSequence]) -> None:
        """Writes the values of deferred tokens whose host copy has landed into the
        sequences' token lists; waits for the copy only where penalties need the value."""
        for seq in seqs:
            if not seq.deferred:
                continue
            needs_values = uses_penalties(seq.sampling)
            for index, where in list(seq.deferred.items()):
                copy = where.tokens.host_copy if where.tokens is not None else None
                if copy is not None and (needs_values or copy.done()):
                    seq.output_token_ids[index] = copy.token_ids()[where.row]
                    del seq.deferred[index]

    def _forward(self, batch: InputBatch) -> torch.Tensor:
        num_tokens = batch.num_tokens
        tp = get_tp_group()
        # Each TP rank carries 1/tp of the token rows over the hop; pad rows to a multiple of tp.
        padded = padded_num_tokens(num_tokens, tp.size)
        rows = padded // tp.size
        if self.layout.is_first:
            hidden = self._run_model(batch, None)
        else:
            assert self.hop is not None
            part = self.hop.recv((rows, self.config.hidden_size), self.dtype, self.device)
            if not self.sequence_parallel:
                # [padded, hidden] once every rank's slice is gathered, then the padding dropped.
                part = tp.all_gather(part, dim=0)[:num_tokens]
            hidden = self._run_model(batch, part)
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

    def _run_model(self, batch: InputBatch, hidden_in: torch.Tensor | None) -> torch.Tensor:
        if self.graphs is not None and self.graphs.covers(batch):
            hidden = self.graphs.run(batch, hidden_in)
            # The next replay overwrites the graph's output buffer, maybe while the hop's
            # asynchronous send still reads it: what leaves the stage is a copy. The last
            # stage samples from it before the next step starts.
            return hidden if self.layout.is_last else hidden.clone()
        return self.model(batch.input_ids, batch.positions, hidden_in, batch.attn_metadata)

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


def _fill_tokens(
    result: pb.StepResult, seq_ids: list[int], top_logprobs: list[int], output: SamplerOutput, packed: list[float]
) -> None:
    n, k_max = output.token_ids.shape[0], output.top_token_ids.shape[1]
    token_ids, logprobs = packed[:n], packed[n : 2 * n]
    top_ids, top_lps = packed[2 * n : 2 * n + n * k_max], packed[2 * n + n * k_max :]
    for i, (seq_id, k) in enumerate(zip(seq_ids, top_logprobs)):
        token = result.tokens.add(seq_id=seq_id, token_id=int(token_ids[i]), logprob=logprobs[i])
        for j in range(i * k_max, i * k_max + min(k, k_max)):
            token.top.add(token_id=int(top_ids[j]), logprob=top_lps[j])
