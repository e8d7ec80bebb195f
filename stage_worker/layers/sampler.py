"""Token sampling on the last stage, after ``compute_logits``.

One vectorised pass over the batch, the same code on CPU and GPU, no host sync per token.
Per sequence, in this order:

1. **Penalties** (skipped entirely when no sequence in the batch uses one), applied to the
   raw logits before temperature, so they also change greedy picks:

   * ``repetition_penalty`` (0 or 1 = off), over every token of prompt + output, with
     transformers' ``RepetitionPenaltyLogitsProcessor`` semantics: a positive logit is
     divided by the penalty, any other is multiplied by it.
   * ``presence_penalty`` / ``frequency_penalty`` (0 = off), over OUTPUT tokens only, with
     OpenAI semantics: ``logit -= presence * (count > 0) + frequency * count``.

2. **temperature == 0**: greedy, ``argmax`` of the penalised logits; ties go to the lowest
   token id. top_k / top_p / min_p do not apply.

3. Otherwise ``logits / temperature``, then
   * ``top_k`` (0 = off): keep the tokens whose logit is >= the k-th largest (ties at the
     boundary are all kept, as in transformers);
   * ``top_p`` (0 or 1 = off): on the renormalised top_k distribution, keep the smallest
     prefix of tokens, by descending probability, whose mass reaches top_p (the most
     likely token is always kept);
   * ``min_p`` (0 = off): keep tokens with ``prob >= min_p * max_prob``;
   then sample from what is left.

**Seeded, batch-invariant sampling.** Every request carries a uint64 ``seed``. The noise of
token ``v`` at sequence position ``pos`` (the index of the token being sampled, i.e.
``len(prompt) + len(output)``) is a pure function ``u = hash(seed, pos, v)`` in (0, 1),
computed with integer tensor ops. The sampled token is ``argmax(probs / E)`` with
``E = -log(u)`` (an exponential race: ``E_v / p_v`` is exponential with rate ``p_v``, and the
smallest one wins with probability ``p_v``). So the same (seed, logits, position) gives the
same token whatever else is in the batch, with no ``torch.Generator`` per request; the
integer hash is bit-identical on CPU and CUDA, the float part is identical within a device
type.

**Log-probabilities** always come from ``log_softmax`` of the raw, unmodified logits: the
model's own distribution, whatever penalties or truncation did to the pick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from shared.proto import stage_worker_pb2

# A python int or an int64 tensor: the hash code below works on both, bit for bit.
_Int = TypeVar("_Int", int, torch.Tensor)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
# Multipliers of a well-tested 32-bit integer finaliser (xorshift-multiply, two rounds).
_MIX_MUL_1 = 0x7FEB352D
_MIX_MUL_2 = 0x846CA68B
# Distinct odd constants so seed halves, positions and vocab ids hash in different streams.
_SEED_HI_SALT = 0x9E3779B9
_POSITION_SALT = 0x85EBCA6B
_VOCAB_SALT = 0xC2B2AE35


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [batch] int64
    # Logprob of the chosen token under the raw model distribution (log_softmax of the
    # unmodified logits).
    logprobs: torch.Tensor  # [batch] float32
    # k = the largest top_logprobs requested in the batch (k may be 0).
    top_token_ids: torch.Tensor  # [batch, k] int64
    top_logprobs: torch.Tensor  # [batch, k] float32


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor from python values on ``device`` without a host sync.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory and waits for the
    stream; going through pinned memory with ``non_blocking`` only queues the copy (the
    caching host allocator keeps the pinned buffer alive until the copy has run).
    """
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _mul32(x: _Int, constant: int) -> _Int:
    """``(x * constant) mod 2**32`` for ``x`` in [0, 2**32) without int64 overflow.

    A plain 32x32-bit product needs 64 bits and would overflow int64 (signed overflow is
    not something to rely on across devices). Split the constant in 16-bit halves:
    ``x * lo`` stays below 2**48, and of ``x * hi << 16`` only the low 16 bits of
    ``x * hi`` survive the final mask, which depend only on the low 16 bits of ``x``.
    """
    lo = constant & _MASK16
    hi = constant >> 16
    return (x * lo + (((x & _MASK16) * hi) << 16)) & _MASK32


def _mix32(x: _Int) -> _Int:
    """A 32-bit avalanche finaliser on values in [0, 2**32).

    The same bit operations work on python ints (for the per-row keys: a handful of
    python ops per row beats ~50 tiny kernel launches) and on int64 tensors (per token).
    """
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MUL_2)
    return x ^ (x >> 16)


def _row_key(seed: int, position: int) -> int:
    """32-bit hash of (uint64 seed, position), in python ints (int64 cannot hold a uint64)."""
    key = _mix32(seed & _MASK32)
    key = _mix32(key ^ (((seed >> 32) + _SEED_HI_SALT) & _MASK32))
    return _mix32(key ^ ((position + _POSITION_SALT) & _MASK32))


