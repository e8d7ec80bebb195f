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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))
        # Characters of final text that could be the start of a stop string still arriving.
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._finished = False

        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would make the context's decode end in U+FFFD,
        # which the first output tokens then turn into a real character: the length of the
        # context text would no longer mark where new text starts. Decode without context.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        # Only the window is kept: ids before prefix_offset are dropped as the window slides.
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        # Final text not yet emitted (the stop-string hold-back).
        self._held = ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerStep:
        """Append output tokens; returns the text that became safe to emit."""
        if self._finished:
            raise RuntimeError("add_tokens called after the detokenizer finished")
        self._ids.extend(token_ids)
        return self._release(self._decode_new(force=False), final=False)

    def finish(self) -> str:
        """Flush everything held back; for an end other than a stop string (length, eos, ...)."""
        if self._finished:
            return ""
        return self._release(self._decode_new(force=True), final=True).text

    def _decode(self, ids: Sequence[int]) -> str:
        # Cleanup (" ." -> ".") rewrites text across the window boundary; the deltas would no
        # longer add up, so it is off.
        return self._tokenizer.decode(
            list(ids),
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_new(self, force: bool) -> str:
        """Text of the tokens after read_offset, if complete (or if force); slides the window."""
        num_pending = len(self._ids) - self._read_offset
        if num_pending == 0:
            return ""
        window_text = self._decode(self._ids)
        complete = len(window_text) > len(self._prefix_text) and not window_text.endswith(REPLACEMENT_CHAR)
        if not (complete or force or num_pending > MAX_PENDING_TOKENS):
            return ""
        new_text = window_text[len(self._prefix_text) :]
        # The tokens just decoded become the context of the next window.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new_text

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
