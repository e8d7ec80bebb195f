"""A typed Python client for the public Generation API (blocking; `stageserve.async_client` has the
asyncio one). Both stream, take deadlines, and retry UNAVAILABLE before the first token."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# LIVENESS_SERVICE: re-exported, the health service name a client probes liveness with.
from shared.grpc_options import LIVENESS_SERVICE, channel_options  # noqa: F401
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.security import ClientTls, bearer_metadata, open_channel

GENERATION_SERVICE = gen.DESCRIPTOR.services_by_name["Generation"].full_name

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

    def add(self, msg: gen.GenerateResponse) -> None:
        """Folds one streamed message into the result."""
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        self.logprobs.extend(msg.logprobs)
        if msg.finish_reason:
            self.finish_reason = FINISH_REASONS.get(msg.finish_reason, "unknown")
            self.stop_reason = msg.stop_reason
            self.error_message = msg.error_message
            self.prompt_tokens = msg.prompt_tokens
            self.cached_prompt_tokens = msg.cached_prompt_tokens


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE (router starting, restarting, or its pipeline down) done by
    gRPC itself: a call is retried only until the server sends its first message, so a
    stream that already delivered tokens is never replayed. Backoffs are randomised by gRPC
    (each wait is uniform in [0, current backoff]); the call's deadline bounds them all."""

    # Attempts in all, the first included; gRPC caps it at 5. 1 disables retries.
    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be in [1, 5] (gRPC's cap), got {self.max_attempts}")
        if not (0 < self.initial_backoff_s <= self.max_backoff_s):
            raise ValueError(
                f"backoffs must satisfy 0 < initial ({self.initial_backoff_s}) <= max ({self.max_backoff_s})"
            )
        if not self.backoff_multiplier > 0:
            raise ValueError(f"backoff_multiplier must be > 0, got {self.backoff_multiplier}")

    def service_config(self) -> str:
        """The gRPC service config (JSON) that applies this policy to the Generation API."""
        method: dict = {"name": [{"service": GENERATION_SERVICE}]}
        if self.max_attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                "maxBackoff": f"{self.max_backoff_s:.3f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [method]})


def client_channel_options(retry: RetryPolicy) -> list[tuple[str, int | str]]:
    return [*channel_options(), ("grpc.enable_retries", 1), ("grpc.service_config", retry.service_config())]


# A conversation: messages as {"role": ..., "content": ...} (or ChatMessage protos), rendered by
# the router with the model's chat template.
Chat = Sequence[Mapping[str, str] | gen.ChatMessage]
# What the Generate calls take: a text prompt, prompt token ids, or a conversation.
Prompt = str | Sequence[int] | Chat


def build_request(prompt: Prompt, request_id: str = "", **sampling: object) -> gen.GenerateRequest:
    """`sampling` takes SamplingParams' field names (max_new_tokens=..., temperature=...)."""
    request = gen.GenerateRequest(sampling=gen.SamplingParams(**sampling), request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt and isinstance(prompt[0], (Mapping, gen.ChatMessage)):
        request.messages.SetInParent()
        for message in prompt:
            if isinstance(message, gen.ChatMessage):
                request.messages.messages.append(message)
            else:
                request.messages.messages.add(role=message["role"], content=message["content"])
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


# Exit codes of `stageserve health`, grpc_health_probe's: 0 SERVING, 2 the connection failed,
# 3 the call failed otherwise (credentials refused, ...), 4 any answer but SERVING.
HEALTH_EXIT_CODES = {"SERVING": 0, "UNREACHABLE": 2, "RPC_FAILED": 3}


@dataclass(frozen=True)
class HealthStatus:
    """A health check's outcome: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN (the
    server's answer), or UNREACHABLE / RPC_FAILED (no answer; `detail` says why)."""

    status: str
    detail: str = ""

    @property
    def exit_code(self) -> int:
        return HEALTH_EXIT_CODES.get(self.status, 4)


class GenerationClient:
    """`tls`: connect over TLS (None: plaintext). `token`: sent as `authorization: Bearer`
    on every API call, for a router started with --auth-token-file (health needs none)."""

    def __init__(
        self, address: str, retry: RetryPolicy = RetryPolicy(), *, tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.channel = open_channel(address, client_channel_options(retry), tls)
        self.metadata = bearer_metadata(token)
        self.stub = gen_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenerationClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str = "",
        wait_for_ready: bool = False, **sampling: object,
    ) -> Iterator[gen.GenerateResponse]:
        """Yields each streamed message; raises grpc.RpcError on a non-OK status.

        `timeout` (seconds) is the deadline of the whole call, retries included: past it the
        call ends with DEADLINE_EXCEEDED and the router frees the request. `wait_for_ready`
        waits (until the deadline) for an unreachable router instead of failing fast.
        Leaving the loop early cancels the call."""
        call = self.stub.Generate(
            build_request(prompt, request_id, **sampling), timeout=timeout, wait_for_ready=wait_for_ready,
            metadata=self.metadata,
        )
        try:
            yield from call
        finally:
            call.cancel()  # A no-op once the call is over.

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str = "",
        wait_for_ready: bool = False, **sampling: object,
    ) -> GenerationResult:
        result = GenerationResult()
        for msg in self.stream(
            prompt, timeout=timeout, request_id=request_id, wait_for_ready=wait_for_ready, **sampling
        ):
            result.add(msg)
        return result

    def model_info(self, timeout: float = 10.0) -> gen.ModelInfo:
        return self.stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float = 10.0) -> list[int]:
        reply = self.stub.Tokenize(
            gen.TokenizeRequest(text=text, add_special_tokens=add_special_tokens), timeout=timeout,
            metadata=self.metadata,
        )
        return list(reply.token_ids)

    def is_serving(self, service: str = "", timeout: float = 2.0) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def health_status(self, service: str = "", timeout: float = 2.0) -> HealthStatus:
        """What a health probe reports: the service's status, or why there was no answer."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return HealthStatus("UNREACHABLE" if unreachable else "RPC_FAILED",
                                f"{exc.code().name}: {exc.details() or ''}")
        return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def wait_until_serving(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_serving():
                return True
            time.sleep(0.2)
        return False


def stream_to_stdout(
    address: str, prompt: str | Chat, sampling: dict, timeout: float | None = None, retries: int = 4,
    tls: ClientTls | None = None, token: str | None = None,
) -> int:
    with GenerationClient(address, RetryPolicy(max_attempts=retries + 1), tls=tls, token=token) as client:
        try:
            for msg in client.stream(prompt, timeout=timeout, **sampling):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    reason = FINISH_REASONS.get(msg.finish_reason, "?")
                    extra = f": {msg.error_message}" if msg.error_message else ""
                    # stdout is the answer alone (pipe it); how it ended goes to stderr.
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    print(f"[finish: {reason}{extra}]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\nstageserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            # The request itself was wrong: a usage error, as argparse's.
            return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    return 0