def uniform_noise(
    seeds: Sequence[int], positions: Sequence[int], vocab_hash: torch.Tensor
) -> torch.Tensor:
    """Counter-based uniforms ``u[i, v] = hash(seeds[i], positions[i], v)`` in (0, 1).

    ``vocab_hash`` is ``_mix32`` of the salted vocab ids (see ``Sampler._vocab_hash``).
    Returns float32 of shape [len(seeds), vocab].
    """
    keys = to_device([_row_key(s, p) for s, p in zip(seeds, positions)], torch.int64, vocab_hash.device)
    bits = _mix32(keys[:, None] ^ vocab_hash[None, :])  # [batch, vocab]
    # 24 bits are exact in float32; the +0.5 keeps u strictly inside (0, 1) so -log(u) > 0.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sampling_param_problems(p: stage_worker_pb2.StageSamplingParams) -> list[str]:
    """What is wrong with `p` under the semantics above (NaN fails every comparison); the
    stage checks this when a sequence arrives, so a bad value rejects a step, not a rank."""
    problems = []
    if not (p.temperature >= 0.0 and math.isfinite(p.temperature)):
        problems.append(f"temperature={p.temperature} (allowed: finite, >= 0; 0 = greedy)")
    if not (0.0 <= p.top_p <= 1.0):
        problems.append(f"top_p={p.top_p} (allowed: 0..1; 0 or 1 = off)")
    if not (0.0 <= p.min_p <= 1.0):
        problems.append(f"min_p={p.min_p} (allowed: 0..1; 0 = off)")
    if not (p.repetition_penalty >= 0.0 and math.isfinite(p.repetition_penalty)):
        problems.append(
            f"repetition_penalty={p.repetition_penalty} (allowed: finite, > 0; 0 or 1 = off)"
        )
    if not math.isfinite(p.presence_penalty):
        problems.append(f"presence_penalty={p.presence_penalty} (allowed: finite)")
    if not math.isfinite(p.frequency_penalty):
        problems.append(f"frequency_penalty={p.frequency_penalty} (allowed: finite)")
    return problems


def _check_params(p: stage_worker_pb2.StageSamplingParams, index: int) -> None:
    problems = sampling_param_problems(p)
    if problems:
        raise ValueError(f"invalid sampling parameters for batch row {index}: " + "; ".join(problems))


def _uses_repetition(p: stage_worker_pb2.StageSamplingParams) -> bool:
    return p.repetition_penalty not in (0.0, 1.0)


