"""Tokenizing prompts in the router without stalling its other streams.

The router's event loop streams every answer and its engine thread drives every step, so
anything that holds the GIL, or a core, for long in the router shows up as a gap in every
stream. Measured on the demo tokenizer (2-core CPU machine, 1,000,000 CJK characters ->
2.9M tokens): `tokenizers.Tokenizer.encode` holds the GIL for the whole 3 s it runs,
`encode_batch` releases it but runs on tokenizers' own thread pool at normal priority, and
turning the result into Python ints holds the GIL ~70 ms. With eight such prompts at once
(tests/system/test_bad_input.py) other streams' gaps still reached 0.5 s on a busy 2-core host from CPU alone.

So texts longer than LARGE_TEXT_CHARS are tokenized in a separate process at a lower CPU
priority (`LargeTextEncoder`): the serving threads win the CPU whenever they need it, the
router's GIL is never involved, and only the token count crosses back when the prompt is too
long to serve anyway. Shorter texts are tokenized in the router's thread pool with
`encode_batch` (GIL released), their ids read only after validation checked their count.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, overload

# Texts at least this long go to the tokenizer process (a round trip costs ~1 ms).
LARGE_TEXT_CHARS = 32_768
# The tokenizer process's niceness: it yields the CPU to the serving threads, yet still gets
# a share of it next to them (19 would starve it on a busy host).
LARGE_TEXT_NICENESS = 10


class EncodedIds(Sequence[int]):
    """A tokenized prompt whose length is known at once and whose ids become Python ints
    only when first read."""

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding
        self._ids: list[int] | None = None

    def _materialized(self) -> list[int]:
        if self._ids is None:
            self._ids = self._encoding.ids
        return self._ids

    def __len__(self) -> int:
        return len(self._encoding)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self._materialized()[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._materialized())


class CountedIds(Sequence[int]):
    """The token count of a prompt too long to serve, without its ids (they never left the
    tokenizer process); reading an id is a bug, since validation refuses it first."""

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("a prompt over the context limit has no ids; validation refuses it first")


class PromptEncoder:
    """`encode(text)`: the prompt's token ids, special tokens (bos) included, exactly as
    `tokenizer.encode(text, add_special_tokens=True)` gives them. `max_tokens`: above it,
    only the count is returned (CountedIds)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self._tokenizer = tokenizer
        # Fast (Rust) tokenizers only; a slow one is called as it is, on the calling thread.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._large = LargeTextEncoder(self._backend.to_str(), max_tokens) if self._backend is not None else None

    def start(self) -> None:
        """Starts the tokenizer process now, at start-up: started by the first long prompt,
        its own start-up (a second of CPU) would compete with the streams being served."""
        if self._large is not None:
            self._large.encode("warm-up")

    def encode(self, text: str) -> Sequence[int]:
        if self._backend is None:
            return self._tokenizer.encode(text, add_special_tokens=True)
        if len(text) >= LARGE_TEXT_CHARS:
            assert self._large is not None
            return self._large.encode(text)
        (encoding,) = self._backend.encode_batch([text], add_special_tokens=True)
        return EncodedIds(encoding)

    def close(self) -> None:
        if self._large is not None:
            self._large.close()


class LargeTextEncoder:
    """One tokenizer process, started on first use (PromptEncoder.start), at LARGE_TEXT_NICENESS. It is built from
    the router's own backend tokenizer (its JSON, with the post-processor transformers set
    up), so it tokenizes exactly as the router would. One text at a time: eight long
    prompts at once queue here instead of taking every core."""

    def __init__(self, tokenizer_json: str, max_tokens: int) -> None:
        self._tokenizer_json = tokenizer_json
        self._max_tokens = max_tokens
        self._pool: ProcessPoolExecutor | None = None

    def encode(self, text: str) -> Sequence[int]:
        if self._pool is None:
            # spawn: a fork of the router would copy its threads' locks mid-use.
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self._tokenizer_json, LARGE_TEXT_NICENESS),
            )
        count, ids = self._pool.submit(_encode_in_worker, text, self._max_tokens).result()
        return ids if ids is not None else CountedIds(count)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


_worker_tokenizer: Any = None


def _init_worker(tokenizer_json: str, niceness: int) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    os.nice(niceness)
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(text: str, max_tokens: int) -> tuple[int, list[int] | None]:
    """(token count, the ids, or None when there are more than max_tokens of them)."""
    encoding = _worker_tokenizer.encode(text, add_special_tokens=True)
    count = len(encoding)
    return count, (encoding.ids if count <= max_tokens else None)
