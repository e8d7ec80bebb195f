"""IncrementalDetokenizer against real tokenizers' full decode.

The tokenizers are trained here with the `tokenizers` library on a small multilingual text,
so multi-byte characters (accents, CJK, emoji) really are split across tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenizer import (
    MAX_PENDING_TOKENS,
    PROMPT_CONTEXT_TOKENS,
    IncrementalDetokenizer,
    TokenDecoder,
    add_tokens_batch,
)

CORPUS = [
    "Héllo wörld, café crème brûlée à la française. Ça va? Äpfel über Straße, naïve façade.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。中文字符测试，汉字很多。",
    "日本語のテキストも少し。こんにちは世界。",
    "Emoji time 😀😃🎉👍🏽 🚀 and ❤️ hearts. 🇫🇷 flag. 🤖 robots 🧪 tests.",
    "The quick brown fox jumps over the lazy dog. Hello world! hello world, bye now.",
] * 3

# Pieces random texts are built from: every UTF-8 length (1 to 4 bytes) is represented.
PIECES = [
    "hello", " world", " the", " fox", ",", ".", " ", "\n", "é", "ü", "ß", "ç", " café", "naïve",
    "你", "好", "世界", "天气", "测试", "こんにちは", "😀", "🎉", "👍🏽", "🚀", "🤖", "❤️", "🇫🇷", "abc", "123",
]


def _gpt2_byte_alphabet() -> dict[int, str]:
    """Byte -> the printable character that byte-level BPE uses for it in token strings."""
    # Bytes that are printable and not whitespace keep their own character; the rest are
    # shifted past 255 in byte order.
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


class ByteLevelFixture:
    def __init__(self) -> None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
        )
        alphabet = _gpt2_byte_alphabet()
        self.byte_token = {b: self.tokenizer.convert_tokens_to_ids(c) for b, c in alphabet.items()}
        self.char_byte = {c: b for b, c in alphabet.items()}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes(self.char_byte[c] for c in self.tokenizer.convert_ids_to_tokens(token_id))

    def byte_tokens(self, text: str) -> list[int]:
        """One token per UTF-8 byte: every multi-byte character split across tokens."""
        return [self.byte_token[b] for b in text.encode()]

    def explode(self, ids: list[int], rng: random.Random, p: float) -> list[int]:
        """Replace some tokens by their single-byte tokens (same text, more splits)."""
        out: list[int] = []
        for t in ids:
            if t >= 2 and rng.random() < p:
                out.extend(self.byte_token[b] for b in self.token_bytes(t))
            else:
                out.append(t)
        return out


@pytest.fixture(scope="module")
def bl() -> ByteLevelFixture:
    return ByteLevelFixture()


def random_text(rng: random.Random, n_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n_pieces))


def chunks(ids: list[int], rng: random.Random, max_chunk: int) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        out.append(ids[i : i + n])
        i += n
    return out


class RecordingTokenizer:
    """Forwards decode to a real tokenizer and records how many ids each call decoded."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], **kwargs: bool) -> str:
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_fixture_splits_multibyte_characters(bl: ByteLevelFixture) -> None:
    # Without real splits the tests below would prove nothing about U+FFFD handling.
    ids = bl.byte_tokens("世")
    assert len(ids) == 3
    assert bl.decode(ids[:2]).endswith("\ufffd")
    assert bl.decode(ids) == "世"
    merged = bl.encode("Emoji time 😀😃🎉")
    assert any(bl.decode([t]).endswith("\ufffd") for t in merged)


