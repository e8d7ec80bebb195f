"""The Triton paged-attention kernels against the reference Attention (plain torch).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (float32), so CPU CI
checks their index arithmetic and masking: prefill, decode, chunked prefill after a cached
prefix, mixed batches, GQA ratios 1/2/3/4/8, block sizes 8/16/32 with shuffled block ids,
head_dim 16/32/48, CUDA-graph padding rows, float16 storage, and the split-KV decode path
(max_query_len 1) with one split and several, contexts shorter than one split, more
splits than the context has tiles, and sequences without a query. Unused cache slots and
block-table padding hold NaN, so a kernel that reads what it should mask fails. The `gpu`
tests repeat the check in bf16 at a Llama-3-8B shape, and replay the decode step from a
CUDA graph (on a GPU host: `python3 -m pytest -q tests/gpu/test_triton_attention.py`).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.layers import triton_decode_attention
from stage_worker.layers.attention import Attention
from stage_worker.layers.layer_kv_cache import LayerKVCache, new_scales, quantize_rows
from stage_worker.layers.triton_attention import paged_attention, store_kv_cache
from stage_worker.layers.triton_decode_attention import decode_num_splits

pytestmark = pytest.mark.timeout(300)

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")


@dataclass(frozen=True)
class Case:
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    # Tile overrides (None: the wrapper's choice), to cover several tiles with tiny inputs.
    block_m: int | None = None
    block_n: int | None = None
    # Graph-style extras: padding sequences (q_len 1, context_len 0, slot -1) after the real
    # ones, and rows past query_start_loc[-1] that nothing may write.
    num_padding_seqs: int = 0
    num_trailing_rows: int = 0
    # Grid sized for more queries than any sequence has (a captured graph's bound).
    extra_max_query_len: int = 0
    # Decode kernel choice (None: the wrapper's, split-KV when max_query_len is 1) and the
    # split-KV path's split count (None: the wrapper's choice).
    split_kv: bool | None = None
    num_splits: int | None = None


@dataclass
class Batch:
    query: torch.Tensor  # [num_rows, num_heads, head_dim], a strided view of a fused qkv
    key: torch.Tensor  # [num_rows, num_kv_heads, head_dim]
    value: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [num_rows] int32, -1 on padding rows
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with a NaN block
    max_query_len: int
    num_real_tokens: int  # rows of the real sequences (padding rows follow them)
    metadata: AttentionMetadata  # the real sequences only, for the reference
    # An FP8 cache's per-row scales [num_blocks, block_size, num_kv_heads] float32 (NaN
    # where the cache is NaN); None for a cache in the activations' dtype.
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def cache(self) -> LayerKVCache:
        return LayerKVCache(self.k_cache, self.v_cache, self.k_scale, self.v_scale)


def make_batch(case: Case, dtype: torch.dtype, device: torch.device, seed: int, fp8: bool = False) -> Batch:
    """fp8: the cached rows are stored quantized (an FP8 cache with per-row scales)."""
    gen = torch.Generator().manual_seed(seed)
    bs, kvh, d = case.block_size, case.num_kv_heads, case.head_dim
    blocks_per_seq = [(c + bs - 1) // bs for c in case.context_lens]
    # Shuffled, non-contiguous ids; the spare blocks stay NaN and one of them pads the tables.
    num_blocks = 2 * sum(blocks_per_seq) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [ids[sum(blocks_per_seq[:i]) : sum(blocks_per_seq[: i + 1])] for i in range(len(blocks_per_seq))]
    nan_block = ids[-1]

    def cache() -> torch.Tensor:
        c = torch.full((num_blocks, bs, kvh, d), float("nan"))
        for ctx, table in zip(case.context_lens, tables):
            # The first ctx slots: the cached prefix, and the new tokens' slots (overwritten).
            rows = c[table].view(-1, kvh, d)  # [len(table) * bs, kvh, d]
            rows[:ctx] = torch.randn(ctx, kvh, d, generator=gen)
            c[table] = rows.view(-1, bs, kvh, d)
        return c

    k_cache, v_cache = cache(), cache()

    slots, starts = [], [0]
    for ctx, q_len, table in zip(case.context_lens, case.query_lens, tables):
        slots += [table[p // bs] * bs + p % bs for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    num_real = starts[-1]
    for _ in range(case.num_padding_seqs):
        slots.append(-1)
        starts.append(starts[-1] + 1)
    num_rows = starts[-1] + case.num_trailing_rows
    slots += [-1] * case.num_trailing_rows

    # q, k, v as views of one fused [num_rows, (heads + 2 * kv_heads) * head_dim] projection,
    # as the model hands them over: row stride larger than heads * head_dim.
    width = (case.num_heads + 2 * kvh) * d
    # Moved before the split: a .to() after it would copy each view into a contiguous tensor.
    qkv = torch.randn(num_rows, width, generator=gen).to(device, dtype)
    q, k, v = qkv.split([case.num_heads * d, kvh * d, kvh * d], dim=1)
    num_seqs = len(case.context_lens) + case.num_padding_seqs
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((num_seqs, max_blocks), nan_block, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)

    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots[:num_real], dtype=torch.long, device=device),
        query_start_loc=starts[: len(case.context_lens) + 1],
        start_positions=[c - q for c, q in zip(case.context_lens, case.query_lens)],
        context_lens=list(case.context_lens),
        block_tables=[torch.tensor(t, dtype=torch.long, device=device) for t in tables],
        block_size=bs,
    )
    k_scale = v_scale = None
    if fp8:
        (k_cache, k_rows), (v_cache, v_rows) = quantize_rows(k_cache), quantize_rows(v_cache)
        # In the serving layout (head-major within a block), as the kernels will meet it.
        k_scale, v_scale = new_scales(*k_rows.shape, device), new_scales(*v_rows.shape, device)
        k_scale.copy_(k_rows)
        v_scale.copy_(v_rows)
    return Batch(
        query=q.view(num_rows, case.num_heads, d),
        key=k.view(num_rows, kvh, d),
        value=v.view(num_rows, kvh, d),
        k_cache=k_cache.to(device) if fp8 else k_cache.to(device, dtype),
        v_cache=v_cache.to(device) if fp8 else v_cache.to(device, dtype),
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(
            list(case.context_lens) + [0] * case.num_padding_seqs, dtype=torch.int32, device=device
        ),
        block_tables=block_tables.to(device),
        max_query_len=max(case.query_lens + (1,) * case.num_padding_seqs) + case.extra_max_query_len,
        num_real_tokens=num_real,
        metadata=metadata,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def reference(case: Case, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, LayerKVCache]:
    """(out [num_real_tokens, heads, head_dim], the cache after the step's write) from the
    reference Attention computing in `dtype` (an FP8 cache stays FP8, dequantized to `dtype`)."""
    n, h, d = batch.num_real_tokens, case.num_heads, case.head_dim
    attn = Attention(h, case.num_kv_heads, d, scale=d**-0.5)
    c = batch.cache
    if c.quantized:
        attn.kv_cache = LayerKVCache(c.key.clone(), c.value.clone(), c.key_scale.clone(), c.value_scale.clone())
    else:
        attn.kv_cache = LayerKVCache(c.key.to(dtype).clone(), c.value.to(dtype).clone())
    out = attn(
        batch.query[:n].to(dtype).reshape(n, h * d),
        batch.key[:n].to(dtype).reshape(n, -1),
        batch.value[:n].to(dtype).reshape(n, -1),
        batch.metadata,
    )
    return out.view(n, h, d), attn.kv_cache


def run_kernels(case: Case, batch: Batch) -> torch.Tensor:
    """The Triton path on copies of the batch's caches (left in batch.k_cache/v_cache)."""
    store_kv_cache(
        batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping, batch.k_scale, batch.v_scale
    )
    out = torch.full_like(batch.query, float("nan"))  # contiguous, unlike the query view
    result = paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.context_lens,
        batch.block_tables, batch.max_query_len, case.head_dim**-0.5, out=out,
        block_m=case.block_m, block_n=case.block_n, split_kv=case.split_kv, num_splits=case.num_splits,
        k_scale=batch.k_scale, v_scale=batch.v_scale,
    )
    assert result is out
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_same_cache(batch: Batch, ref: LayerKVCache, dtype: torch.dtype) -> None:
    """The kernel's cache write equals the reference's bit for bit (a copy, or the same
    quantization), and padding slots (-1) wrote nothing (NaNs compare equal)."""
    if ref.quantized:
        assert torch.equal(batch.k_cache.view(torch.uint8), ref.key.view(torch.uint8))
        assert torch.equal(batch.v_cache.view(torch.uint8), ref.value.view(torch.uint8))
        torch.testing.assert_close(batch.k_scale, ref.key_scale, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(batch.v_scale, ref.value_scale, rtol=0, atol=0, equal_nan=True)
        return
    torch.testing.assert_close(batch.k_cache, ref.key.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(batch.v_cache, ref.value.to(dtype), rtol=0, atol=0, equal_nan=True)


def check_case(
    case: Case, dtype: torch.dtype, ref_dtype: torch.dtype, tol: float, seed: int, fp8: bool = False
) -> None:
    batch = make_batch(case, dtype, DEVICE, seed, fp8=fp8)
    ref_out, ref_cache = reference(case, batch, ref_dtype)
    out = run_kernels(case, batch)
    assert_same_cache(batch, ref_cache, dtype)

    n = batch.num_real_tokens
    real = out[:n]
    assert not real.isnan().any(), "a real query row was not written (or read masked NaN)"
    err = relative_error(real, ref_out)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
    padded_end = batch.query_start_loc[-1].item()
    assert torch.equal(out[n:padded_end], torch.zeros_like(out[n:padded_end])), "padding rows must be zeros"
    assert out[padded_end:].isnan().all(), "rows past query_start_loc[-1] must be untouched"


CPU_CASES = {
    # Fresh prompts of different lengths; 33 tokens x 2 heads = 66 rows: five 16-row programs.
    "prefill-gqa2-bs8-d32": Case((17, 5, 33, 1), (17, 5, 33, 1), 4, 2, 32, 8, block_m=16, block_n=16),
    "decode-gqa4-bs16-d16": Case((1, 9, 40, 16, 23), (1,) * 5, 8, 2, 16, 16, block_n=16),
    "chunked-gqa1-bs8-d48": Case((40, 29), (8, 13), 2, 2, 48, 8, block_m=16, block_n=16),
    # Prefill, decode, a chunk and a sequence with nothing to do this step, in one batch.
    "mixed-gqa4-bs16-d48": Case((30, 7, 12, 50, 3), (30, 1, 4, 1, 0), 4, 1, 48, 16, block_m=16, block_n=16),
    # A tile inside one block (block_size 32 > BLOCK_N 16) and the wrapper's default tiles.
    "mixed-gqa2-bs32-d16": Case((45, 70, 2), (45, 1, 2), 4, 2, 16, 32, block_n=16),
    "mixed-gqa2-bs8-defaults": Case((70, 9, 20), (3, 9, 1), 4, 2, 32, 8),
    # CUDA-graph padding: context_len 0 rows give zeros and write no cache slot; a grid for a
    # larger max_query_len; rows past the last sequence left alone.
    "decode-padded-gqa2-bs16-d32": Case(
        (5, 33, 17), (1, 1, 1), 4, 2, 32, 16, num_padding_seqs=3, num_trailing_rows=2, extra_max_query_len=3
    ),
    "mixed-padded-gqa4-bs8-d48": Case(
        (19, 6), (19, 1), 8, 2, 48, 8, block_m=16, block_n=16, num_padding_seqs=2, num_trailing_rows=1
    ),
    # The flat tile numbering: long chunks among decode rows and idle sequences, GQA 3 (a
    # 16-row tile straddles tokens), padding after them; sequence i's tiles start at
    # (query_start_loc[i] * 3) // 16 + i.
    "mixed-flat-tiles-gqa3-bs8-d16": Case(
        (40, 9, 5, 60, 3, 2, 21), (37, 1, 0, 1, 3, 1, 21), 6, 2, 16, 8, block_m=16, block_n=16,
        num_padding_seqs=2, num_trailing_rows=1,
    ),
    # Decode through the general kernel (split_kv=False), as benchmarks compare it.
    "decode-general-gqa4-bs16-d16": Case((1, 9, 40, 16, 23), (1,) * 5, 8, 2, 16, 16, block_n=16, split_kv=False),
    # Split-KV decode. 4 splits of 16-token tiles: context 100 -> 4 chunks of 32 (the last
    # 4 tokens), 40 -> 3 chunks of 16 and an empty split, 7 and 1 -> one tile, 3 empty splits.
    "split-gqa4-bs8-d32": Case((1, 7, 40, 100, 23, 64), (1,) * 6, 8, 2, 32, 8, block_n=16, num_splits=4),
    # 7 splits (not a power of 2) and graph padding: zeros for the context_len 0 sequences,
    # rows past the last sequence untouched.
    "split-padded-gqa2-bs16-d16": Case(
        (5, 33, 70), (1, 1, 1), 4, 2, 16, 16, block_n=16, num_splits=7, num_padding_seqs=3, num_trailing_rows=2
    ),
    # GQA 3 (group not a power of 2) with head_dim 48 (masked columns).
    "split-gqa3-bs8-d48": Case((50, 9, 130), (1, 1, 1), 6, 2, 48, 8, block_n=16, num_splits=5),
    # GQA 8, a 32-token block holding two 16-token tiles.
    "split-gqa8-bs32-d16": Case((45, 100), (1, 1), 8, 1, 16, 32, block_n=16, num_splits=3),
    # One split: the decode kernel writes the output itself (no reduce), padding included.
    "split-one-gqa1-bs8-d32": Case((17, 40), (1, 1), 2, 2, 32, 8, block_n=16, num_splits=1, num_padding_seqs=1),
    # Sequences with nothing to do this step (q_len 0), one of them last: its query_start_loc
    # is the first row past the batch, which must stay untouched (with and without a reduce).
    "split-idle-seqs-gqa2-bs8-d32": Case(
        (20, 12, 35, 8), (1, 0, 1, 0), 4, 2, 32, 8, block_n=16, num_splits=3, num_trailing_rows=1
    ),
    "split-one-idle-last-gqa1-bs8-d32": Case(
        (17, 40, 9), (1, 1, 0), 2, 2, 32, 8, block_n=16, num_splits=1, num_trailing_rows=1
    ),
    # The wrapper's split count and tiles (3 programs -> 3 splits at the interpreter's 4 SMs).
    "split-defaults-gqa4-bs16-d32": Case((3, 150, 70), (1, 1, 1), 4, 1, 32, 16, num_padding_seqs=1),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_matches_reference(name: str) -> None:
    check_case(CPU_CASES[name], torch.float32, torch.float32, tol=1e-4, seed=zlib.crc32(name.encode()))


def test_allocated_output_equals_given_output() -> None:
    """Without out=, the result is a fresh contiguous tensor (query is a strided view)."""
    case = CPU_CASES["chunked-gqa1-bs8-d48"]
    batch = make_batch(case, torch.float32, DEVICE, seed=11)
    given = run_kernels(case, batch)  # also stores this step's K/V
    allocated = paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.context_lens,
        batch.block_tables, batch.max_query_len, case.head_dim**-0.5, block_m=case.block_m, block_n=case.block_n,
    )
    assert not batch.query.is_contiguous() and allocated.is_contiguous()
    assert torch.equal(allocated, given)


@pytest.mark.parametrize("name", ["mixed-gqa4-bs16-d48", "mixed-gqa2-bs8-defaults", "split-gqa4-bs8-d32"])
def test_float16_matches_float32_reference(name: str) -> None:
    """Half-precision storage (float32 math; P is rounded to the cache dtype for the PV dot)
    and the wrapper's half-precision tiles. bfloat16 is left to the GPU tests: the
    interpreter's tl.dot multiplies bfloat16 bit patterns as integers."""
    check_case(CPU_CASES[name], torch.float16, torch.float32, tol=2e-3, seed=zlib.crc32(name.encode()) + 1)


# The FP8-cache variants: prefill, decode rows among chunks with GQA 3, graph padding, and the
# split-KV decode with and without padding.
FP8_CASES = [
    "prefill-gqa2-bs8-d32",
    "mixed-flat-tiles-gqa3-bs8-d16",
    "mixed-padded-gqa4-bs8-d48",
    "split-gqa4-bs8-d32",
    "split-padded-gqa2-bs16-d16",
]


@pytest.mark.parametrize("name", FP8_CASES)
def test_fp8_cache_matches_reference(name: str) -> None:
    """An FP8 cache: the kernels' write quantizes as the reference's does (the same bytes and
    scales), and their attention over the dequantized rows matches the reference's."""
    check_case(CPU_CASES[name], torch.float32, torch.float32, tol=1e-4, seed=zlib.crc32(name.encode()) + 2, fp8=True)


@pytest.mark.parametrize("name", ["mixed-gqa4-bs16-d48", "split-gqa4-bs8-d32"])
def test_fp8_cache_float16_queries(name: str) -> None:
    """A float16 model scales the V tile rather than P (float16 cannot hold P x a small scale)."""
    check_case(CPU_CASES[name], torch.float16, torch.float32, tol=2e-3, seed=zlib.crc32(name.encode()) + 4, fp8=True)


@pytest.mark.parametrize("name", ["mixed-gqa4-bs16-d48", "split-gqa4-bs8-d32"])
def test_fp8_cache_error_against_unquantized(name: str) -> None:
    """What FP8 storage costs: the attention over an FP8 cache stays within a few percent of
    the same step over the unquantized cache (e4m3 keeps 3 mantissa bits: ~2% per value)."""
    case, seed = CPU_CASES[name], zlib.crc32(name.encode()) + 3
    exact, _ = reference(case, make_batch(case, torch.float32, DEVICE, seed), torch.float32)
    batch = make_batch(case, torch.float32, DEVICE, seed, fp8=True)
    out = run_kernels(case, batch)[: batch.num_real_tokens]
    err = relative_error(out, exact)
    assert 1e-4 < err < 0.05, f"relative error {err:.2e} of the FP8 cache against the unquantized one"


def test_fp8_store_rounds_as_torch() -> None:
    """The kernel's FP8 write rounds every value as torch's cast does (nearest, ties to even),
    at every e4m3 binade, the subnormals and the midpoints between neighbours, where a
    rounded-up mantissa carries into the exponent."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # [127] sorted, 0 .. 448
    midpoints = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(5)
    spread = torch.rand(2048, generator=gen) * 448 * torch.logspace(-4, 0, 2048)
    values = torch.cat([grid, midpoints, midpoints.nextafter(torch.tensor(0.0)), spread])
    values = torch.cat([values, -values])
    d = 64
    rows = values[: values.numel() // (d - 1) * (d - 1)].view(-1, d - 1)
    # A leading 448 in every row: its scale is exactly 1, so the row's values are cast as they are.
    rows = torch.cat([torch.full((rows.shape[0], 1), 448.0), rows], dim=1).view(-1, 1, d)  # [n, 1 head, d]
    n = rows.shape[0]
    k_cache = torch.zeros(n, 1, 1, d, dtype=torch.float8_e4m3fn, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_scale = torch.zeros(n, 1, 1, device=DEVICE)
    v_scale = torch.zeros_like(k_scale)
    slots = torch.arange(n, device=DEVICE)
    store_kv_cache(rows.to(DEVICE), rows.to(DEVICE), k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(k_scale.cpu(), torch.ones(n, 1, 1))
    expected = rows.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(k_cache.view(torch.uint8).view(n, 1, d).cpu(), expected)
    assert torch.equal(v_cache.view(torch.uint8).view(n, 1, d).cpu(), expected)


def test_fp8_rows_keep_their_own_scale() -> None:
    """Rows of very different magnitudes (a V row of 1e-3 beside a K row of 1e2) each keep
    e4m3's relative precision: a per-row scale, not one for the tensor."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(6, 4, 64, generator=gen) * torch.logspace(-3, 2, 6)[:, None, None]  # [rows, heads, d]
    rows[2, 1] = 0.0  # an all-zero row stays zero
    values, scale = quantize_rows(rows)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (6, 4)
    back = values.float() * scale[..., None]
    assert torch.equal(back[2, 1], torch.zeros(64))
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    # e4m3 rounds to 3 mantissa bits (half an ulp: 2**-4 relative) above its subnormals,
    # which start 2**-6 below the row's largest value.
    assert ((back - rows).abs() / amax).max() <= 2**-4


def test_split_counts_agree() -> None:
    """The split count changes only the float32 summation order, not the result."""
    case = CPU_CASES["split-gqa4-bs8-d32"]
    batch = make_batch(case, torch.float32, DEVICE, seed=5)
    store_kv_cache(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)
    outs = [
        paged_attention(
            batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.context_lens,
            batch.block_tables, 1, case.head_dim**-0.5, block_n=16, split_kv=split_kv, num_splits=num_splits,
        )
        for split_kv, num_splits in ((False, None), (True, 1), (True, 2), (True, 9))
    ]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-6)


def test_split_kv_needs_decode() -> None:
    case = CPU_CASES["chunked-gqa1-bs8-d48"]
    batch = make_batch(case, torch.float32, DEVICE, seed=3)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_attention(
            batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.context_lens,
            batch.block_tables, batch.max_query_len, case.head_dim**-0.5, split_kv=True,
        )


def test_decode_num_splits_from_shapes() -> None:
    """Enough programs for DECODE_PROGRAMS_PER_SM per SM, at most one split per tile of the
    table's width, at most MAX_DECODE_SPLITS, at least 1."""
    cpu = torch.device("cpu")  # the interpreter counts _INTERPRETER_SMS SMs
    target = triton_decode_attention.DECODE_PROGRAMS_PER_SM * triton_decode_attention._INTERPRETER_SMS
    assert decode_num_splits(1, 1, 10**6, 64, cpu) == min(target, triton_decode_attention.MAX_DECODE_SPLITS)
    assert decode_num_splits(1, 2, 10**6, 64, cpu) == -(-target // 2)
    assert decode_num_splits(1, 1, 100, 64, cpu) == 2  # 100 tokens: two 64-token tiles
    assert decode_num_splits(1, 1, 0, 64, cpu) == 1
    assert decode_num_splits(target, 8, 10**6, 64, cpu) == 1


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_cache_matches_index_copy(slot_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    num_blocks, bs, kvh, d, n = 6, 8, 3, 20, 11  # 3 heads, head_dim 20: masked tiles
    # The caches are the middle of larger buffers: a write through a padding row's slot
    # (-1 -> block 0, offset -1, or block -1) would land in a guard block and show.
    k_buffer = torch.randn(num_blocks + 2, bs, kvh, d, generator=gen).to(DEVICE)
    v_buffer = torch.randn(num_blocks + 2, bs, kvh, d, generator=gen).to(DEVICE)
    k_cache, v_cache = k_buffer[1:-1], v_buffer[1:-1]
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[[2, 7]] = -1  # graph padding rows
    kv = torch.randn(n, 2 * kvh * d + 5, generator=gen).to(DEVICE)  # strided views, as from a projection
    key, value = kv[:, : kvh * d].view(n, kvh, d), kv[:, kvh * d : 2 * kvh * d].view(n, kvh, d)

    valid = slots >= 0
    expected_k, expected_v = k_buffer.clone(), v_buffer.clone()
    index = slots[valid].to(DEVICE) + bs  # rows of the buffer, past the front guard block
    expected_k.view(-1, kvh, d).index_copy_(0, index, key[valid.to(DEVICE)])
    expected_v.view(-1, kvh, d).index_copy_(0, index, value[valid.to(DEVICE)])

    store_kv_cache(key, value, k_cache, v_cache, slots.to(DEVICE, slot_dtype))
    assert torch.equal(k_buffer, expected_k)
    assert torch.equal(v_buffer, expected_v)


# ---- GPU ----

LLAMA3_8B = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "case",
    [
        # Decode at long and short contexts, a fresh prompt, chunked prefill after a prefix.
        Case((2000, 1500, 700, 1999, 64, 1024, 300, 1800), (1, 1, 700, 1, 64, 200, 1, 1), **LLAMA3_8B),
        Case((2000, 17, 1200, 1999, 513, 1024, 300, 1800), (1,) * 8, **LLAMA3_8B),
        Case((2000, 17, 1200, 1999, 513, 1024, 300, 1800), (1,) * 8, **LLAMA3_8B, split_kv=False),
        # Batch 1: the most splits (the wrapper's choice), a context that ends mid-tile.
        Case((1999,), (1,), **LLAMA3_8B),
        # Enough sequences for one split (64 x 8 programs fill an H200's 132 SMs twice): the
        # decode kernel writes the output itself.
        Case(tuple(range(1, 2000, 31))[:64], (1,) * 64, **LLAMA3_8B, num_padding_seqs=3),
    ],
    ids=["mixed", "decode", "decode-general-kernel", "decode-batch1", "decode-batch67"],
)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-cache", "fp8-cache"])
def test_bf16_llama3_shape_matches_fp32_reference(case: Case, fp8: bool) -> None:
    """fp8: the compiled kernels' FP8 write equals the reference's bit for bit, and their
    attention over it matches the reference's float32 attention over the same FP8 rows."""
    check_case(case, torch.bfloat16, torch.float32, tol=1e-2, seed=1234, fp8=fp8)


@pytest.mark.gpu
@needs_cuda
def test_decode_replays_from_cuda_graph() -> None:
    """Capture store + attention once, then replay with new contents in the same buffers:
    the kernels must take their sizes from the buffers, not from the capture-time host."""
    cases = [
        Case((2000, 17, 1200, 5), (1,) * 4, **LLAMA3_8B, num_padding_seqs=4),
        Case((33, 1999, 1, 640), (1,) * 4, **LLAMA3_8B, num_padding_seqs=4),
    ]
    batches = [make_batch(case, torch.bfloat16, DEVICE, seed) for seed, case in enumerate(cases)]
    # Static buffers large enough for every batch; each replay copies one batch in.
    static = {
        name: torch.zeros_like(getattr(batches[0], name))
        for name in ("query", "key", "value", "slot_mapping", "query_start_loc", "context_lens")
    }
    num_blocks = max(b.k_cache.shape[0] for b in batches)
    k_cache = torch.empty((num_blocks, *batches[0].k_cache.shape[1:]), dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    block_tables = torch.zeros(
        (batches[0].block_tables.shape[0], max(b.block_tables.shape[1] for b in batches)),
        dtype=torch.int32, device=DEVICE,
    )
    out = torch.empty_like(static["query"])

    def load(batch: Batch) -> None:
        for name, buffer in static.items():
            buffer.copy_(getattr(batch, name))
        # The tail past this batch's blocks is NaN: reading it would show.
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        k_cache[: batch.k_cache.shape[0]].copy_(batch.k_cache)
        v_cache[: batch.v_cache.shape[0]].copy_(batch.v_cache)
        block_tables.zero_()
        block_tables[:, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        out.fill_(float("nan"))

    def step() -> None:
        store_kv_cache(static["key"], static["value"], k_cache, v_cache, static["slot_mapping"])
        paged_attention(
            static["query"], k_cache, v_cache, static["query_start_loc"], static["context_lens"],
            block_tables, 1, LLAMA3_8B["head_dim"] ** -0.5, out=out,
        )

    load(batches[0])
    step()  # compiles both kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for case, batch in zip(cases, batches):
        ref_out, _ = reference(case, batch, torch.float32)
        load(batch)
        graph.replay()
        torch.cuda.synchronize()
        n = batch.num_real_tokens
        assert not out[:n].isnan().any()
        err = relative_error(out[:n], ref_out)
        assert err <= 1e-2, f"relative error {err:.2e}"
        assert torch.equal(out[n:], torch.zeros_like(out[n:])), "padding rows must be zeros"
