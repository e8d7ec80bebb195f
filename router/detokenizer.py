"""Incremental detokenization with stop strings.

Tokens arrive one (or a few) at a time and the client wants text as soon as it is final.
Decoding each token alone is wrong twice over: a multi-byte character may be split across
tokens (alone, each part decodes to U+FFFD), and some tokenizers decode a token differently
at the start of a text (SentencePiece drops the leading space). So we decode a small window
of tokens: ``ids[prefix_offset:read_offset]`` is text already emitted, kept only as context,
and ``ids[read_offset:]`` is new. The new text is the window's decode minus the context's
decode, and it is emitted only once it no longer ends in U+FFFD (an incomplete character).
After an emission the window slides forward, so each token costs a decode of a few tokens,
never of the whole output.

Stop strings: the last ``max(len(stop)) - 1`` characters of final text are held back, so a
stop string that arrives split across tokens is caught before any of it reaches the client.

The router detokenizes every stream of a step together (`add_tokens_batch`): two calls of the
tokenizer per step, not two per stream, and with a fast tokenizer both are one Rust
`decode_batch` each (transformers' per-call wrapper cost more than the decode itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Where transformers' fast tokenizers define _decode (v5, v4) and decode (which calls it): a
# tokenizer whose two methods come from there decodes with the Rust tokenizer and nothing
# else, so the Rust decode_batch gives the same texts.
_FAST_DECODE_MODULES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")
_BASE_DECODE_MODULES = (*_FAST_DECODE_MODULES, "transformers.tokenization_utils_base")

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first output tokens, so the first token decodes as
# it would mid-text (a leading space survives). A few are enough for any tokenizer we know.
PROMPT_CONTEXT_TOKENS = 5
# An incomplete UTF-8 character spans at most 3 bytes, hence at most 3 tokens. If text still
# ends in U+FFFD after this many undecoded tokens, the model produced invalid bytes (or a
# literal U+FFFD): emit it rather than let the window, and the cost per token, grow forever.
MAX_PENDING_TOKENS = 16


@dataclass
class DetokenizerStep:
    # Text safe to send now. When a stop string matched: the text up to, not including, it.
    text: str
    # The stop string that matched; generation must end. None otherwise.
    stop_string: str | None = None


class TokenDecoder:
    """Decodes many id lists in one call: a fast tokenizer's Rust `decode_batch`, else one
    `decode` each. Cleanup (" ." -> ".") is off: it rewrites text across the window
    boundary, so the deltas would no longer add up."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)

        def defined_in(name: str) -> str:
            return getattr(getattr(type(tokenizer), name, None), "__module__", "")

        plain = defined_in("_decode") in _FAST_DECODE_MODULES and defined_in("decode") in _BASE_DECODE_MODULES
        self._decode_batch = backend.decode_batch if plain and hasattr(backend, "decode_batch") else None

    def decode(self, id_lists: Sequence[Sequence[int]]) -> list[str]:
        if not id_lists:
            return []
        if self._decode_batch is not None:
            return self._decode_batch([list(ids) for ids in id_lists], skip_special_tokens=self.skip_special_tokens)
        return [
            self.tokenizer.decode(
                list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
            )
            for ids in id_lists
        ]


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas; see the module docstring.

    The deltas concatenate to ``tokenizer.decode(output_ids)`` (cut before the first stop
    string that matched) for tokenizers whose decode of a text extends the decode of its
    prefix, which holds for byte-level BPE and SentencePiece tokenizers.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool = True,
        decoder: TokenDecoder | None = None,
    ) -> None:
        """`decoder`: one shared by the detokenizers that are stepped together (it must
        decode with `tokenizer` and `skip_special_tokens`); by default a new one."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._decoder = decoder if decoder is not None else TokenDecoder(tokenizer, skip_special_tokens)
        assert self._decoder.tokenizer is tokenizer and self._decoder.skip_special_tokens == skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))
        # Characters of final text that could be the start of a stop string still arriving.
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._finished = False

        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would make the context's decode end in U+FFFD,
        # which the first output tokens then turn into a real character: the length of the
        # context text would no longer mark where new text starts. Decode without context.
        context_text = self._decoder.decode([context])[0]
        if context_text.endswith(REPLACEMENT_CHAR):
            context, context_text = [], ""
        # Only the window is kept: ids before prefix_offset are dropped as the window slides.
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = context_text
        # Final text not yet emitted (the stop-string hold-back).
        self._held = ""
        # New text of the current step, between _take and _release.
        self._new_text = ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerStep:
        """Append output tokens; returns the text that became safe to emit."""
        return add_tokens_batch([(self, token_ids)])[0]

    def finish(self) -> str:
        """Flush everything held back; for an end other than a stop string (length, eos, ...)."""
        if self._finished:
            return ""
        return _step([self], force=True)[0].text

    # The two halves of one decode step, so a batch of detokenizers shares each tokenizer call:
    # decode the window; if its new text is complete (or forced), slide the window and
    # decode the new context.

    def _has_pending(self) -> bool:
        return len(self._ids) > self._read_offset

    def _take(self, window_text: str, force: bool) -> bool:
        """The window's decode is in; returns whether the window slid (its new context then
        needs decoding). The new text waits in _new_text."""
        complete = len(window_text) > len(self._prefix_text) and not window_text.endswith(REPLACEMENT_CHAR)
        if not (complete or force or len(self._ids) - self._read_offset > MAX_PENDING_TOKENS):
            return False  # _new_text stays "" (_step cleared it)
        self._new_text = window_text[len(self._prefix_text) :]
        # The tokens just decoded become the context of the next window.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return True

    def _release(self, new_text: str, final: bool) -> DetokenizerStep:
        held = self._held + new_text
        match = self._find_stop(held)
        if match is not None:
            start, stop_string = match
            self._held = ""
            self._finished = True
            return DetokenizerStep(text=held[:start], stop_string=stop_string)
        if final:
            self._held = ""
            self._finished = True
            return DetokenizerStep(text=held)
        cut = max(len(held) - self._hold, 0)
        self._held = held[cut:]
        return DetokenizerStep(text=held[:cut])

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in ``text``, as (start index, string)."""
        # Everything before the hold-back was searched in earlier calls, and a stop string
        # ending in the new text starts inside the hold-back, so searching this short text
        # finds every new match. Of several, the one ending first would have stopped
        # generation first; on a tie, the longer one (it starts earlier) is cut.
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            start = text.find(s)
            if start < 0:
                continue
            key = (start + len(s), start, s)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        return best[1], best[2]


