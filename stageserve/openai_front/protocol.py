"""OpenAI's request and response bodies, and their translation to and from the gRPC API.

Requests are parsed by pydantic models that forbid unknown fields: a parameter this server
does not implement is a 400 that names it, never silently ignored (a client relying on it
would get a different behaviour without knowing). Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (n=1, echo=false, no tools, ...), so
clients that always send them still work. Numeric ranges are the router's to check: its
INVALID_ARGUMENT message becomes the 400's message.

Responses are plain dicts (serialised once by the caller), built from `GenerateResponse`s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.proto import generation_pb2 as gen

# OpenAI's defaults where they differ from the gRPC API's zero values.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_MAX_TOKENS = 16
# JSON has no -Infinity: a token the sampler could never pick gets this (as vLLM does).
MIN_LOGPROB = -9999.0
# The finish reasons OpenAI knows; EOS is a "stop" to it.
FINISH_REASONS = {
    gen.FINISH_REASON_LENGTH: "length",
    gen.FINISH_REASON_STOP: "stop",
    gen.FINISH_REASON_EOS: "stop",
}


class UnsupportedParameter(ValueError):
    """A request sets a parameter this server does not implement (to a non-neutral value)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    # Accepted for clients that send it; every chunk is sent at once anyway.
    continuous_usage_stats: bool = False


class _GenerationRequest(BaseModel):
    """Parameters both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # An end-user id (OpenAI uses it for abuse monitoring): logged with the request id only.
    user: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras, in the body (the openai SDK's extra_body).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    def check_supported(self) -> None:
        if self.n != 1:
            raise UnsupportedParameter(
                f"n = {self.n} is not supported: this server returns one choice per request (n = 1); "
                "send n requests (with different seeds) instead"
            )
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias is not supported; leave it out (or empty)")

    def base_sampling(self, max_new_tokens: int) -> gen.SamplingParams:
        sampling = gen.SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            # vLLM's -1 and the API's 0 both mean "no top-k".
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 0.0,
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            sampling.seed = self.seed
        if self.stop is not None:
            sampling.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return sampling

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    # A text prompt, or token ids; OpenAI's list forms with one prompt are accepted too.
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise UnsupportedParameter("echo is not supported; leave it out (or false)")
        if self.suffix:
            raise UnsupportedParameter("suffix is not supported; leave it out")
        if self.best_of not in (None, 1):
            raise UnsupportedParameter(f"best_of = {self.best_of} is not supported; leave it out (or 1)")

    def to_grpc(self, request_id: str) -> gen.GenerateRequest:
        self.check_supported()
        sampling = self.base_sampling(self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)
        if self.logprobs is not None:
            sampling.return_logprob = True
            sampling.logprobs = self.logprobs
            sampling.logprob_token_text = True
        request = gen.GenerateRequest(sampling=sampling, request_id=request_id)
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise UnsupportedParameter(
                    f"prompt holds {len(prompt)} prompts; this server takes one prompt per request "
                    "(a string or a list of token ids)"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            # An empty list reaches the router, which says what it needs.
            request.prompt_token_ids.SetInParent()
            request.prompt_token_ids.ids.extend(prompt)
        return request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Checked by the router (and the model's template), which says which roles it allows.
    role: str
    # Text, or text parts (joined); None only for an assistant turn.
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessageIn]
    # OpenAI's newer name for max_tokens; either may be given (not both).
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise UnsupportedParameter("tools (function calling) are not supported; leave them out")
        if self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedParameter("tool_choice is not supported without tools; leave it out")
        for i, message in enumerate(self.messages):
            if message.name is not None:
                raise UnsupportedParameter(f"messages[{i}].name is not supported; leave it out")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise UnsupportedParameter("give max_completion_tokens or max_tokens, not both")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameter("top_logprobs needs logprobs = true")

    def to_grpc(self, request_id: str) -> gen.GenerateRequest:
        self.check_supported()
        # Unset: as many tokens as the context leaves (the gRPC API's 0).
        sampling = self.base_sampling(self.max_completion_tokens or self.max_tokens or 0)
        if self.logprobs:
            sampling.return_logprob = True
            sampling.logprobs = self.top_logprobs or 0
            sampling.logprob_token_text = True
        request = gen.GenerateRequest(sampling=sampling, request_id=request_id)
        request.messages.SetInParent()
        for message in self.messages:
            request.messages.messages.add(role=message.role, content=message.text())
        return request


# ---- responses -----------------------------------------------------------------------------


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprobs(logprobs: list[gen.TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object (`content`: one entry per token)."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": _logprob(lp.logprob),
                "bytes": list(lp.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": alt.token, "logprob": _logprob(alt.logprob), "bytes": list(alt.token.encode("utf-8"))}
                    for alt in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs(logprobs: list[gen.TokenLogprob], text_offset: int) -> dict[str, Any]:
    """OpenAI's legacy completion `logprobs` object; `text_offset` is where the first token's
    text starts in the completion (a stream's chunks continue where the last one ended)."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": [_top_by_text(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


def _top_by_text(top: list[gen.TopLogprob]) -> dict[str, float]:
    """The legacy format keys alternatives by text; of two that decode alike (two halves of
    multi-byte characters are both U+FFFD) the likelier one (listed first) keeps the key."""
    out: dict[str, float] = {}
    for alt in top:
        out.setdefault(alt.token, _logprob(alt.logprob))
    return out


@dataclass
class Collected:
    """A whole answer folded from its stream (non-streamed responses, and usage)."""

    text: str = ""
    completion_tokens: int = 0
    logprobs: list[gen.TokenLogprob] = field(default_factory=list)
    finish_reason: int = gen.FINISH_REASON_UNSPECIFIED
    stop_reason: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, msg: gen.GenerateResponse) -> None:
        self.text += msg.text
        self.logprobs.extend(msg.logprobs)
        self.count(msg)

    def count(self, msg: gen.GenerateResponse) -> None:
        """Only what `usage` and the finish need: a streamed answer's text and logprobs go out
        in its chunks, so copying them here would be work per token for nothing."""
        self.completion_tokens += len(msg.token_ids)
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
            self.stop_reason = msg.stop_reason
            self.error_message = msg.error_message
            self.prompt_tokens = msg.prompt_tokens
            self.cached_tokens = msg.cached_prompt_tokens

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def stop_reason(msg: gen.GenerateResponse | Collected) -> str | None:
    """vLLM's extra `stop_reason`: the stop string (or token id) that ended the answer."""
    return msg.stop_reason or None


def now() -> int:
    return int(time.time())
