"""Token sampling on the last stage, after ``compute_logits``.

Vectorised over the batch, the same code on CPU and GPU, no host sync per token. Rows are
independent, so the batch is processed in chunks of rows (see ``CHUNK_BYTES``): the
float32 work buffers then scale with the chunk, not with max_num_seqs, and the results are
the same bit for bit as in one pass. Per sequence, in this order:

1. **Penalties** (skipped entirely when no sequence in the batch uses one), applied to the
   raw logits before temperature, so they also change greedy picks:

   * ``repetition_penalty`` (1 = off), over every token of prompt + output, with
     transformers' ``RepetitionPenaltyLogitsProcessor`` semantics: a positive logit is
     divided by the penalty, any other is multiplied by it.
   * ``presence_penalty`` / ``frequency_penalty`` (0 = off), over OUTPUT tokens only, with
     OpenAI semantics: ``logit -= presence * (count > 0) + frequency * count``.

2. **temperature == 0**: greedy, ``argmax`` of the penalised logits; ties go to the lowest
   token id. top_k / top_p / min_p do not apply.

3. Otherwise ``logits / temperature``, then
   * ``top_k`` (0 = off): keep the tokens whose logit is >= the k-th largest (ties at the
     boundary are all kept, as in transformers);
   * ``top_p`` (1 = off): on the renormalised top_k distribution, keep the smallest
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

The parameters arrive resolved by the router (shared/sampling_params.py holds the rules: each
value's range and the one value that turns it off); the sampler asserts them, never remaps them.

**Host work per step** is vectorised too: one pass over the params fills a numpy table
(the rules' assert and the row keys are numpy ops on it), the
token ids of the rows that use a penalty become one flat int64 array grouped by row, and all
of it reaches the device in a single copy; each chunk takes views of it at offsets the host
already knows. Nothing inside the sampler reads back from the device; the caller does one
``.tolist()`` of the result.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from shared.proto import stage_worker_pb2
from shared.sampling_params import within_bounds
from stage_worker.host_upload import upload

# A python int, an int64 tensor or a uint64 numpy array: the hash code below works on all
# three, bit for bit.
_Int = TypeVar("_Int", int, torch.Tensor, np.ndarray)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
# Multipliers of a well-tested 32-bit integer finaliser (xorshift-multiply, two rounds).
_MIX_MUL_1 = 0x7FEB352D
_MIX_MUL_2 = 0x846CA68B
# Distinct odd constants so seed halves, positions and vocab ids hash in different streams.
_SEED_HI_SALT = 0x9E3779B9
_POSITION_SALT = 0x85EBCA6B
_VOCAB_SALT = 0xC2B2AE35

# Columns of the per-row parameter table. float64 holds every value exactly (the uint32
# top_k and row key included), and each group the device wants in one dtype is contiguous,
# so one conversion kernel serves it.
_TEMPERATURE, _TOP_P, _MIN_P = 0, 1, 2  # -> float32; top_p 1.0 = off
_REPETITION, _PRESENCE, _FREQUENCY = 3, 4, 5  # -> float32; repetition 1.0 = off
_TOP_K, _ROW_KEY = 6, 7  # -> int64; top_k 0 = off
_NUM_COLUMNS = 8

# Rows per chunk: as many as keep one float32 [rows, vocab] buffer within this many bytes.
# A chunk holds about a dozen buffers of that size at once (its float32 logits, their
# log_softmax, the penalised and scaled copies, the sort's values and int64 order, the
# noise's int64 hash and float32 uniforms), so the peak stays in the hundreds of MiB
# whatever the batch, where one pass over 512 rows of a 128k vocab needs GiBs. 32 MiB is
# still 65 such rows: a 512-row batch takes 8 chunks, few enough that the extra kernel
# launches stay small beside a step.
CHUNK_BYTES = 32 * 2**20


def chunk_rows(vocab: int, max_rows: int | None = None) -> int:
    """Rows per chunk for ``vocab`` columns: at least 1, at most ``max_rows`` when given."""
    rows = max(1, CHUNK_BYTES // (vocab * 4))  # 4 = bytes of a float32
    return rows if max_rows is None else min(rows, max_rows)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [batch] int64
    # Logprob of the chosen token under the raw model distribution (log_softmax of the
    # unmodified logits).
    logprobs: torch.Tensor  # [batch] float32
    # k = the largest top_logprobs requested in the batch (k may be 0).
    top_token_ids: torch.Tensor  # [batch, k] int64
    top_logprobs: torch.Tensor  # [batch, k] float32


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

    The same bit operations work on python ints, on uint64 numpy arrays (the per-row keys:
    a few vectorised host ops beat ~50 tiny kernel launches) and on int64 tensors (per token).
    """
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MUL_2)
    return x ^ (x >> 16)