def _uses_output_penalty(p: stage_worker_pb2.StageSamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _flat_token_index(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """Indices into a flattened [batch, vocab] tensor of every token of ``token_lists[r]``.

    Flat indices let scatter/index_add do the update: 2-D advanced-index assignment
    synchronises with the host on CUDA.
    """
    row_ids: list[int] = []
    token_ids: list[int] = []
    for r in rows:
        tokens = token_lists[r]
        row_ids.extend([r] * len(tokens))
        token_ids.extend(tokens)
    return to_device(row_ids, torch.int64, device) * vocab + to_device(token_ids, torch.int64, device)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[stage_worker_pb2.StageSamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Penalised copy of ``logits`` [batch, vocab]; see the module docstring for semantics."""
    logits = logits.clone()
    batch, vocab = logits.shape
    device = logits.device

    rep_rows = [i for i, p in enumerate(params) if _uses_repetition(p)]
    if rep_rows:
        seen = torch.zeros(batch * vocab, dtype=torch.bool, device=device)
        for token_lists in (prompt_token_ids, output_token_ids):
            seen.index_fill_(0, _flat_token_index(rep_rows, token_lists, vocab, device), True)
        seen = seen.view(batch, vocab)
        # Rows without the penalty get 1.0, which leaves their logits untouched.
        penalty = to_device(
            [p.repetition_penalty if _uses_repetition(p) else 1.0 for p in params], logits.dtype, device
        )[:, None]  # [batch, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)

    out_rows = [i for i, p in enumerate(params) if _uses_output_penalty(p)]
    if out_rows:
        flat = _flat_token_index(out_rows, output_token_ids, vocab, device)
        counts = torch.zeros(batch * vocab, dtype=logits.dtype, device=device)
        # Adding ones: exact in float32 whatever order the atomics land in.
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=logits.dtype))
        counts = counts.view(batch, vocab)
        weights = to_device(
            [[p.presence_penalty, p.frequency_penalty] for p in params], logits.dtype, device
        )  # [batch, 2]
        presence, frequency = weights[:, :1], weights[:, 1:]
        logits -= presence * (counts > 0).to(logits.dtype) + frequency * counts
    return logits


def truncation_mask(
    scaled_logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean [batch, vocab] mask of the tokens top_k, top_p and min_p remove.

    ``scaled_logits`` are already divided by the temperature. Per row: ``top_k`` int64 with
    0 = off, ``top_p`` with 1 = off, ``min_p`` with 0 = off; ``None`` when no row of the
    batch uses that filter (the caller knows from the params, so no device sync here).
    """
    batch, vocab = scaled_logits.shape
    removed = torch.zeros(batch, vocab, dtype=torch.bool, device=scaled_logits.device)
    if top_k is not None or top_p is not None:
        # One descending sort serves both top_k and top_p.
        sorted_logits, order = scaled_logits.sort(dim=-1, descending=True)  # [batch, vocab]
        sorted_removed = torch.zeros_like(removed)
        if top_k is not None:
            k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
            kth = sorted_logits.gather(1, (k - 1)[:, None])  # [batch, 1]
            sorted_removed |= sorted_logits < kth
        if top_p is not None:
            # top_p acts on the distribution top_k left.
            probs = sorted_logits.masked_fill(sorted_removed, float("-inf")).softmax(dim=-1)
            # Mass of the strictly more likely tokens: a token survives while that mass is
            # still short of top_p, which always keeps the first one.
            mass_before = probs.cumsum(dim=-1) - probs
            # Rows with top_p off skip the test: float cumsums can reach 1.0 before the tail.
            sorted_removed |= (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
        removed.scatter_(1, order, sorted_removed)
    if min_p is not None:
        # Relative to the max prob, min_p does not care about renormalisation after
        # top_k/top_p (the most likely token always survives them).
        probs = scaled_logits.softmax(dim=-1)
        removed |= probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return removed


class Sampler:
    """Turns last-stage logits into one token per sequence; see the module docstring."""

    def __init__(self) -> None:
        # The vocab part of the hash depends only on (vocab, device): compute it once.
        self._vocab_hash_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _vocab_hash(self, vocab: int, device: torch.device) -> torch.Tensor:
        key = (vocab, device)
        cached = self._vocab_hash_cache.get(key)
        if cached is None:
            ids = torch.arange(vocab, dtype=torch.int64, device=device)
            cached = _mix32((ids + _VOCAB_SALT) & _MASK32)
            self._vocab_hash_cache[key] = cached
        return cached

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, vocab] float32
        params: list[stage_worker_pb2.StageSamplingParams],
        prompt_token_ids: list[Sequence[int]],
        output_token_ids: list[Sequence[int]],
    ) -> SamplerOutput:
        batch, vocab = logits.shape
        assert len(params) == len(prompt_token_ids) == len(output_token_ids) == batch, (
            f"{batch} logit rows but {len(params)} params, {len(prompt_token_ids)} prompts, "
            f"{len(output_token_ids)} outputs"
        )
        for i, p in enumerate(params):
            _check_params(p, i)
        device = logits.device
        logits = logits.float()

        raw_logprobs = logits.log_softmax(dim=-1)  # [batch, vocab]

        if any(_uses_repetition(p) or _uses_output_penalty(p) for p in params):
            logits = apply_penalties(logits, params, prompt_token_ids, output_token_ids)

        token_ids = logits.argmax(dim=-1)  # greedy; argmax returns the first (lowest) max
        sample_rows = [i for i, p in enumerate(params) if p.temperature > 0.0]
        if sample_rows:
            all_rows = len(sample_rows) == batch
            rows = None if all_rows else to_device(sample_rows, torch.int64, device)
            sampled = self._sample(
                logits if rows is None else logits.index_select(0, rows),
                [params[i] for i in sample_rows],
                [len(prompt_token_ids[i]) + len(output_token_ids[i]) for i in sample_rows],
            )
            if rows is None:
                token_ids = sampled
            else:
                token_ids.index_copy_(0, rows, sampled)

        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [batch]
        k = min(max((p.top_logprobs for p in params), default=0), vocab)
        if k > 0:
            top_logprobs, top_token_ids = raw_logprobs.topk(k, dim=-1, sorted=True)  # [batch, k]
        else:
            top_logprobs = torch.empty(batch, 0, dtype=torch.float32, device=device)
            top_token_ids = torch.empty(batch, 0, dtype=torch.int64, device=device)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=chosen,
            top_token_ids=top_token_ids,
            top_logprobs=top_logprobs,
        )

    def _sample(
        self,
        logits: torch.Tensor,  # [rows, vocab], penalised
        params: list[stage_worker_pb2.StageSamplingParams],
        positions: list[int],
    ) -> torch.Tensor:
        device = logits.device
        # 0 means off for top_p, like 1: map both to 1.0 so one comparison handles them.
        floats = to_device(
            [[p.temperature, p.top_p if 0.0 < p.top_p < 1.0 else 1.0, p.min_p] for p in params],
            logits.dtype,
            device,
        )  # [rows, 3]
        scaled = logits / floats[:, :1]
        top_k = top_p = min_p = None
        if any(p.top_k > 0 for p in params):
            top_k = to_device([p.top_k for p in params], torch.int64, device)
        if any(0.0 < p.top_p < 1.0 for p in params):
            top_p = floats[:, 1]
        if any(p.min_p > 0.0 for p in params):
            min_p = floats[:, 2]
        if top_k is not None or top_p is not None or min_p is not None:
            scaled = scaled.masked_fill(truncation_mask(scaled, top_k, top_p, min_p), float("-inf"))
        probs = scaled.softmax(dim=-1)  # removed tokens get exactly 0
        u = uniform_noise([p.seed for p in params], positions, self._vocab_hash(logits.shape[1], device))
        return (probs / -torch.log(u)).argmax(dim=-1)
