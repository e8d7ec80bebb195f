"""Token-id helpers the router's and the stages' sequence records share."""

from __future__ import annotations

from collections.abc import Sequence


def slice_prompt_and_output(prompt: Sequence[int], output: Sequence[int], start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without building the whole concatenation
    (a decode step of a long sequence needs one token, not a copy of all of them)."""
    prompt_len = len(prompt)
    if end <= prompt_len:
        return list(prompt[start:end])
    if start >= prompt_len:
        return list(output[start - prompt_len : end - prompt_len])
    return list(prompt[start:]) + list(output[: end - prompt_len])