@pytest.mark.parametrize("seed", range(12))
def test_deltas_match_full_decode_on_random_streams(bl: ByteLevelFixture, seed: int) -> None:
    rng = random.Random(seed)
    prompt = bl.tokenizer.encode(random_text(rng, rng.randint(1, 6)))
    output = bl.explode(bl.encode(random_text(rng, 60)), rng, p=0.4)
    recorder = RecordingTokenizer(bl.tokenizer)
    detok = IncrementalDetokenizer(recorder, prompt, stop=[])
    emitted, seen = "", []
    for chunk in chunks(output, rng, max_chunk=3):
        seen.extend(chunk)
        step = detok.add_tokens(chunk)
        assert step.stop_string is None
        assert "\ufffd" not in step.text
        emitted += step.text
        so_far = bl.decode(seen)
        # Text is emitted as soon as it is complete: nothing is held back without stop strings.
        if not so_far.endswith("\ufffd"):
            assert emitted == so_far
    tail = detok.finish()
    assert "\ufffd" not in tail
    assert emitted + tail == bl.decode(output)
    # Decoding works on a sliding window, not on the whole output.
    assert max(recorder.window_sizes) <= PROMPT_CONTEXT_TOKENS + 2 * 4 * 3


def test_a_batch_of_streams_decodes_in_two_rust_calls_per_step(bl: ByteLevelFixture) -> None:
    # The router steps every stream together: the same deltas as one stream at a time, with
    # two tokenizer calls per step for all of them.
    rng = random.Random(7)
    decoder = TokenDecoder(bl.tokenizer)
    assert decoder._decode_batch is not None  # a fast tokenizer: Rust decode_batch
    calls = 0
    rust_batch = decoder._decode_batch

    def counting(id_lists: list[list[int]], **kwargs: bool) -> list[str]:
        nonlocal calls
        calls += 1
        return rust_batch(id_lists, **kwargs)

    decoder._decode_batch = counting
    streams = []
    for _ in range(6):
        prompt = bl.tokenizer.encode(random_text(rng, 3))
        output = bl.explode(bl.encode(random_text(rng, 30)), rng, p=0.4)
        stop = [random_text(rng, 1)] if rng.random() < 0.5 else []
        streams.append((prompt, output, stop))
    batched = [IncrementalDetokenizer(bl.tokenizer, p, stop, decoder=decoder) for p, _, stop in streams]
    alone = [IncrementalDetokenizer(bl.tokenizer, p, stop) for p, _, stop in streams]
    texts = [["", ""] for _ in streams]
    for i in range(max(len(o) for _, o, _ in streams)):
        live = [k for k, (_, o, _) in enumerate(streams) if i < len(o) and not batched[k].finished]
        calls = 0
        steps = add_tokens_batch([(batched[k], [streams[k][1][i]]) for k in live])
        assert calls <= 2
        for k, step in zip(live, steps):
            texts[k][0] += step.text
            single = alone[k].add_tokens([streams[k][1][i]])
            texts[k][1] += single.text
            assert (step.text, step.stop_string) == (single.text, single.stop_string)
    for k in range(len(streams)):
        assert texts[k][0] + batched[k].finish() == texts[k][1] + alone[k].finish()
    # The fallback (a tokenizer without decode_batch) decodes one list per call, same texts.
    plain = TokenDecoder(RecordingTokenizer(bl.tokenizer))
    assert plain._decode_batch is None
    ids = [bl.encode("héllo"), bl.encode(" 世界"), []]
    assert plain.decode(ids) == decoder.decode(ids) == ["héllo", " 世界", ""]


@pytest.mark.parametrize("seed", range(6))
def test_deltas_match_full_decode_on_arbitrary_token_ids(bl: ByteLevelFixture, seed: int) -> None:
    # Any ids at all, special tokens and invalid byte sequences included: U+FFFD may be
    # legitimately part of the text then, but the deltas must still add up to the decode.
    rng = random.Random(1000 + seed)
    vocab = len(bl.tokenizer)
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
    output = [rng.randrange(vocab) for _ in range(150)]
    for skip in (True, False):
        detok = IncrementalDetokenizer(bl.tokenizer, prompt, stop=[], skip_special_tokens=skip)
        text = "".join(detok.add_tokens(c).text for c in chunks(output, rng, max_chunk=4))
        assert text + detok.finish() == bl.decode(output, skip_special_tokens=skip)


