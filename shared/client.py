"""A typed Python client for the public Generation API."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_options import channel_options
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc

FINISH_REASONS = {
    gen.FINISH_REASON_LENGTH: "length",
    gen.FINISH_REASON_STOP: "stop",
    gen.FINISH_REASON_EOS: "eos",
    gen.FINISH_REASON_CANCELLED: "cancelled",
    gen.FINISH_REASON_ERROR: "error",
}


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[gen.TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


def build_request(
    prompt: str | Sequence[int], request_id: str = "", **sampling: object
) -> gen.GenerateRequest:
    """`sampling` takes SamplingParams' field names (max_new_tokens=..., temperature=...)."""
    request = gen.GenerateRequest(sampling=gen.SamplingParams(**sampling), request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


class GenerationClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = gen_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenerationClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, request_id: str = "", **sampling: object
    ) -> Iterator[gen.GenerateResponse]:
        """Yields each streamed message; raises grpc.RpcError on a non-OK status."""
        yield from self.stub.Generate(build_request(prompt, request_id, **sampling), timeout=timeout)

    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, request_id: str = "", **sampling: object
    ) -> GenerationResult:
        result = GenerationResult()
        for msg in self.stream(prompt, timeout=timeout, request_id=request_id, **sampling):
            result.token_ids.extend(msg.token_ids)
            result.text += msg.text
            result.logprobs.extend(msg.logprobs)
            if msg.finish_reason:
                result.finish_reason = FINISH_REASONS.get(msg.finish_reason, "unknown")
                result.stop_reason = msg.stop_reason
                result.error_message = msg.error_message
                result.prompt_tokens = msg.prompt_tokens
                result.cached_prompt_tokens = msg.cached_prompt_tokens
        return result

    def model_info(self, timeout: float = 10.0) -> gen.ModelInfo:
        return self.stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=timeout)

    def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float = 10.0) -> list[int]:
        reply = self.stub.Tokenize(gen.TokenizeRequest(text=text, add_special_tokens=add_special_tokens), timeout=timeout)
        return list(reply.token_ids)

    def is_serving(self, service: str = "", timeout: float = 2.0) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_serving(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_serving():
                return True
            time.sleep(0.2)
        return False