def add_tokens_batch(
    items: Sequence[tuple[IncrementalDetokenizer, Sequence[int]]],
) -> list[DetokenizerStep]:
    """`add_tokens` for several detokenizers at once (each at most once), in two tokenizer
    calls per decoder instead of two per detokenizer; same results as one call each."""
    assert len({id(detok) for detok, _ in items}) == len(items), "a detokenizer twice in one batch"
    for detok, token_ids in items:
        if detok._finished:
            raise RuntimeError("add_tokens called after the detokenizer finished")
        detok._ids.extend(token_ids)
    return _step([detok for detok, _ in items], force=False)


def _step(detoks: Sequence[IncrementalDetokenizer], force: bool) -> list[DetokenizerStep]:
    by_decoder: dict[int, list[IncrementalDetokenizer]] = {}
    for detok in detoks:
        detok._new_text = ""
        if detok._has_pending():
            by_decoder.setdefault(id(detok._decoder), []).append(detok)
    for group in by_decoder.values():
        decoder = group[0]._decoder
        windows = decoder.decode([d._ids for d in group])
        slid = [d for d, text in zip(group, windows) if d._take(text, force)]
        for detok, context_text in zip(slid, decoder.decode([d._ids for d in slid])):
            detok._prefix_text = context_text
    return [detok._release(detok._new_text, final=force) for detok in detoks]
