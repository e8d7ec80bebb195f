"""validate_request: bad requests rejected with a helpful message, good ones resolved."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from router.request_validation import (
    InvalidRequestError,
    RequestLimits,
    ValidatedRequest,
    validate_request,
)
from shared.config import ConfigError
from shared.proto import generation_pb2, stage_worker_pb2

LIMITS = RequestLimits(
    vocab_size=100,
    max_context=64,
    max_stop_strings=4,
    max_stop_string_len=8,
    max_stop_token_ids=3,
    max_top_logprobs=5,
    max_prompt_chars=200,
)
BOS = 1


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: bos, then one token per character."""
    return [BOS] + [2 + ord(c) % 90 for c in text]


def make(
    prompt: str | None = "hello",
    ids: list[int] | None = None,
    request_id: str = "",
    **sampling: object,
) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(request_id=request_id, sampling=generation_pb2.SamplingParams(**sampling))
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    elif prompt is not None:
        req.prompt = prompt
    return req


def validate(req: generation_pb2.GenerateRequest, enc: Callable[[str], list[int]] = encode) -> ValidatedRequest:
    return validate_request(req, enc, LIMITS)


def no_input() -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(sampling=generation_pb2.SamplingParams())


def empty_ids() -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest()
    req.prompt_token_ids.SetInParent()
    return req


NAN, INF = float("nan"), float("inf")

# (name, request, fragments the message must contain: what was wrong and what is allowed)
BAD_REQUESTS = [
    ("no input", no_input(), ["no input", "exactly one of prompt, prompt_token_ids or messages"]),
    ("empty prompt", make(prompt=""), ["prompt is empty", "non-empty"]),
    ("empty token ids", empty_ids(), ["prompt_token_ids is empty", "at least one token id"]),
    ("token id = vocab", make(ids=[1, 100]), ["prompt_token_ids[1] = 100", "[0, 99]"]),
    ("prompt too many chars", make(prompt="x" * 201), ["201 characters", "at most 200"]),
    ("prompt fills context", make(ids=[5] * 64), ["64 tokens", "context limit is 64", "at most 63"]),
    ("text prompt fills context", make(prompt="y" * 63), ["64 tokens", "at most 63"]),
    ("prompt + max_new > context", make(ids=[5] * 10, max_new_tokens=60),
     ["10 tokens", "max_new_tokens is 60", "70 exceed the context limit of 64", "[1, 54]"]),
    ("temperature nan", make(temperature=NAN), ["temperature", "[0, 100]", "nan"]),
    ("temperature inf", make(temperature=INF), ["temperature", "[0, 100]", "inf"]),
    ("temperature negative", make(temperature=-0.5), ["temperature", "[0, 100]", "-0.5"]),
    ("temperature too high", make(temperature=101.0), ["temperature", "[0, 100]", "101"]),
    ("top_k > vocab", make(top_k=101), ["top_k", "[0, 100]", "101"]),
    ("top_p > 1", make(top_p=1.5), ["top_p", "[0, 1]", "1.5"]),
    ("top_p negative", make(top_p=-0.25), ["top_p", "[0, 1]", "-0.25"]),
    ("top_p nan", make(top_p=NAN), ["top_p", "[0, 1]", "nan"]),
    ("min_p = 1", make(min_p=1.0), ["min_p", "[0, 1)", "got 1"]),
    ("min_p negative", make(min_p=-0.5), ["min_p", "[0, 1)", "-0.5"]),
    ("repetition_penalty negative", make(repetition_penalty=-1.0), ["repetition_penalty", "(0, 10]", "-1"]),
    ("repetition_penalty too high", make(repetition_penalty=10.5), ["repetition_penalty", "(0, 10]", "10.5"]),
    ("repetition_penalty inf", make(repetition_penalty=INF), ["repetition_penalty", "(0, 10]", "inf"]),
    ("presence_penalty too high", make(presence_penalty=2.5), ["presence_penalty", "[-2, 2]", "2.5"]),
    ("presence_penalty -inf", make(presence_penalty=-INF), ["presence_penalty", "[-2, 2]", "-inf"]),
    ("frequency_penalty too low", make(frequency_penalty=-3.0), ["frequency_penalty", "[-2, 2]", "-3"]),
    ("frequency_penalty nan", make(frequency_penalty=NAN), ["frequency_penalty", "[-2, 2]", "nan"]),
    ("too many logprobs", make(logprobs=6), ["logprobs", "[0, 5]", "6"]),
    ("too many stop strings", make(stop=["a", "b", "c", "d", "e"]), ["5 strings", "at most 4"]),
    ("empty stop string", make(stop=["ok", ""]), ["stop[1] is empty", "non-empty"]),
    ("stop string too long", make(stop=["123456789"]), ["stop[0] has 9 characters", "at most 8"]),
    ("too many stop token ids", make(stop_token_ids=[1, 2, 3, 4]), ["4 ids", "at most 3"]),
    ("stop token id = vocab", make(stop_token_ids=[3, 100]), ["stop_token_ids[1] = 100", "[0, 99]"]),
    ("request_id too long", make(request_id="r" * 129), ["request_id", "at most 128 printable", "129 characters"]),
    ("request_id not printable", make(request_id="abc\ndef"), ["request_id", "printable", "'abc\\ndef'"]),
]