def test_invalid_bytes_do_not_grow_the_window(bl: ByteLevelFixture) -> None:
    # Stray continuation bytes decode to U+FFFD forever; they must not stall emission.
    output = [bl.byte_token[0x80]] * 50 + bl.encode(" hello 世界")
    recorder = RecordingTokenizer(bl.tokenizer)
    detok = IncrementalDetokenizer(recorder, [], stop=[])
    emitted = "".join(detok.add_tokens([t]).text for t in output)
    assert emitted + detok.finish() == bl.decode(output)
    assert max(recorder.window_sizes) <= 2 * (MAX_PENDING_TOKENS + 1)
    assert emitted.count("\ufffd") == 50


def test_prompt_ending_mid_character(bl: ByteLevelFixture) -> None:
    # The prompt holds the first byte of "世", the output the other two: the output alone
    # decodes to two U+FFFD, and that is what the deltas must add up to.
    world = bl.byte_tokens("世")
    prompt = bl.tokenizer.encode("ab") + world[:1]
    output = world[1:] + bl.encode("cd")
    detok = IncrementalDetokenizer(bl.tokenizer, prompt, stop=[])
    text = "".join(detok.add_tokens([t]).text for t in output) + detok.finish()
    assert text == bl.decode(output) == "\ufffd\ufffdcd"


def test_special_tokens_skipped_or_kept(bl: ByteLevelFixture) -> None:
    eos = bl.tokenizer.eos_token_id
    output = bl.encode("hello") + [eos] + bl.encode(" world")
    for skip, expected in ((True, "hello world"), (False, "hello</s> world")):
        detok = IncrementalDetokenizer(bl.tokenizer, [0], stop=[], skip_special_tokens=skip)
        text = "".join(detok.add_tokens([t]).text for t in output) + detok.finish()
        assert text == expected


def run_with_stops(
    bl: ByteLevelFixture, output: list[int], stop: list[str], prompt: Sequence[int] = (0,)
) -> tuple[list[str], str | None, int]:
    """Feeds tokens one by one; returns (deltas, stop string, number of tokens fed)."""
    detok = IncrementalDetokenizer(bl.tokenizer, prompt, stop=stop)
    deltas = []
    for i, t in enumerate(output):
        step = detok.add_tokens([t])
        deltas.append(step.text)
        if step.stop_string is not None:
            assert detok.finished
            with pytest.raises(RuntimeError):
                detok.add_tokens([t])
            assert detok.finish() == ""
            return deltas, step.stop_string, i + 1
    deltas.append(detok.finish())
    return deltas, None, len(output)


def test_stop_string_across_token_boundary_is_cut(bl: ByteLevelFixture) -> None:
    output = bl.encode("Hello world, bye now.")
    # The stop string must really span tokens for this test to mean anything.
    assert not any("lo wo" in bl.decode([t]) for t in output)
    deltas, stop, fed = run_with_stops(bl, output, ["lo wo"])
    assert stop == "lo wo"
    assert "".join(deltas) == "Hel"
    # Detected at the token that completed it, not later.
    assert fed == next(i for i in range(1, len(output) + 1) if "lo wo" in bl.decode(output[:i]))


def test_stop_string_split_inside_multibyte_characters(bl: ByteLevelFixture) -> None:
    output = bl.byte_tokens("今天天气很好。我们")
    deltas, stop, fed = run_with_stops(bl, output, ["天气", "不在"])
    assert stop == "天气"
    assert "".join(deltas) == "今天"
    assert all("\ufffd" not in d for d in deltas)
    assert fed == len("今天天气".encode())


def test_stop_string_at_the_very_start(bl: ByteLevelFixture) -> None:
    deltas, stop, fed = run_with_stops(bl, bl.encode("😀 after"), ["😀"])
    assert (stop, "".join(deltas)) == ("😀", "")


