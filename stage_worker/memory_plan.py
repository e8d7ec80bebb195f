"""Per-stage memory from the model config alone, and a layer partition that balances it.

The KV pool is the minimum over stages of the blocks that fit after each stage's weights
and activations (router/control_plane.py), so a stage that carries the embedding or the
lm_head limits everyone unless it gets fewer layers. Everything here is arithmetic on the
config (no weights, no device), per TP rank: every rank of a stage holds the same bytes
(the vocabulary is padded to equal shards, replicated kv heads count on every rank). The
layer rules come from the serving layers themselves (kv_head_partition, pad_vocab_size),
and tests/unit/test_memory_plan.py checks the totals against models built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.config import ConfigError, ModelConfig
from shared.partition import even_layer_partition, format_partition
from shared.quantization import QuantizationConfig
from shared.sizes import format_size
from stage_worker.kv_cache import kv_block_bytes_per_layer, resolve_kv_cache_dtype
from stage_worker.layers.embed_head import pad_vocab_size
from stage_worker.layers.linear import divide, kv_head_partition
from stage_worker.layers.sampler import chunk_rows


@dataclass(frozen=True)
class MemorySettings:
    """The serving settings that decide how many KV blocks fit on a rank."""

    dtype: torch.dtype
    # --kv-cache-dtype: "auto" (K/V in dtype) or "fp8".
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    # Device memory of one rank; None when unknown (CPU, or no --gpu-memory).
    device_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    # Held back on every rank besides weights and activations (CUDA context, NCCL buffers).
    reserved_bytes: int = 0
    # > 0: a fixed KV budget per rank (what --kv-cache-bytes and the CPU default give);
    # weights then do not compete with the cache, and device_bytes is not used.
    kv_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("block size, max_num_batched_tokens and max_num_seqs must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu memory utilisation must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.device_bytes is not None and self.device_bytes <= 0:
            raise ConfigError("device memory must be positive")

    @property
    def memory_known(self) -> bool:
        return self.kv_cache_bytes > 0 or self.device_bytes is not None

    @property
    def balances_memory(self) -> bool:
        # With a fixed KV budget each stage's blocks depend only on its layer count, so the
        # even split is already the best; only a shared device budget needs balancing.
        return self.kv_cache_bytes <= 0 and self.device_bytes is not None


@dataclass(frozen=True)
class RankBytes:
    """Bytes one TP rank holds for each kind of module, in the serving dtype."""

    # A decoder layer with a dense MLP (every layer of a dense model).
    decoder_layer: int
    embedding: int
    lm_head: int
    final_norm: int
    # K and V of one block (block_size tokens) in one layer.
    kv_block_per_layer: int
    # Peak activation of one step: an estimate (the server measures the real one).
    activation: int
    # Added on the last stage: logits and sampling of max_num_seqs rows.
    sampling_activation: int
    # A decoder layer with a sparse MoE block (0 for a dense model): its attention, the
    # replicated router gate and 1/tp of every expert.
    moe_layer: int = 0
    # Every layer's bytes by global index: decoder_layer or moe_layer (ModelConfig.moe_layers).
    layer_bytes: tuple[int, ...] = ()

    def layers_bytes(self, first: int, last: int) -> int:
        """Bytes of layers [first, last)."""
        return sum(self.layer_bytes[first:last])

    @property
    def uniform_layers(self) -> bool:
        return len(set(self.layer_bytes)) <= 1


def _matrix_bytes(out: int, inp: int, quant: QuantizationConfig | None, itemsize: int) -> int:
    """Bytes of one rank's [out, in] linear weight: in the model dtype, or block-wise FP8 (one
    byte a value, a float32 scale a block, as layers/linear_methods.py holds them)."""
    if quant is None:
        return out * inp * itemsize
    blocks = -(-out // quant.block_n) * -(-inp // quant.block_k)
    return out * inp + 4 * blocks


def rank_bytes(config: ModelConfig, tp: int, settings: MemorySettings) -> RankBytes:
    itemsize = settings.dtype.itemsize
    hidden, head_dim = config.hidden_size, config.head_dim
    heads, kv_heads, _ = kv_head_partition(config.num_attention_heads, config.num_key_value_heads, tp)
    qkv_out = (heads + 2 * kv_heads) * head_dim
    quant = config.quantization

    def matrix(name: str, out: int, inp: int) -> int:
        # modules_to_not_convert is read per module; layer 0 stands for every layer.
        q = quant if quant is not None and quant.is_quantized(f"model.layers.0.{name}") else None
        return _matrix_bytes(out, inp, q, itemsize)

    # Attention and the two norms: what every layer holds besides its feed-forward (o_proj
    # row-parallel). Norms and biases are in the model dtype.
    attention = matrix("self_attn.q_proj", qkv_out, hidden) + matrix("self_attn.o_proj", hidden, heads * head_dim)
    attention += 2 * hidden * itemsize
    if config.qk_norm:
        # q_norm and k_norm: one [head_dim] weight each, replicated.
        attention += 2 * head_dim * itemsize
    if config.qkv_bias:
        attention += qkv_out * itemsize
    if config.o_proj_bias:
        # Row-parallel biases are replicated: the full hidden size on every rank.
        attention += hidden * itemsize
    dense_layers = config.num_hidden_layers - len(config.moe_layers)
    # A dense-only model checks intermediate_size; an all-MoE one never builds a dense MLP.
    inter = divide(config.intermediate_size, tp, "intermediate_size") if dense_layers else 0
    layer = attention + matrix("mlp.gate_proj", 2 * inter, hidden) + matrix("mlp.down_proj", hidden, inter)
    if config.mlp_bias:
        layer += (2 * inter + hidden) * itemsize
    moe_layer = 0
    moe_inter = 0
    if config.moe_layers:
        moe_inter = divide(config.moe_intermediate_size, tp, "moe_intermediate_size")
        # The replicated gate [experts, hidden] and, per expert, gate/up [2 * I/tp, hidden]
        # and down [hidden, I/tp] (quantized MoE checkpoints are refused by ModelConfig).
        moe_layer = attention + (config.num_experts * hidden + config.num_experts * 3 * moe_inter * hidden) * itemsize
    moe = set(config.moe_layers)
    layer_bytes = tuple(moe_layer if i in moe else layer for i in range(config.num_hidden_layers))
    vocab_rows = pad_vocab_size(config.vocab_size, tp) // tp
    tokens = settings.max_num_batched_tokens
    seqs = min(settings.max_num_seqs, tokens)
    # A rough upper bound of the profiled peak of the GPU path (Triton attention, which
    # builds no score matrix; fused MoE): the residual stream and its copies, then the larger
    # of attention and the MLP. The server measures the real value (model_runner.profile).
    attention_act = tokens * (qkv_out + (heads + kv_heads) * head_dim + 3 * heads * head_dim)
    mlp = tokens * 3 * inter
    if config.moe_layers:
        # The fused MoE holds each (token, chosen expert) pair's gate/up, activation and down
        # rows, the sorted routing, plus the router's logits and float32 probabilities
        # (counted as three model-dtype copies).
        pairs = tokens * config.num_experts_per_tok
        mlp = max(mlp, pairs * (3 * moe_inter + hidden + 4) + tokens * (hidden + 3 * config.num_experts))
    activation = (4 * tokens * hidden + max(attention_act, mlp)) * itemsize
    # Local and gathered logits in the model dtype, then float32 copies for the sampler, which
    # holds them for one chunk of rows at a time (layers/sampler.py).
    chunk = min(seqs, chunk_rows(config.vocab_size))
    sampling = seqs * vocab_rows * tp * itemsize * 2 + chunk * config.vocab_size * 4 * 3
    return RankBytes(
        decoder_layer=layer,
        embedding=vocab_rows * hidden * itemsize,
        lm_head=vocab_rows * hidden * itemsize,
        final_norm=hidden * itemsize,
        kv_block_per_layer=kv_block_bytes_per_layer(
            settings.block_size, kv_heads, head_dim, resolve_kv_cache_dtype(settings.kv_cache_dtype, settings.dtype)
        ),
        activation=activation,
        sampling_activation=sampling,
        moe_layer=moe_layer,
        layer_bytes=layer_bytes,
    )


@dataclass(frozen=True)
class StagePlan:
    stage_index: int
    first_layer: int
    last_layer: int
    # Per rank.
    weight_bytes: int
    activation_bytes: int
    kv_budget_bytes: int | None
    block_bytes: int
    # None when the memory is unknown.
    kv_blocks: int | None

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer


@dataclass(frozen=True)
class PartitionPlan:
    partition: tuple[int, ...]
    stages: tuple[StagePlan, ...]

    @property
    def pool_blocks(self) -> int | None:
        blocks = [s.kv_blocks for s in self.stages]
        return None if any(b is None for b in blocks) else min(blocks)  # type: ignore[type-var]

    @property
    def limiting_stage(self) -> int | None:
        if self.pool_blocks is None:
            return None
        return min(self.stages, key=lambda s: s.kv_blocks).stage_index  # type: ignore[arg-type, return-value]


def _stage_weight_bytes(rb: RankBytes, config: ModelConfig, stage: int, pp: int, layers: tuple[int, int]) -> int:
    """Per-rank weights of stage `stage` owning layers [layers[0], layers[1])."""
    first, last = stage == 0, stage == pp - 1
    weights = rb.layers_bytes(*layers)
    if first:
        weights += rb.embedding
    if last:
        weights += rb.final_norm
        # A tied head shares the embedding's parameter only when one stage holds both;
        # otherwise the last stage keeps its own copy of the matrix.
        if not (config.tie_word_embeddings and first):
            weights += rb.lm_head
    return weights


def _stage_activation_bytes(rb: RankBytes, stage: int, pp: int) -> int:
    return rb.activation + (rb.sampling_activation if stage == pp - 1 else 0)


def _fixed_bytes(rb: RankBytes, config: ModelConfig, stage: int, pp: int) -> int:
    """Per-rank bytes of stage `stage` that do not depend on its layer count."""
    return _stage_weight_bytes(rb, config, stage, pp, (0, 0)) + _stage_activation_bytes(rb, stage, pp)


def _usable_bytes(settings: MemorySettings) -> int:
    assert settings.device_bytes is not None
    return int(settings.device_bytes * settings.gpu_memory_utilization) - settings.reserved_bytes


def check_partition(config: ModelConfig, pp: int, partition: tuple[int, ...]) -> None:
    if len(partition) != pp or sum(partition) != config.num_hidden_layers or min(partition) < 1:
        raise ConfigError(
            f"layer partition {list(partition)} must have {pp} entries, each at least 1, summing "
            f"to the model's {config.num_hidden_layers} layers"
        )


def plan_partition(
    config: ModelConfig, pp: int, tp: int, partition: tuple[int, ...], settings: MemorySettings
) -> PartitionPlan:
    """Weights, activation, KV budget and blocks of every stage under `partition`."""
    check_partition(config, pp, partition)
    rb = rank_bytes(config, tp, settings)
    stages = []
    first = 0
    for s, n in enumerate(partition):
        weights = _stage_weight_bytes(rb, config, s, pp, (first, first + n))
        activation = _stage_activation_bytes(rb, s, pp)
        block_bytes = n * rb.kv_block_per_layer
        if settings.kv_cache_bytes > 0:
            budget: int | None = settings.kv_cache_bytes
        elif settings.device_bytes is not None:
            budget = _usable_bytes(settings) - weights - activation
        else:
            budget = None
        blocks = None if budget is None else max(0, budget) // block_bytes
        stages.append(StagePlan(s, first, first + n, weights, activation, budget, block_bytes, blocks))
        first += n
    return PartitionPlan(tuple(partition), tuple(stages))


def balanced_partition(config: ModelConfig, pp: int, tp: int, settings: MemorySettings) -> tuple[int, ...]:
    """The partition that maximises the minimum KV blocks over stages under a shared device
    budget; with a fixed KV budget (or none known) that is the even split."""
    num_layers = config.num_hidden_layers
    even = even_layer_partition(num_layers, pp)  # also the clear error for too many stages
    if not settings.balances_memory:
        return even
    rb = rank_bytes(config, tp, settings)
    # Bytes each stage has for its layers and their KV cache.
    room = [_usable_bytes(settings) - _fixed_bytes(rb, config, s, pp) for s in range(pp)]
    layer_bytes = rb.layer_bytes[0]

    def max_layers(blocks: int) -> list[int]:
        # Stage s keeps >= `blocks` blocks with n layers iff n * (layer + blocks * kv) <= room.
        per_layer = layer_bytes + blocks * rb.kv_block_per_layer
        return [min(num_layers, max(0, r) // per_layer) for r in room]

    def feasible(blocks: int) -> bool:
        if not rb.uniform_layers:
            return _mixed_layer_partition(rb, room, pp, blocks, num_layers, most_even=False) is not None
        caps = max_layers(blocks)
        return min(caps) >= 1 and sum(caps) >= num_layers

    if not feasible(1):
        plan = plan_partition(config, pp, tp, even, settings)
        worst = min(plan.stages, key=lambda st: st.kv_budget_bytes or 0)
        raise ConfigError(
            f"the model does not fit in {format_size(_usable_bytes(settings))} per rank at pp={pp}, "
            f"tp={tp}: no partition leaves room for one KV block on every stage (stage "
            f"{worst.stage_index} of the even split needs {format_size(worst.weight_bytes)} of "
            f"weights and {format_size(worst.activation_bytes)} of activations); use more stages, "
            "a larger tensor-parallel size, or a smaller max_num_batched_tokens"
        )
    low, high = 1, max(room) // rb.kv_block_per_layer + 1
    # Invariant: feasible(low), not feasible(high).
    while high - low > 1:
        mid = (low + high) // 2
        if feasible(mid):
            low = mid
        else:
            high = mid
    if not rb.uniform_layers:
        chosen = _mixed_layer_partition(rb, room, pp, low, num_layers)
        assert chosen is not None
        return chosen
    counts = max_layers(low)
    # Any counts under the caps keep every stage at >= `low` blocks: hand back the surplus
    # from the fullest stages so the result stays as even as the memory allows.
    while sum(counts) > num_layers:
        fullest = max(range(pp), key=lambda s: (counts[s], -room[s], s))
        counts[fullest] -= 1
    return tuple(counts)


def _mixed_layer_partition(
    rb: RankBytes, room: list[int], pp: int, blocks: int, num_layers: int, most_even: bool = True
) -> tuple[int, ...] | None:
    """With layers of different sizes (an MoE model with dense layers), a partition where
    every stage keeps >= `blocks` KV blocks and the largest stage has the fewest layers
    possible; None if there is none.

    Stage s can own [a, b) iff its layer bytes plus (b - a) * blocks * kv fit its room, which
    only gets harder as b grows: from a start a, the feasible ends are one range
    [a + 1, reach(a)]. The stages' reachable ends follow stage by stage (an O(pp x layers)
    sweep); the smallest cap on layers per stage that still reaches the last layer gives the
    most even partition, read back from the last stage. `most_even=False` only answers
    whether one exists (any cap).
    """
    kv = blocks * rb.kv_block_per_layer
    # cost[b]: bytes of layers [0, b) with their KV blocks; a stage's bytes are differences.
    cost = [0]
    for size in rb.layer_bytes[:num_layers]:
        cost.append(cost[-1] + size + kv)

    def reachable(cap: int) -> list[list[bool]] | None:
        # ends[s][b]: stages 0..s can own exactly layers [0, b).
        ends = [[False] * (num_layers + 1) for _ in range(pp)]
        starts = [0]
        for s in range(pp):
            for a in starts:
                b = a + 1
                while b <= min(num_layers, a + cap) and cost[b] - cost[a] <= room[s]:
                    ends[s][b] = True
                    b += 1
            starts = [b for b in range(num_layers + 1) if ends[s][b]]
        return ends if ends[pp - 1][num_layers] else None

    for cap in range(-(-num_layers // pp) if most_even else num_layers, num_layers + 1):
        ends = reachable(cap)
        if ends is None:
            continue
        counts = []
        b = num_layers
        for s in range(pp - 1, 0, -1):
            # The start of stage s: the one that leaves the remaining stages closest to even.
            options = [
                a for a in range(max(0, b - cap), b)
                if ends[s - 1][a] and cost[b] - cost[a] <= room[s]
            ]
            a = min(options, key=lambda a: (abs((b - a) - b / (s + 1)), a))
            counts.append(b - a)
            b = a
        counts.append(b)
        return tuple(reversed(counts))
    return None


@dataclass(frozen=True)
class PartitionChoice:
    partition: tuple[int, ...]
    # Why this partition: shown by `plan` and logged by `up`.
    reason: str


def default_partition(config: ModelConfig, pp: int, tp: int, settings: MemorySettings) -> PartitionChoice:
    """Memory-balanced when a shared device budget is known, otherwise the even split."""
    if settings.balances_memory:
        return PartitionChoice(
            balanced_partition(config, pp, tp, settings),
            f"memory-balanced for {format_size(settings.device_bytes or 0)} per rank",
        )
    if settings.kv_cache_bytes > 0:
        reason = "even split: with a fixed KV budget per rank, the stage with the most layers limits the pool"
    else:
        reason = "even split: the device memory is unknown"
    return PartitionChoice(even_layer_partition(config.num_hidden_layers, pp), reason)


def _plan_table(title: str, plan: PartitionPlan, block_size: int) -> list[str]:
    lines = [f"{title}  --layer-partition {format_partition(plan.partition)}"]
    lines.append(f"  {'stage':<6}{'layers':<12}{'weights/rank':>14}{'activation':>14}{'KV budget':>14}{'KV blocks':>11}")
    for st in plan.stages:
        budget = "-" if st.kv_budget_bytes is None else format_size(st.kv_budget_bytes)
        blocks = "-" if st.kv_blocks is None else str(st.kv_blocks)
        lines.append(
            f"  {st.stage_index:<6}{f'[{st.first_layer}, {st.last_layer})':<12}"
            f"{format_size(st.weight_bytes):>14}{format_size(st.activation_bytes):>14}{budget:>14}{blocks:>11}"
        )
    pool = plan.pool_blocks
    if pool is None:
        lines.append("  pool: unknown without a memory size (--gpu-memory or --kv-cache-bytes)")
    else:
        lines.append(
            f"  pool: {pool} blocks ({pool * block_size} tokens), limited by stage {plan.limiting_stage}"
        )
    return lines


def render_plan(
    config: ModelConfig,
    pp: int,
    tp: int,
    settings: MemorySettings,
    explicit: tuple[int, ...] | None = None,
    model_name: str | None = None,
) -> str:
    """What `stageserve plan` prints: the default partition and the even split side by side
    (and a given one), each with per-stage weights and KV blocks and the pool."""
    rb = rank_bytes(config, tp, settings)
    dtype = str(settings.dtype).replace("torch.", "")
    name = model_name or config.model_path.rstrip("/").rsplit("/", 1)[-1]
    layers = f"{config.num_hidden_layers} layers"
    per_layer = f"decoder layer {format_size(rb.decoder_layer)}"
    if config.moe_layers:
        dense = config.num_hidden_layers - len(config.moe_layers)
        layers += (
            f" ({len(config.moe_layers)} MoE: {config.num_experts} experts, top {config.num_experts_per_tok}"
            + (f"; {dense} dense)" if dense else ")")
        )
        per_layer = f"MoE layer {format_size(rb.moe_layer)}" + (f", dense layer {format_size(rb.decoder_layer)}" if dense else "")
    lines = [
        f"{name}: {config.architecture}, {layers}, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings; {dtype}"
        + (f", linear weights {config.quantization.describe()}" if config.quantization else "")
        + f", pp={pp}, tp={tp}",
        f"per rank: {per_layer}, embedding {format_size(rb.embedding)}, "
        f"lm_head {format_size(rb.lm_head)}; KV block of {settings.block_size} tokens: "
        f"{format_size(rb.kv_block_per_layer)} per layer"
        + (" (FP8 K/V with per-row scales)" if settings.kv_cache_dtype == "fp8" else ""),
    ]
    if settings.kv_cache_bytes > 0:
        lines.append(f"KV budget per rank: {format_size(settings.kv_cache_bytes)} (fixed)")
    elif settings.device_bytes is not None:
        lines.append(
            f"memory per rank: {format_size(settings.device_bytes)} x {settings.gpu_memory_utilization:g}"
            f" - {format_size(settings.reserved_bytes)} reserved = {format_size(_usable_bytes(settings))};"
            f" activations estimated for {settings.max_num_batched_tokens} tokens,"
            f" {settings.max_num_seqs} sequences"
        )
    else:
        lines.append("memory per rank: unknown (give --gpu-memory or --kv-cache-bytes for KV blocks)")
    choice = default_partition(config, pp, tp, settings)
    default_plan = plan_partition(config, pp, tp, choice.partition, settings)
    even_plan = plan_partition(config, pp, tp, even_layer_partition(config.num_hidden_layers, pp), settings)
    lines += ["", *_plan_table(f"default ({choice.reason})", default_plan, settings.block_size)]
    if choice.partition != even_plan.partition:
        lines += ["", *_plan_table("even split", even_plan, settings.block_size)]
        if default_plan.pool_blocks is not None and even_plan.pool_blocks:
            gain = default_plan.pool_blocks / even_plan.pool_blocks - 1
            lines += ["", f"default vs even split: {gain * 100:+.1f}% KV blocks"]
    elif settings.balances_memory:
        lines += ["", "the even split is already the balanced one: no other partition gives a larger pool"]
    if explicit is not None and explicit not in (choice.partition, even_plan.partition):
        lines += ["", *_plan_table("given", plan_partition(config, pp, tp, explicit, settings), settings.block_size)]
    return "\n".join(lines)
