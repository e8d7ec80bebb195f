"""Sampler: greedy, seeded batch-invariant sampling, truncation, penalties, logprobs."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from shared.proto.stage_worker_pb2 import StageSamplingParams
from shared.sampling_params import InvalidSamplingParams, SamplingParams
from stage_worker.layers import sampler as sampler_module
from stage_worker.layers.sampler import Sampler, SamplerOutput, apply_penalties, chunk_rows, uniform_noise


def stage_params(**fields: object) -> StageSamplingParams:
    """Parameters as the router sends them: resolved by shared/sampling_params.py, so 1.0 (not 0)
    is "off" for top_p and repetition_penalty."""
    return SamplingParams(**fields).to_proto()


# The proto's fields at their "off" values, for building rows the rules refuse.
_NEUTRAL = {"top_p": 1.0, "repetition_penalty": 1.0}


VOCAB = 64


def make_logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def run(
    sampler: Sampler,
    logits: torch.Tensor,
    params: Sequence[StageSamplingParams],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
):
    batch = logits.shape[0]
    prompts = list(prompts) if prompts is not None else [[1, 2, 3]] * batch
    outputs = list(outputs) if outputs is not None else [[]] * batch
    return sampler(logits, list(params), prompts, outputs)


def same_row_many_seeds(row: torch.Tensor, n: int, **kw: float) -> tuple[torch.Tensor, list[StageSamplingParams]]:
    """One logits row repeated n times, each copy with its own seed."""
    return row[None, :].repeat(n, 1), [stage_params(seed=s, **kw) for s in range(n)]


# ---- the hash ----


def _py_mix32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _py_uniform(seed: int, pos: int, v: int) -> float:
    """The noise written with python's unbounded ints: the reference for the int64 tricks."""
    m = 0xFFFFFFFF
    key = _py_mix32(seed & m)
    key = _py_mix32(key ^ (((seed >> 32) + 0x9E3779B9) & m))
    key = _py_mix32(key ^ ((pos + 0x85EBCA6B) & m))
    bits = _py_mix32(key ^ _py_mix32((v + 0xC2B2AE35) & m))
    return ((bits >> 8) + 0.5) / (1 << 24)


def test_noise_matches_exact_integer_reference() -> None:
    sampler = Sampler()
    seeds = [0, 1, 12345, 2**32 - 1, 2**32, 2**63 + 17, 2**64 - 1]
    positions = [0, 7, 1000, 5, 2**31, 3, 99]
    vocab = 300
    u = uniform_noise(seeds, positions, sampler._vocab_hash(vocab, torch.device("cpu")))
    expected = torch.tensor(
        [[_py_uniform(s, p, v) for v in range(vocab)] for s, p in zip(seeds, positions)],
        dtype=torch.float32,
    )
    assert torch.equal(u, expected)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


def test_noise_looks_uniform() -> None:
    sampler = Sampler()
    u = uniform_noise(list(range(64)), [3] * 64, sampler._vocab_hash(4096, torch.device("cpu")))
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.std()) - math.sqrt(1 / 12)) < 0.005
    # Neighbouring seeds must not give correlated noise.
    corr = torch.corrcoef(u[:8])
    assert float((corr - torch.eye(8)).abs().max()) < 0.06


# ---- greedy ----