def _row_keys(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """32-bit hash of (uint64 seed, position) per row; uint64 arrays in and out.

    uint64 keeps the seed whole (int64 cannot), and no intermediate of ``_mix32`` comes
    near 2**64, so numpy gives the same bits as python ints would, without a python loop.
    """
    key = _mix32(seeds & _MASK32)
    key = _mix32(key ^ (((seeds >> 32) + _SEED_HI_SALT) & _MASK32))
    return _mix32(key ^ ((positions + _POSITION_SALT) & _MASK32))


def _noise(keys: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) of shape [len(keys), vocab] from int64 row keys in [0, 2**32)."""
    bits = _mix32(keys[:, None] ^ vocab_hash[None, :])  # [rows, vocab]
    # 24 bits are exact in float32; the +0.5 keeps u strictly inside (0, 1) so -log(u) > 0.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform_noise(
    seeds: Sequence[int], positions: Sequence[int], vocab_hash: torch.Tensor
) -> torch.Tensor:
    """Counter-based uniforms ``u[i, v] = hash(seeds[i], positions[i], v)`` in (0, 1).

    ``vocab_hash`` is ``_mix32`` of the salted vocab ids (see ``Sampler._vocab_hash``).
    Returns float32 of shape [len(seeds), vocab].
    """
    keys = _row_keys(
        np.fromiter(seeds, dtype=np.uint64, count=len(seeds)),
        np.fromiter(positions, dtype=np.uint64, count=len(positions)),
    )
    return _noise(upload(keys.astype(np.int64), vocab_hash.device), vocab_hash)


def uses_penalties(p: stage_worker_pb2.StageSamplingParams) -> bool:
    """Whether sampling this sequence reads the values of its earlier tokens (repetition,
    presence or frequency penalty)."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _concat_ids(seqs: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """All of ``seqs`` back to back as one int64 array of length ``total``."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if all(isinstance(s, array) and s.itemsize == 8 and s.typecode in "ql" for s in seqs):
        # 64-bit arrays copy at memcpy speed; python ints cost ~20 ns each to unbox.
        buffer = array("q")
        for s in seqs:
            if s.typecode == "q":
                buffer.extend(s)
            else:  # 'l': the same 64-bit layout, but extend() wants the same typecode
                buffer.frombytes(memoryview(s).cast("B"))
        return np.frombuffer(buffer, dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)


def _flat_ids(
    rows: np.ndarray, token_lists: Sequence[Sequence[Sequence[int]]], vocab: int, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk-local flat ids of the tokens of ``rows``, grouped by row, and their count per row.

    For each ``row`` in ``rows`` (ascending), every token of ``lists[row]`` for each ``lists``
    in ``token_lists`` becomes ``(row % chunk_rows) * vocab + token``: chunks start at
    multiples of ``chunk_rows``, so that is the index into the chunk's [rows, vocab] logits,
    and grouping by ascending row makes each chunk's ids one contiguous slice. Flat indices
    let gather/scatter do the updates: 2-D advanced indexing synchronises with the host on CUDA.
    """
    seqs = [lists[r] for r in rows.tolist() for lists in token_lists]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    tokens = _concat_ids(seqs, int(lengths.sum()))
    row_base = np.repeat(rows % chunk_rows * vocab, len(token_lists))  # [len(seqs)]
    per_row = lengths.reshape(len(rows), len(token_lists)).sum(axis=1)  # [len(rows)]
    return np.repeat(row_base, lengths) + tokens, per_row  # [sum(lengths)], [len(rows)]


def _chunk_offsets(counts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Prefix sums of the per-row ``counts`` at the chunk ``bounds``: chunk ``i`` owns items
    ``[out[i], out[i + 1])`` of an array holding ``counts[row]`` items per row, in row order."""
    return np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))[bounds]