def test_bad_request_table_is_large_enough() -> None:
    assert len(BAD_REQUESTS) >= 25


@pytest.mark.parametrize(("name", "req", "fragments"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_rejected_with_helpful_message(
    name: str, req: generation_pb2.GenerateRequest, fragments: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate(req)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


def test_prompt_that_tokenizes_to_nothing() -> None:
    with pytest.raises(InvalidRequestError, match="zero tokens"):
        validate(make(prompt="hi"), enc=lambda text: [])


def test_error_message_does_not_echo_huge_values() -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate(make(request_id="\x00" * 10_000))
    assert len(str(info.value)) < 300
    assert "10000 characters" in str(info.value)


def test_defaults_resolved_for_text_prompt() -> None:
    result = validate(make(prompt="hello"))
    assert result.prompt_token_ids == tuple(encode("hello"))
    s = result.sampling
    # max_new_tokens 0 means "up to the context limit".
    assert s.max_new_tokens == LIMITS.max_context - 6
    assert 0 <= s.seed < 2**63
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.0, 0, 1.0, 0.0)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (s.top_logprobs, s.return_logprob, s.ignore_eos) == (0, False, False)
    assert s.stop == () and s.stop_token_ids == frozenset()
    assert len(result.request_id) == 32 and int(result.request_id, 16) >= 0


def test_seed_and_request_id_assigned_fresh_each_time() -> None:
    a, b = validate(make()), validate(make())
    assert a.sampling.seed != b.sampling.seed
    assert a.request_id != b.request_id


def test_client_seed_kept_even_when_zero() -> None:
    assert validate(make(seed=0)).sampling.seed == 0
    assert validate(make(seed=2**64 - 1)).sampling.seed == 2**64 - 1


def test_boundary_values_accepted_and_resolved() -> None:
    req = make(
        ids=[99] * 10,
        request_id="client-42 ü",
        max_new_tokens=54,
        temperature=100.0,
        top_k=100,
        top_p=1.0,
        min_p=0.99,
        repetition_penalty=10.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logprobs=5,
        stop=["12345678", "b", "b", "c"],
        stop_token_ids=[99, 0, 99],
        ignore_eos=True,
        seed=7,
    )
    result = validate(req)
    assert result.request_id == "client-42 ü"
    assert result.prompt_token_ids == (99,) * 10
    s = result.sampling
    assert s.max_new_tokens == 54
    assert (s.temperature, s.top_k, s.top_p) == (100.0, 100, 1.0)
    assert s.min_p == pytest.approx(0.99)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (10.0, -2.0, 2.0)
    assert (s.top_logprobs, s.return_logprob) == (5, True)
    assert s.stop == ("12345678", "b", "c")
    assert s.stop_token_ids == frozenset({0, 99})
    assert s.ignore_eos and s.seed == 7


def test_longest_prompt_leaves_one_token() -> None:
    assert validate(make(ids=[3] * 63)).sampling.max_new_tokens == 1
    assert validate(make(ids=[3] * 63, max_new_tokens=1)).sampling.max_new_tokens == 1
    with pytest.raises(InvalidRequestError, match=r"\[1, 1\]"):
        validate(make(ids=[3] * 63, max_new_tokens=2))


def test_return_logprob_without_alternatives() -> None:
    s = validate(make(return_logprob=True)).sampling
    assert (s.return_logprob, s.top_logprobs) == (True, 0)


def test_to_proto() -> None:
    s = validate(
        make(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=123, repetition_penalty=1.2,
             presence_penalty=0.5, frequency_penalty=-0.5, logprobs=2)
    ).sampling
    proto = s.to_proto()
    assert isinstance(proto, stage_worker_pb2.StageSamplingParams)
    assert proto.temperature == pytest.approx(0.7)
    assert (proto.top_k, proto.seed, proto.top_logprobs, proto.return_logprob) == (5, 123, 2, True)
    assert proto.top_p == pytest.approx(0.9) and proto.min_p == pytest.approx(0.05)
    assert proto.repetition_penalty == pytest.approx(1.2)
    assert (proto.presence_penalty, proto.frequency_penalty) == (0.5, -0.5)
    # Unset top_p and repetition_penalty reach the stages as their neutral values, not 0.
    neutral = validate(make()).sampling.to_proto()
    assert (neutral.top_p, neutral.repetition_penalty) == (1.0, 1.0)
    assert math.isfinite(neutral.temperature)


@pytest.mark.parametrize(
    "kwargs",
    [dict(vocab_size=0, max_context=10), dict(vocab_size=10, max_context=1),
     dict(vocab_size=10, max_context=10, max_stop_strings=-1)],
)
def test_limits_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        RequestLimits(**kwargs)


# ---- oversized input: refused before a Python object per element is built ---------------


class CountOnly:
    """A prompt's ids whose elements must never be read (like a tokenized prompt over the
    context, of which only the count comes back from the tokenizer process)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        raise AssertionError("an element was read before the length was checked")

    __getitem__ = __iter__


def test_a_prompt_over_the_context_is_refused_by_its_count_alone() -> None:
    with pytest.raises(InvalidRequestError, match="prompt has 1000000 tokens but the context limit is 64"):
        validate_request(make("hi"), lambda text: CountOnly(1_000_000), LIMITS)
    # Token ids: too many is said before any id is looked at (id 10^6 is outside the vocabulary).
    with pytest.raises(InvalidRequestError, match="prompt has 100 tokens"):
        validate_request(make(None, ids=[10**6] * 100), encode, LIMITS)


def test_wire_sizes_refuse_oversized_fields_before_parsing() -> None:
    from router.request_size import (
        generate_request_bounds, max_request_bytes, size_check, tokenize_request_bounds, top_level_field_sizes,
    )

    check = size_check(generate_request_bounds(LIMITS))
    ok = make("x" * 200, stop=["abcdefgh"] * 4, stop_token_ids=[1, 2, 3], request_id="r" * 128)
    assert check(ok.SerializeToString()) is None
    # The largest valid values of every field (4-byte characters, 5-byte ids) pass too.
    widest = make("\U0001F600" * 200, request_id="\U0001F600" * 128, stop=["\U0001F600" * 8] * 4,
                  stop_token_ids=[2**32 - 1] * 3, max_new_tokens=2**32 - 1, seed=2**64 - 1, top_k=2**32 - 1)
    assert check(widest.SerializeToString()) is None
    assert check(make(None, ids=[2**32 - 1] * 63).SerializeToString()) is None

    too_many_ids = make(None, ids=[5] * 10_000).SerializeToString()
    assert top_level_field_sizes(too_many_ids) == {2: 10_003, 3: 0}  # packed ids: 2 + 10,001 bytes
    reason = check(too_many_ids)
    assert reason is not None and reason.startswith("prompt_token_ids is 10003 bytes on the wire")
    assert "at most 63 token ids (the context limit is 64)" in reason
    reason = check(make("hi", stop=["s" * 60] * 1000).SerializeToString())
    assert reason is not None and "sampling.stop may hold at most 4 strings of at most 8 characters" in reason
    # Unknown fields (a newer client's) are not this check's business; garbage is the parser's.
    unknown = make("hi").SerializeToString() + bytes([0x7A]) + bytes([0x80, 0x80, 0x04]) + b"z" * 65536
    assert check(unknown) is None
    assert check(b"\xff\xff\xff\xff\x0f") is None and check(b"\x0a\xff") is None
    assert size_check(tokenize_request_bounds(LIMITS))(
        generation_pb2.TokenizeRequest(text="a" * 2000).SerializeToString()
    ).startswith("text is 2000 bytes")
    # The receive cap: room for the widest valid request, twice over.
    assert max_request_bytes(LIMITS) >= 2 * (len(widest.SerializeToString()) - len(widest.request_id.encode()))