def test_greedy_is_argmax() -> None:
    logits = make_logits(16)
    out = run(Sampler(), logits, [stage_params(temperature=0.0, seed=i) for i in range(16)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_greedy_tie_goes_to_lowest_id() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[0, [40, 7, 21]] = 5.0
    logits[1, [63, 62]] = 1.0
    out = run(Sampler(), logits, [stage_params()] * 2)
    assert out.token_ids.tolist() == [7, 62]


def test_top_k_one_is_greedy() -> None:
    logits = make_logits(1)
    batch, params = same_row_many_seeds(logits[0], 100, temperature=1.5, top_k=1)
    out = run(Sampler(), batch, params)
    assert (out.token_ids == int(logits[0].argmax())).all()


# ---- seeded sampling ----


def test_seeded_sampling_is_reproducible() -> None:
    logits = make_logits(8, scale=0.5)
    params = [stage_params(temperature=1.0, seed=1000 + i) for i in range(8)]
    a = run(Sampler(), logits, params).token_ids
    b = run(Sampler(), logits.clone(), params).token_ids
    assert torch.equal(a, b)


def test_seeded_sampling_is_batch_invariant() -> None:
    sampler = Sampler()
    target_logits = make_logits(1, seed=42, scale=0.5)[0]
    target = stage_params(temperature=0.9, top_p=0.95, seed=2**63 + 5)
    prompt, output = [5, 6, 7, 8], [9, 10]
    alone = run(sampler, target_logits[None], [target], [prompt], [output]).token_ids[0]

    others = make_logits(7, seed=43)
    other_params = [
        stage_params(temperature=0.0),
        stage_params(temperature=1.0, top_k=3, seed=1),
        stage_params(temperature=0.5, min_p=0.2, seed=2),
        stage_params(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.3, seed=3),
        stage_params(temperature=2.0, seed=4, top_logprobs=5),
        stage_params(temperature=0.0, frequency_penalty=1.0),
        stage_params(temperature=1.0, top_p=0.3, seed=5),
    ]
    other_prompts = [[1, 2], [3], [4, 4, 4], [1, 5, 9], [2], [7, 7], [8]]
    other_outputs = [[3], [], [1], [2, 2], [], [5, 5, 5], [1]]
    for where in (0, 3, 7):
        logits = torch.cat([others[:where], target_logits[None], others[where:]])
        params = other_params[:where] + [target] + other_params[where:]
        prompts = other_prompts[:where] + [prompt] + other_prompts[where:]
        outputs = other_outputs[:where] + [output] + other_outputs[where:]
        mixed = run(sampler, logits, params, prompts, outputs).token_ids
        assert mixed[where] == alone, f"target row at batch index {where}"


def test_different_seeds_and_positions_differ() -> None:
    row = torch.zeros(VOCAB)  # uniform: any two draws agree with probability 1/64
    batch, params = same_row_many_seeds(row, 32, temperature=1.0)
    by_seed = run(Sampler(), batch, params).token_ids
    assert len(set(by_seed.tolist())) > 20

    # Same seed, successive positions: the counter must move the noise.
    same_seed = [stage_params(temperature=1.0, seed=7)] * 32
    by_position = Sampler()(batch, same_seed, [[0] * n for n in range(32)], [[]] * 32).token_ids
    assert len(set(by_position.tolist())) > 20


# ---- distribution and truncation ----


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "sampled a token of probability 0"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


# chi-square critical values at p = 0.001 for the degrees of freedom used below.
_CHI2_CRIT = {3: 16.27, 7: 24.32}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    n = 20000
    batch, params = same_row_many_seeds(row, n, temperature=temperature)
    tokens = run(Sampler(), batch, params).token_ids
    chi2 = _chi_square(tokens, torch.softmax(row / temperature, dim=-1))
    assert chi2 < _CHI2_CRIT[7], chi2


def test_empirical_distribution_after_top_k() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    batch, params = same_row_many_seeds(row, 20000, temperature=1.0, top_k=4)
    tokens = run(Sampler(), batch, params).token_ids
    kept = row >= row.topk(4).values[-1]
    chi2 = _chi_square(tokens, torch.softmax(row.masked_fill(~kept, -math.inf), dim=-1))
    assert chi2 < _CHI2_CRIT[3], chi2


def _reference_keep(row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens allowed after top_k, top_p, min_p, computed one token at a time in float64."""
    scaled = [float(x) / temperature for x in row]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order)
    if top_k > 0:
        kth = scaled[order[top_k - 1]]
        keep = {i for i in keep if scaled[i] >= kth}
    if 0.0 < top_p < 1.0:
        z = sum(math.exp(scaled[i]) for i in keep)
        mass, prefix = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            prefix.add(i)
            mass += math.exp(scaled[i]) / z
            if mass >= top_p:
                break
        keep = prefix
    if min_p > 0.0:
        top = max(scaled)
        keep = {i for i in keep if math.exp(scaled[i] - top) >= min_p}
    return keep


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.3), (10, 0.8, 0.0), (12, 0.9, 0.05), (0, 1.0, 0.0)],
)
def test_truncation_never_picks_a_removed_token(top_k: int, top_p: float, min_p: float) -> None:
    sampler = Sampler()
    for row_seed in range(3):
        row = make_logits(1, seed=100 + row_seed, scale=1.0)[0]
        # A hot temperature spreads the mass so removed tokens would often win otherwise.
        temperature = 1.5
        batch, params = same_row_many_seeds(
            row, 400, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        )
        picked = set(run(sampler, batch, params).token_ids.tolist())
        allowed = _reference_keep(row, temperature, top_k, top_p, min_p)
        assert picked <= allowed, f"picked removed tokens {sorted(picked - allowed)}"
        if len(allowed) > 1:
            # The filter must not be stricter than asked either.
            assert len(picked) > 1
        if top_k == 0 and top_p == 1.0 and min_p == 0.0:
            assert len(allowed) == VOCAB


# ---- penalties ----


def test_repetition_penalty_matches_transformers() -> None:
    logits = make_logits(3, scale=3.0)
    prompts = [[1, 5, 5, 9], [0, 63], [2]]
    outputs = [[9, 11], [], [3, 2, 40]]
    penalties = [1.3, 0.7, 2.0]
    params = [stage_params(repetition_penalty=p) for p in penalties]
    ours = apply_penalties(logits, params, prompts, outputs)
    for i, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=0, atol=0)
    # The input is left alone.
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_by_hand() -> None:
    logits = make_logits(2)
    prompts = [[4, 4, 6], [1]]
    outputs = [[6, 7, 7, 7], []]
    params = [stage_params(presence_penalty=0.5, frequency_penalty=0.25)] * 2
    ours = apply_penalties(logits, params, prompts, outputs)
    expected = logits.clone()
    # Prompt tokens do not count: only 6 (once) and 7 (three times) in the output.
    expected[0, 6] -= 0.5 + 0.25 * 1
    expected[0, 7] -= 0.5 + 0.25 * 3
    torch.testing.assert_close(ours, expected)


def test_penalties_combine_and_only_touch_their_rows() -> None:
    logits = make_logits(3)
    prompts = [[1, 2], [1, 2], [1, 2]]
    outputs = [[2, 3, 3], [2, 3, 3], [2, 3, 3]]
    params = [
        stage_params(repetition_penalty=1.5, frequency_penalty=0.5),
        stage_params(),
        stage_params(presence_penalty=1.0),
    ]
    ours = apply_penalties(logits, params, prompts, outputs)
    rep = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompts[0] + outputs[0]]), logits[:1].clone())[0]
    rep[2] -= 0.5 * 1
    rep[3] -= 0.5 * 2
    torch.testing.assert_close(ours[0], rep)
    torch.testing.assert_close(ours[1], logits[1], rtol=0, atol=0)
    expected2 = logits[2].clone()
    expected2[[2, 3]] -= 1.0
    torch.testing.assert_close(ours[2], expected2)


def test_penalties_change_greedy_pick() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 10] = 3.0
    logits[:, 20] = 2.0
    params = [stage_params(repetition_penalty=2.0), stage_params(frequency_penalty=0.6)]
    # Row 0: 10 in the prompt -> 1.5 < 2.0. Row 1: 10 twice in the output -> 1.8 < 2.0.
    out = run(Sampler(), logits, params, [[10], [1]], [[], [10, 10]])
    assert out.token_ids.tolist() == [20, 20]
    # Prompt tokens do not count for frequency: same row, 10 only in the prompt.
    out = run(Sampler(), logits[1:], params[1:], [[10, 10]], [[]])
    assert out.token_ids.tolist() == [10]


# ---- logprobs ----


def test_logprobs_come_from_raw_logits() -> None:
    logits = make_logits(4)
    params = [
        stage_params(temperature=0.0, top_logprobs=3),
        stage_params(temperature=2.0, seed=5, top_k=4),
        stage_params(temperature=0.5, seed=6, repetition_penalty=3.0, top_logprobs=5),
        stage_params(temperature=0.0, presence_penalty=2.0),
    ]
    prompts = [[1], [2], list(range(20)), [3]]
    outputs = [[], [4], [], [int(logits[3].argmax())]]
    out = run(Sampler(), logits, params, prompts, outputs)
    raw = torch.log_softmax(logits.double(), dim=-1).float()
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.logprobs.dtype == torch.float32

    # k is the largest request in the batch; every row gets that many.
    assert out.top_token_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert out.top_token_ids.dtype == torch.int64
    expected = torch.sort(raw, dim=-1, descending=True)
    assert torch.equal(out.top_token_ids, expected.indices[:, :5])
    torch.testing.assert_close(out.top_logprobs, expected.values[:, :5])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_no_top_logprobs_gives_empty_columns() -> None:
    out = run(Sampler(), make_logits(3), [stage_params()] * 3)
    assert out.top_token_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)


# ---- the rules' invariants ----


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.5},
        {"temperature": math.nan},
        {"top_p": 1.5},
        {"top_p": 0.0},
        {"min_p": -0.1},
        {"repetition_penalty": -1.0},
        {"repetition_penalty": 0.0},
        {"presence_penalty": math.inf},
    ],
)
def test_parameters_outside_the_rules_are_an_assertion_not_a_remap(bad: dict[str, float]) -> None:
    """The router resolves and checks every value (0 top_p is its client spelling of 1.0); what
    reaches the sampler outside the rules is a bug upstream, asserted, never reinterpreted."""
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(**bad)
    raw = StageSamplingParams(**{**_NEUTRAL, **bad})
    with pytest.raises(AssertionError, match="outside the rules"):
        run(Sampler(), make_logits(2), [stage_params(), raw])


# ---- chunks of rows ----


def _mixed_batch(batch: int, vocab: int, seed: int):
    """Every kind of row, in an order where chunks of 4 come out all greedy (rows 0-3), all
    sampled (4-7) and mixed (the rest, drawn at random)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3.0

    def pick(options: list):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    params, prompts, outputs = [], [], []
    for i in range(batch):
        temperature = 0.0 if i < 4 else 0.8 if i < 8 else pick([0.0, 0.7, 1.0, 1.3])
        params.append(
            stage_params(
                temperature=temperature,
                top_k=pick([0, 0, 1, 5, 40]),
                top_p=pick([1.0, 1.0, 0.9, 0.5]),
                min_p=pick([0.0, 0.0, 0.1]),
                seed=int(torch.randint(2**62, (1,), generator=g)) * 3,
                repetition_penalty=pick([1.0, 1.0, 0.8, 1.5]),
                presence_penalty=pick([0.0, 0.0, 0.5, -0.4]),
                frequency_penalty=pick([0.0, 0.0, 0.25]),
                top_logprobs=pick([0, 0, 1, 5]),
                return_logprob=pick([False, True]),
            )
        )
        # Few distinct ids, so penalised tokens repeat within a row and across rows.
        hi = pick([4, 30, vocab])
        prompt_len = int(torch.randint(1, 30, (1,), generator=g))
        output_len = int(torch.randint(0, 20, (1,), generator=g))
        prompts.append(torch.randint(0, hi, (prompt_len,), generator=g).tolist())
        outputs.append(torch.randint(0, hi, (output_len,), generator=g).tolist())
    return logits, params, prompts, outputs


def _assert_same_output(got: SamplerOutput, want: SamplerOutput) -> None:
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.logprobs, want.logprobs)
    assert torch.equal(got.top_token_ids, want.top_token_ids)
    assert torch.equal(got.top_logprobs, want.top_logprobs)


@pytest.mark.parametrize("max_chunk_rows", [1, 4, 7, 22])
@pytest.mark.parametrize("seed", range(3))
def test_chunks_give_the_one_pass_result_bit_for_bit(max_chunk_rows: int, seed: int) -> None:
    """23 rows in chunks of 1, 4, 7 and 22: several chunks, the last one ragged."""
    batch, vocab = 23, 257
    logits, params, prompts, outputs = _mixed_batch(batch, vocab, seed)
    assert chunk_rows(vocab) >= batch  # the default sampler takes the batch in one pass
    one_pass = Sampler()(logits, params, prompts, outputs)
    chunked = Sampler(max_chunk_rows=max_chunk_rows)(logits, params, prompts, outputs)
    _assert_same_output(chunked, one_pass)
    assert chunked.top_token_ids.shape == (batch, max(p.top_logprobs for p in params))


def test_model_dtype_logits_are_converted_per_chunk_with_the_same_result() -> None:
    logits, params, prompts, outputs = _mixed_batch(23, 257, seed=7)
    bf16 = logits.to(torch.bfloat16)
    want = Sampler()(bf16.float(), params, prompts, outputs)
    _assert_same_output(Sampler(max_chunk_rows=5)(bf16, params, prompts, outputs), want)
    _assert_same_output(Sampler()(bf16, params, prompts, outputs), want)


def test_chunk_rows_follow_the_byte_budget() -> None:
    # A float32 row of a 128k vocab is 501 KiB; 32 MiB holds 65 of them.
    assert chunk_rows(128_256) == sampler_module.CHUNK_BYTES // (128_256 * 4)
    assert chunk_rows(128_256) * 128_256 * 4 <= sampler_module.CHUNK_BYTES
    assert chunk_rows(sampler_module.CHUNK_BYTES) == 1  # a row over the budget still samples
    assert chunk_rows(64, max_rows=3) == 3


def test_an_empty_batch_gives_empty_outputs() -> None:
    out = Sampler(max_chunk_rows=2)(torch.zeros(0, VOCAB), [], [], [])
    assert out.token_ids.shape == (0,) and out.logprobs.shape == (0,)
    assert out.top_token_ids.shape == (0, 0) and out.top_logprobs.shape == (0, 0)


class _LargestOutput(TorchDispatchMode):
    """Bytes of the largest tensor any op returns while active (views included).

    The CPU has no allocator peak to read; every buffer the sampler makes is some op's
    output, so this bounds each of them, and the sampler holds a fixed number at a time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("batch", [40, 160])
def test_no_buffer_grows_with_the_batch(batch: int) -> None:
    """top_p over the whole batch (the profile's configuration) plus penalties and a greedy
    row: with chunks of 5 rows no intermediate exceeds an int64 [5, vocab] (the sort's order,
    the noise hash), whatever the batch; in one pass the same probe sees [batch, vocab] ones."""
    vocab, rows = 1000, 5
    logits = make_logits(batch, vocab=vocab).to(torch.bfloat16)
    params = [stage_params(temperature=1.0, top_p=0.9, seed=i) for i in range(batch)]
    params[1] = stage_params(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.2, top_logprobs=3)
    prompts, outputs = [[0, 1, 2]] * batch, [[5, 5, 6]] * batch
    bound = rows * vocab * 8

    with _LargestOutput() as probe:
        Sampler(max_chunk_rows=rows)(logits, params, prompts, outputs)
    assert probe.largest <= bound

    with _LargestOutput() as probe:
        Sampler()(logits, params, prompts, outputs)
    assert probe.largest >= batch * vocab * 4 > bound  # at least the float32 logits


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_equals_cpu_and_batch_invariance() -> None:
    sampler = Sampler()
    seeds, positions = [3, 2**64 - 1, 99], [0, 12, 4096]
    vocab = 128_256
    cpu = uniform_noise(seeds, positions, sampler._vocab_hash(vocab, torch.device("cpu")))
    gpu = uniform_noise(seeds, positions, sampler._vocab_hash(vocab, torch.device("cuda")))
    assert torch.equal(cpu, gpu.cpu())

    logits = make_logits(64, vocab=vocab, scale=3.0).cuda()
    params = [stage_params(temperature=1.0, top_p=0.9, top_k=50 * (i % 2), seed=i) for i in range(64)]
    prompts = [[1] * (i + 1) for i in range(64)]
    full = sampler(logits, params, prompts, [[]] * 64).token_ids.cpu()
    for i in (0, 17, 63):
        alone = sampler(logits[i : i + 1], [params[i]], [prompts[i]], [[]]).token_ids.cpu()
        assert alone[0] == full[i]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunks_give_the_one_pass_result_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the real vocab: 150 rows take chunks of 65, 65 and 20 rows."""
    logits, params, prompts, outputs = _mixed_batch(150, 128_256, seed=3)
    logits = logits.to("cuda", torch.bfloat16)
    chunked = Sampler()(logits, params, prompts, outputs)
    monkeypatch.setattr(sampler_module, "CHUNK_BYTES", 2**40)
    _assert_same_output(chunked, Sampler()(logits, params, prompts, outputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_chunk_rows", [None, 2])
def test_cuda_sampling_makes_no_host_sync(max_chunk_rows: int | None) -> None:
    sampler = Sampler(max_chunk_rows=max_chunk_rows)
    logits = make_logits(6, vocab=1000).cuda()
    params = [
        stage_params(temperature=0.0, top_logprobs=2),
        stage_params(temperature=1.0, seed=1),
        stage_params(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, seed=2),
        stage_params(temperature=1.0, repetition_penalty=1.2, seed=3),
        stage_params(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.1),
        stage_params(temperature=1.3, seed=4, return_logprob=True),
    ]
    prompts, outputs = [[1, 2, 3]] * 6, [[4, 4], [], [5], [1, 9], [2, 2, 2], []]
    sampler(logits, params, prompts, outputs)  # warm-up: caches the vocab hash
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, params, prompts, outputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = sampler(logits.cpu(), params, prompts, outputs)
    # Greedy rows agree across devices; sampled rows may differ only through float rounding.
    assert out.token_ids.cpu()[[0, 4]].tolist() == cpu.token_ids[[0, 4]].tolist()


# ---- the vectorised host packing against straightforward per-row references ----


def _reference_penalties(
    logits: torch.Tensor,
    params: Sequence[StageSamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> torch.Tensor:
    """The penalty semantics one row and one token at a time, in the same float32 ops."""
    out = logits.clone()
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    for i, p in enumerate(params):
        row = out[i]
        if p.repetition_penalty not in (0.0, 1.0):
            penalty = f32(p.repetition_penalty)
            for t in set(prompts[i]) | set(outputs[i]):
                row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            for t in set(outputs[i]):
                count = f32(float(list(outputs[i]).count(t)))
                row[t] = row[t] - (f32(p.presence_penalty) * f32(1.0) + f32(p.frequency_penalty) * count)
    return out


def _random_penalty_batch(seed: int, batch: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3.0

    def pick(options: list[float]) -> float:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    params, prompts, outputs = [], [], []
    for _ in range(batch):
        params.append(
            stage_params(
                temperature=pick([0.0, 0.0, 0.7, 1.3]),
                top_k=int(pick([0, 0, 5])),
                top_p=pick([1.0, 0.9]),
                seed=int(torch.randint(2**62, (1,), generator=g)) * 3,
                repetition_penalty=pick([1.0, 1.0, 0.8, 1.3, 2.0]),
                presence_penalty=pick([0.0, 0.5, -0.4]),
                frequency_penalty=pick([0.0, 0.25, -0.1]),
            )
        )
        # A small id range forces repeats; the edges 0 and vocab - 1 are allowed in.
        hi = int(pick([3.0, 20.0, float(vocab)]))
        prompt_len = int(torch.randint(1, 40, (1,), generator=g))
        output_len = int(torch.randint(0, 30, (1,), generator=g))
        prompts.append(torch.randint(vocab - hi, vocab, (prompt_len,), generator=g).tolist())
        outputs.append(torch.randint(0, hi, (output_len,), generator=g).tolist())
    return logits, params, prompts, outputs


@pytest.mark.parametrize("seed", range(6))
def test_penalties_match_per_row_reference_on_random_inputs(seed: int) -> None:
    logits, params, prompts, outputs = _random_penalty_batch(seed, batch=24, vocab=97)
    expected = _reference_penalties(logits, params, prompts, outputs)
    ours = apply_penalties(logits, params, prompts, outputs)
    assert torch.equal(ours, expected)
    # 64-bit arrays (the fast path), tuples (the generic one) and lists all agree.
    as_arrays = [array("q", p) for p in prompts], [array("l", o) for o in outputs]
    assert torch.equal(apply_penalties(logits, params, *as_arrays), expected)
    as_tuples = [tuple(p) for p in prompts], [tuple(o) for o in outputs]
    assert torch.equal(apply_penalties(logits, params, *as_tuples), expected)

    # In the sampler, penalising equals sampling the reference-penalised logits with the
    # penalties off (same seeds and positions): greedy and seeded rows alike.
    unpenalised = [
        stage_params(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        for p in params
    ]
    sampler = Sampler()
    got = sampler(logits, params, prompts, outputs).token_ids
    want = sampler(expected, unpenalised, prompts, outputs).token_ids
    assert torch.equal(got, want)
    assert torch.equal(sampler(logits, params, *as_arrays).token_ids, want)


def test_sampled_token_follows_the_documented_noise() -> None:
    """argmax(probs / -log(u)) with u from the python-int hash, for seeds that need all 64
    bits: the packed per-row table must carry the row keys exactly."""
    logits = make_logits(5, scale=0.3)
    seeds = [2**64 - 1, 2**63 + 12345, 0, 987654321, 2**40 + 3]
    prompts = [[1] * n for n in (1, 7, 300, 2, 33)]
    params = [stage_params(temperature=0.9, seed=s) for s in seeds]
    # A greedy row in the middle: the sampled rows go through the row subset path too.
    params[2] = stage_params(temperature=0.0)
    got = run(Sampler(), logits, params, prompts).token_ids
    for i, s in enumerate(seeds):
        if i == 2:
            assert got[i] == logits[i].argmax()
            continue
        u = torch.tensor([_py_uniform(s, len(prompts[i]), v) for v in range(VOCAB)], dtype=torch.float32)
        probs = (logits[i] / torch.tensor(0.9, dtype=torch.float32)).softmax(dim=-1)
        assert got[i] == int((probs / -torch.log(u)).argmax()), f"row {i}"


@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"],
)
def test_the_sampler_accepts_exactly_what_the_rules_accept(field: str) -> None:
    """The sampler's vectorised assert and SamplingParams apply the same rules
    (shared/sampling_params.py): the batch passes iff every row's values are valid there."""
    for value in [-1.0, -0.0, 0.0, 0.5, 1.0, 1.5, 1e30, math.inf, -math.inf, math.nan]:
        try:
            SamplingParams(**{field: value})
            valid = True
        except InvalidSamplingParams:
            valid = False
        row = StageSamplingParams(**{**_NEUTRAL, field: value})
        params = [stage_params(), row, stage_params(), row]
        if valid:
            run(Sampler(), make_logits(4), params)
        else:
            with pytest.raises(AssertionError):
                run(Sampler(), make_logits(4), params)