def test_first_completed_stop_string_wins(bl: ByteLevelFixture) -> None:
    output = bl.byte_tokens("xabcdefg")
    deltas, stop, _ = run_with_stops(bl, output, ["cdef", "bc"])
    assert (stop, "".join(deltas)) == ("bc", "xa")
    # "abcdef" starts first but "cd" is complete first: generation stops there.
    deltas, stop, _ = run_with_stops(bl, output, ["abcdef", "cd"])
    assert (stop, "".join(deltas)) == ("cd", "xab")
    # Also when both arrive in one call (several tokens at once).
    step = IncrementalDetokenizer(bl.tokenizer, [0], stop=["abcdef", "cd"]).add_tokens(output)
    assert (step.stop_string, step.text) == ("cd", "xab")
    # Same end: the longer one starts earlier and everything from its start is cut.
    deltas, stop, _ = run_with_stops(bl, output, ["cd", "bcd"])
    assert (stop, "".join(deltas)) == ("bcd", "xa")


def test_hold_back_is_exactly_stop_length_minus_one(bl: ByteLevelFixture) -> None:
    output = bl.encode("hello world, the quick brown fox")
    detok = IncrementalDetokenizer(bl.tokenizer, [0], stop=["zzzzz"])  # never matches
    emitted, seen = "", []
    for t in output:
        seen.append(t)
        emitted += detok.add_tokens([t]).text
        so_far = bl.decode(seen)
        assert emitted == so_far[: max(len(so_far) - 4, 0)]
    tail = detok.finish()
    assert tail == bl.decode(output)[-4:]
    assert emitted + tail == bl.decode(output)


def test_finish_flushes_held_back_text(bl: ByteLevelFixture) -> None:
    output = bl.encode("Héllo 世界 😀")
    detok = IncrementalDetokenizer(bl.tokenizer, [0], stop=["a much longer stop string"])
    emitted = "".join(detok.add_tokens([t]).text for t in output)
    assert emitted == ""  # all of it could still be the start of the stop string
    assert detok.finish() == "Héllo 世界 😀"
    assert detok.finish() == ""


def reference_stop(text: str, stop: list[str]) -> tuple[int, str] | None:
    """Where generation must stop: the occurrence that ends first (longest on a tie)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if not found:
        return None
    _, start, s = min(found)
    return start, s


@pytest.mark.parametrize("seed", range(15))
def test_random_stop_strings(bl: ByteLevelFixture, seed: int) -> None:
    rng = random.Random(2000 + seed)
    full_text = random_text(rng, 40)
    output = bl.explode(bl.encode(full_text), rng, p=0.4)
    assert bl.decode(output) == full_text
    stop = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.7:  # a substring of the text, so it matches somewhere
            start = rng.randrange(len(full_text))
            stop.append(full_text[start : start + rng.randint(1, 6)])
        else:
            stop.append(random_text(rng, 3))
    deltas, got_stop, fed = run_with_stops(bl, output, stop)
    assert all("\ufffd" not in d for d in deltas)
    expected = reference_stop(full_text, stop)
    if expected is None:
        assert got_stop is None
        assert "".join(deltas) == full_text
    else:
        start, s = expected
        assert got_stop == s
        assert "".join(deltas) == full_text[:start]
        first_containing = next(
            i for i in range(1, len(output) + 1) if reference_stop(bl.decode(output[:i]), stop) is not None
        )
        assert fed == first_containing


def test_metaspace_tokenizer_keeps_leading_space_from_prompt_context() -> None:
    # SentencePiece-style tokenizers drop the space of a text's first token when decoding;
    # decoding in the prompt's context keeps it, as the full text has it.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    prompt = hf.encode("Hello", add_special_tokens=False)
    output = hf.encode("Hello world bye", add_special_tokens=False)[len(prompt) :]
    assert not hf.decode(output).startswith(" ")  # the quirk this test is about
    detok = IncrementalDetokenizer(hf, prompt, stop=[])
    text = "".join(detok.add_tokens([t]).text for t in output) + detok.finish()
    full = hf.decode(prompt + output)
    assert text == full[len(hf.decode(prompt)) :] == " world bye"