def _scatter_counts(batch: int, rows: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """[batch] counts: ``per_row[i]`` at ``rows[i]``, 0 for the rows not listed."""
    counts = np.zeros(batch, dtype=np.int64)
    counts[rows] = per_row
    return counts


@dataclass(frozen=True)
class _Chunk:
    """The sampler's inputs for rows [start, end) of the batch: views of one device buffer,
    with row indices local to the chunk."""

    start: int
    end: int
    table: torch.Tensor  # [rows, _NUM_COLUMNS] float64, columns as named above
    num_sampled: int  # rows with temperature > 0
    sample_rows: torch.Tensor | None  # [num_sampled] int64; None when all rows or none sample
    # Whether any SAMPLED row of the chunk uses each filter: unused filters are skipped.
    uses_top_k: bool
    uses_top_p: bool
    uses_min_p: bool
    # Flat ids (local row * vocab + token, repeats allowed) of prompt + output tokens of the
    # rows with a repetition penalty, and of output tokens of the rows with presence/frequency.
    repetition_ids: torch.Tensor | None
    output_ids: torch.Tensor | None


@dataclass(frozen=True)
class _StepInputs:
    """The sampler's per-row inputs on the device, from one host->device copy."""

    chunks: tuple[_Chunk, ...]  # consecutive, covering the batch (one empty chunk for batch 0)
    max_top_logprobs: int


def _prepare(
    params: Sequence[stage_worker_pb2.StageSamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab: int,
    device: torch.device,
    chunk_rows: int,
) -> _StepInputs:
    """Moves everything the sampler needs to ``device`` at once, cut in chunks of
    ``chunk_rows`` rows (the last one ragged)."""
    batch = len(params)
    raw = np.array(
        [
            (
                p.temperature,
                p.top_p,
                p.min_p,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
                p.top_k,
                p.top_logprobs,
            )
            for p in params
        ],
        dtype=np.float64,
    ).reshape(batch, 8)  # [batch, 8]; the reshape also covers batch 0 (which comes out 1-D)
    temperature, top_p, min_p, repetition, presence, frequency, top_k, top_logprobs = raw.T
    # The stage asserted each sequence's parameters on arrival (sequence_state.py); this
    # vectorised check of the same rules costs a few numpy ops per step.
    assert within_bounds(temperature, top_p, min_p, repetition, presence, frequency).all(), (
        f"sampling parameters outside the rules (shared/sampling_params.py): {raw.tolist()}"
    )

    table = np.empty((batch, _NUM_COLUMNS), dtype=np.float64)
    top_p_on = top_p < 1.0
    repetition_on = repetition != 1.0
    table[:, _TEMPERATURE] = temperature
    table[:, _TOP_P] = top_p
    table[:, _MIN_P] = min_p
    # 1.0 leaves a logit untouched, so rows without the penalty need no special case.
    table[:, _REPETITION] = repetition
    table[:, _PRESENCE] = presence
    table[:, _FREQUENCY] = frequency
    table[:, _TOP_K] = top_k
    seeds = np.fromiter((p.seed for p in params), dtype=np.uint64, count=batch)
    # The position of the token being sampled.
    positions = np.fromiter(
        (len(a) + len(b) for a, b in zip(prompt_token_ids, output_token_ids)),
        dtype=np.uint64,
        count=batch,
    )
    table[:, _ROW_KEY] = _row_keys(seeds, positions)

    sampled = temperature > 0.0
    num_sampled = int(sampled.sum())
    # [num_chunks + 1] row bounds; batch 0 gets one empty chunk, so it takes the same path.
    bounds = np.append(np.arange(0, max(batch, 1), chunk_rows), batch)
    # One int64 buffer: the table's bits, then the optional index arrays.
    parts = [table.view(np.int64).ravel()]
    sample_offsets = _chunk_offsets(sampled, bounds).tolist()
    if 0 < num_sampled < batch:
        parts.append(np.flatnonzero(sampled).astype(np.int64) % chunk_rows)
    repetition_offsets: list[int] | None = None
    output_offsets: list[int] | None = None
    repetition_rows = np.flatnonzero(repetition_on).astype(np.int64)
    if repetition_rows.size:
        token_lists = (prompt_token_ids, output_token_ids)
        ids, per_row = _flat_ids(repetition_rows, token_lists, vocab, chunk_rows)
        parts.append(ids)
        counts = _scatter_counts(batch, repetition_rows, per_row)
        repetition_offsets = _chunk_offsets(counts, bounds).tolist()
    output_rows = np.flatnonzero((presence != 0.0) | (frequency != 0.0)).astype(np.int64)
    if output_rows.size:
        ids, per_row = _flat_ids(output_rows, (output_token_ids,), vocab, chunk_rows)
        parts.append(ids)
        output_offsets = _chunk_offsets(_scatter_counts(batch, output_rows, per_row), bounds).tolist()
    sizes = [part.size for part in parts]
    on_device = upload(np.concatenate(parts), device)

    pieces = iter(on_device.split(sizes))
    table_on_device = next(pieces).view(torch.float64).view(batch, _NUM_COLUMNS)
    all_sample_rows = next(pieces) if 0 < num_sampled < batch else None
    repetition_ids = next(pieces) if repetition_rows.size else None
    output_ids = next(pieces) if output_rows.size else None
    # Per chunk, how many sampled rows use each filter.
    top_k_users = np.diff(_chunk_offsets(sampled & (top_k > 0), bounds)).tolist()
    top_p_users = np.diff(_chunk_offsets(sampled & top_p_on, bounds)).tolist()
    min_p_users = np.diff(_chunk_offsets(sampled & (min_p > 0.0), bounds)).tolist()

    def ids_of(ids: torch.Tensor | None, offsets: list[int] | None, i: int) -> torch.Tensor | None:
        # Host-known offsets: slicing is a view, no kernel and no sync.
        if ids is None or offsets is None or offsets[i] == offsets[i + 1]:
            return None
        return ids[offsets[i] : offsets[i + 1]]

    chunks = []
    for i, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        chunk_sampled = sample_offsets[i + 1] - sample_offsets[i]
        some_sampled = 0 < chunk_sampled < end - start
        chunks.append(
            _Chunk(
                start=start,
                end=end,
                table=table_on_device[start:end],
                num_sampled=chunk_sampled,
                sample_rows=ids_of(all_sample_rows, sample_offsets, i) if some_sampled else None,
                uses_top_k=bool(top_k_users[i]),
                uses_top_p=bool(top_p_users[i]),
                uses_min_p=bool(min_p_users[i]),
                repetition_ids=ids_of(repetition_ids, repetition_offsets, i),
                output_ids=ids_of(output_ids, output_offsets, i),
            )
        )
    return _StepInputs(chunks=tuple(chunks), max_top_logprobs=int(top_logprobs.max(initial=0)))


def _penalise(logits: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """Penalised copy of ``logits`` [rows, vocab], the rows of ``chunk``.

    Only the (row, token) pairs in the id lists are read and written: O(tokens), not
    O(batch * vocab). Every value is computed exactly as the dense form
    ``where(seen, where(x > 0, x / r, x * r), x) - (presence * (count > 0) + frequency * count)``
    would (the same float32 ops on the same operands), and repeated ids all write the same
    value, so the scatter order does not matter.
    """
    # Contiguous whatever the input's strides, so the flat view below exists.
    logits = logits.clone(memory_format=torch.contiguous_format)
    flat = logits.view(-1)  # [rows * vocab]
    vocab = logits.shape[1]
    weights = chunk.table[:, _REPETITION : _FREQUENCY + 1].to(logits.dtype)  # [rows, 3]
    if chunk.repetition_ids is not None:
        ids = chunk.repetition_ids
        values = flat.gather(0, ids)
        penalty = weights[:, 0].index_select(0, ids // vocab)
        flat.scatter_(0, ids, torch.where(values > 0, values / penalty, values * penalty))
    if chunk.output_ids is not None:
        ids = chunk.output_ids
        # Occurrences of each id among the ids, by binary search in the sorted list: no
        # [batch, vocab] count buffer and no data-dependent size (which would sync).
        ordered = ids.sort().values
        count = (
            torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
        ).to(logits.dtype)
        rows = ids // vocab
        presence = weights[:, 1].index_select(0, rows)
        frequency = weights[:, 2].index_select(0, rows)
        values = flat.gather(0, ids)
        flat.scatter_(0, ids, values - (presence * (count > 0).to(logits.dtype) + frequency * count))
    return logits


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[stage_worker_pb2.StageSamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Penalised copy of ``logits`` [batch, vocab]; see the module docstring for semantics."""
    batch, vocab = logits.shape
    # One chunk: the result is a whole-batch copy anyway.
    inputs = _prepare(
        params, prompt_token_ids, output_token_ids, vocab, logits.device, chunk_rows=max(batch, 1)
    )
    (chunk,) = inputs.chunks
    return _penalise(logits, chunk)


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

    def __init__(self, max_chunk_rows: int | None = None) -> None:
        """``max_chunk_rows`` caps the rows per chunk below what ``CHUNK_BYTES`` allows
        (tests use it to get many chunks from small batches)."""
        assert max_chunk_rows is None or max_chunk_rows >= 1, max_chunk_rows
        self.max_chunk_rows = max_chunk_rows
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
        logits: torch.Tensor,  # [batch, vocab] float32 or the model's dtype
        params: list[stage_worker_pb2.StageSamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> SamplerOutput:
        """Token ids may be python lists or 64-bit ``array.array`` (the fastest to pack)."""
        batch, vocab = logits.shape
        assert len(params) == len(prompt_token_ids) == len(output_token_ids) == batch, (
            f"{batch} logit rows but {len(params)} params, {len(prompt_token_ids)} prompts, "
            f"{len(output_token_ids)} outputs"
        )
        rows = chunk_rows(vocab, self.max_chunk_rows)
        inputs = _prepare(params, prompt_token_ids, output_token_ids, vocab, logits.device, rows)
        # Every chunk returns the same k columns, so their top logprobs concatenate.
        k = min(inputs.max_top_logprobs, vocab)
        outs = [self._sample_chunk(logits[c.start : c.end], c, k) for c in inputs.chunks]
        if len(outs) == 1:
            return outs[0]
        return SamplerOutput(
            token_ids=torch.cat([o.token_ids for o in outs]),
            logprobs=torch.cat([o.logprobs for o in outs]),
            top_token_ids=torch.cat([o.top_token_ids for o in outs]),
            top_logprobs=torch.cat([o.top_logprobs for o in outs]),
        )

    def _sample_chunk(
        self,
        logits: torch.Tensor,  # [rows, vocab], the chunk's rows of the caller's logits
        chunk: _Chunk,
        k: int,
    ) -> SamplerOutput:
        # float32 one chunk at a time: with model-dtype logits, no float32 copy of the batch.
        logits = logits.float()
        rows = logits.shape[0]

        raw_logprobs = logits.log_softmax(dim=-1)  # [rows, vocab]

        if chunk.repetition_ids is not None or chunk.output_ids is not None:
            logits = _penalise(logits, chunk)

        if rows > 0 and chunk.num_sampled == rows:
            token_ids = self._sample(logits, chunk.table, chunk)
        else:
            token_ids = logits.argmax(dim=-1)  # greedy; argmax returns the first (lowest) max
            if chunk.sample_rows is not None:
                sample_rows = chunk.sample_rows
                sampled = self._sample(
                    logits.index_select(0, sample_rows),
                    chunk.table.index_select(0, sample_rows),
                    chunk,
                )
                token_ids.index_copy_(0, sample_rows, sampled)

        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [rows]
        if k > 0:
            top_logprobs, top_token_ids = raw_logprobs.topk(k, dim=-1, sorted=True)  # [rows, k]
        else:
            top_logprobs = torch.empty(rows, 0, dtype=torch.float32, device=logits.device)
            top_token_ids = torch.empty(rows, 0, dtype=torch.int64, device=logits.device)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=chosen,
            top_token_ids=top_token_ids,
            top_logprobs=top_logprobs,
        )

    def _sample(
        self,
        logits: torch.Tensor,  # [rows, vocab], penalised
        table: torch.Tensor,  # [rows, _NUM_COLUMNS] float64, the same rows
        chunk: _Chunk,
    ) -> torch.Tensor:
        floats = table[:, _TEMPERATURE : _MIN_P + 1].to(logits.dtype)  # [rows, 3]
        scaled = logits / floats[:, :1]
        top_k = table[:, _TOP_K].to(torch.int64) if chunk.uses_top_k else None
        top_p = floats[:, 1] if chunk.uses_top_p else None
        min_p = floats[:, 2] if chunk.uses_min_p else None
        if top_k is not None or top_p is not None or min_p is not None:
            scaled = scaled.masked_fill(truncation_mask(scaled, top_k, top_p, min_p), float("-inf"))
        probs = scaled.softmax(dim=-1)  # removed tokens get exactly 0
        keys = table[:, _ROW_KEY].to(torch.int64)
        u = _noise(keys, self._vocab_hash(logits.shape[1], logits.device))
        return (probs / -torch.log(u)).argmax(dim=-1)
