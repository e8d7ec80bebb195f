"""Validation of the public ``GenerateRequest``.

A request is checked once, on arrival, and turned into a ``ValidatedRequest`` whose sampling
parameters are fully resolved (defaults applied, seed assigned, ``max_new_tokens`` known), so
nothing downstream (scheduler, stages) has to reinterpret proto3 zero values or guard against
bad input. The sampling rules themselves are shared/sampling_params.py's; stages assert them. Every rejection raises ``InvalidRequestError`` whose message names the field, the
offending value and the allowed range; the server maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from shared.config import ConfigError, ModelConfig
from shared.proto import generation_pb2
from shared.sampling_params import InvalidSamplingParams, SamplingParams

MAX_REQUEST_ID_CHARS = 128
# Roles a chat message may have: OpenAI's (developer is its newer name for system). The model's
# template decides which of them it renders; it refuses the others itself.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# Error messages quote client strings; cap the quote so a huge value cannot bloat the status.
_QUOTE_CHARS = 40


class InvalidRequestError(ValueError):
    """The client sent a request we refuse; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds a request must respect, from the model and the router configuration."""

    vocab_size: int
    max_context: int
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_stop_token_ids: int = 64
    max_top_logprobs: int = 20
    max_prompt_chars: int = 1_000_000
    max_chat_messages: int = 1024

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be at least 1, got {self.vocab_size}")
        # A prompt needs one token and generation one more.
        if self.max_context < 2:
            raise ConfigError(f"max_context must be at least 2, got {self.max_context}")
        for name in (
            "max_stop_strings",
            "max_stop_string_len",
            "max_stop_token_ids",
            "max_top_logprobs",
            "max_prompt_chars",
            "max_chat_messages",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_model_config(cls, model: ModelConfig, **overrides: int) -> RequestLimits:
        return cls(vocab_size=model.vocab_size, max_context=model.max_context, **overrides)


@dataclass(frozen=True, kw_only=True)
class ResolvedSampling(SamplingParams):
    """The stages' sampling parameters (shared/sampling_params.py), resolved, plus what only the
    router needs: the stop conditions and the length limit."""

    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    max_new_tokens: int


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: ResolvedSampling


# Renders checked chat messages to token ids with the model's template (router.chat_template).
ChatRender = Callable[[Sequence[generation_pb2.ChatMessage]], list[int]]


def validate_request(
    req: generation_pb2.GenerateRequest,
    tokenizer_encode: Callable[[str], Sequence[int]],
    limits: RequestLimits,
    render_chat: ChatRender | None = None,
) -> ValidatedRequest:
    """Check ``req`` against ``limits`` and resolve it; raises ``InvalidRequestError``.

    ``tokenizer_encode`` turns a text prompt into token ids, special tokens (bos) included;
    ``render_chat`` turns checked messages into token ids (None: the server refused
    ``messages`` before, as FAILED_PRECONDITION).
    """
    request_id = _resolve_request_id(req.request_id)
    prompt_token_ids = _resolve_prompt(req, tokenizer_encode, limits, render_chat)
    sampling = _resolve_sampling(req.sampling, len(prompt_token_ids), limits)
    return ValidatedRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling)


def _quote(text: str) -> str:
    if len(text) <= _QUOTE_CHARS:
        return f"{text!r} ({len(text)} characters)"
    return f"{text[:_QUOTE_CHARS]!r}... ({len(text)} characters)"


def _resolve_request_id(request_id: str) -> str:
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidRequestError(
            f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters "
            f"(or empty to have one assigned), got {_quote(request_id)}"
        )
    return request_id


def check_chat_messages(messages: Sequence[generation_pb2.ChatMessage], limits: RequestLimits) -> None:
    """Roles and sizes of a conversation, before any template work is spent on it."""
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one message (role and content)")
    if len(messages) > limits.max_chat_messages:
        raise InvalidRequestError(
            f"messages has {len(messages)} messages; at most {limits.max_chat_messages} are allowed"
        )
    total = 0
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {_quote(message.role)}; allowed roles: {', '.join(CHAT_ROLES)} "
                "(the model's chat template may accept fewer)"
            )
        # An assistant turn may be empty (a prefilled answer that is still to come).
        if not message.content and message.role != "assistant":
            raise InvalidRequestError(f"messages[{i}].content is empty; only an assistant message may be empty")
        total += len(message.content)
    if total > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"messages have {total} characters of content; at most {limits.max_prompt_chars} are allowed"
        )


def _resolve_prompt(
    req: generation_pb2.GenerateRequest,
    tokenizer_encode: Callable[[str], Sequence[int]],
    limits: RequestLimits,
    render_chat: ChatRender | None,
) -> tuple[int, ...]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError(
            "the request has no input: set exactly one of prompt, prompt_token_ids or messages"
        )
    ids: Sequence[int]
    if kind == "messages":
        messages = req.messages.messages
        check_chat_messages(messages, limits)
        if render_chat is None:
            raise InvalidRequestError("this router cannot render chat messages (the model has no chat template)")
        ids = render_chat(messages)
        if not len(ids):
            raise InvalidRequestError("the chat template rendered these messages to zero tokens")
        where = "the chat-template-rendered prompt"
    elif kind == "prompt":
        prompt = req.prompt  # each read of a proto string field builds a new str
        if not prompt:
            raise InvalidRequestError("prompt is empty: give a non-empty prompt or non-empty prompt_token_ids")
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are allowed"
            )
        ids = tokenizer_encode(prompt)
        if not len(ids):
            raise InvalidRequestError("prompt tokenized to zero tokens; give a prompt that produces at least one")
        where = "the tokenized prompt"
    else:
        # The repeated field itself, not a copy: its length costs nothing.
        ids = req.prompt_token_ids.ids
        if not len(ids):
            raise InvalidRequestError(
                "prompt_token_ids is empty: give at least one token id (or a non-empty prompt)"
            )
        where = "prompt_token_ids"
    # The length first: a prompt too long to serve is refused before a Python int is made
    # for each of its tokens (millions of them: seconds of GIL and hundreds of MB).
    if len(ids) >= limits.max_context:
        raise InvalidRequestError(
            f"prompt has {len(ids)} tokens but the context limit is {limits.max_context}; a prompt may "
            f"have at most {limits.max_context - 1} tokens so that at least one can be generated"
        )
    resolved = tuple(int(t) for t in ids)
    for i, token_id in enumerate(resolved):
        if not 0 <= token_id < limits.vocab_size:
            raise InvalidRequestError(
                f"{where}[{i}] = {token_id} is outside the vocabulary; token ids must be in "
                f"[0, {limits.vocab_size - 1}]"
            )
    return resolved


def _resolve_sampling(
    params: generation_pb2.SamplingParams, prompt_len: int, limits: RequestLimits
) -> ResolvedSampling:
    try:
        stage = SamplingParams.from_request(params, limits.vocab_size, limits.max_top_logprobs)
    except InvalidSamplingParams as exc:
        raise InvalidRequestError(str(exc)) from None

    # The repeated fields themselves: their lengths are checked before any element is read.
    stop = _resolve_stop_strings(params.stop, limits)
    stop_token_ids = _resolve_stop_token_ids(params.stop_token_ids, limits)

    room = limits.max_context - prompt_len
    max_new_tokens = int(params.max_new_tokens)
    if max_new_tokens == 0:
        max_new_tokens = room
    elif max_new_tokens > room:
        raise InvalidRequestError(
            f"prompt has {prompt_len} tokens and sampling.max_new_tokens is {max_new_tokens}: together "
            f"{prompt_len + max_new_tokens} exceed the context limit of {limits.max_context}; for this "
            f"prompt max_new_tokens must be in [1, {room}] (or 0 for as many as fit)"
        )
    return ResolvedSampling(
        **{f.name: getattr(stage, f.name) for f in fields(SamplingParams)},
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=bool(params.ignore_eos),
        max_new_tokens=max_new_tokens,
    )


def _resolve_stop_strings(stop: Sequence[str], limits: RequestLimits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(
            f"sampling.stop has {len(stop)} strings; at most {limits.max_stop_strings} are allowed"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"sampling.stop[{i}] is empty; stop strings must be non-empty")
        if len(s) > limits.max_stop_string_len:
            raise InvalidRequestError(
                f"sampling.stop[{i}] has {len(s)} characters; each stop string may have at most "
                f"{limits.max_stop_string_len}"
            )
    # Duplicates change nothing but the detokenizer's work.
    return tuple(dict.fromkeys(stop))


def _resolve_stop_token_ids(ids: Sequence[int], limits: RequestLimits) -> frozenset[int]:
    if len(ids) > limits.max_stop_token_ids:
        raise InvalidRequestError(
            f"sampling.stop_token_ids has {len(ids)} ids; at most {limits.max_stop_token_ids} are allowed"
        )
    for i, token_id in enumerate(ids):
        if token_id >= limits.vocab_size:
            raise InvalidRequestError(
                f"sampling.stop_token_ids[{i}] = {token_id} is outside the vocabulary; token ids must be "
                f"in [0, {limits.vocab_size - 1}]"
            )
    return frozenset(int(t) for t in ids)
