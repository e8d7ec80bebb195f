"""The HTTP routes of the OpenAI-compatible front (FastAPI on uvicorn), each a call to the router.

* POST /v1/completions, POST /v1/chat/completions: one `Generate` stream per request; with
  `stream: true` its messages go out as server-sent events as they come (`data: [DONE]` last).
  The stream's first message (or its refusal) is awaited before the HTTP status is sent, so
  a request the router refuses gets its 4xx, not a 200 with an error inside.
* GET /v1/models, GET /health (200 only while the router reports SERVING), GET /metrics.

A client that goes away cancels its gRPC call, so the router frees the sequence's KV blocks
at its next step: a streamed response notices when writing to the closed connection fails
(Starlette then closes the generator), a non-streamed one by watching for the disconnect
while it waits.

The `Authorization` header is forwarded to the router as it is: a router started with
--auth-token-file checks it, and its UNAUTHENTICATED becomes a 401. The front holds no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError

from shared.metrics import LATENCY_BUCKETS, NAMESPACE, new_registry
from stageserve.client import RetryPolicy, client_channel_options
from stageserve.openai_front.protocol import (
    FINISH_REASONS,
    ChatCompletionRequest,
    Collected,
    CompletionRequest,
    UnsupportedParameter,
    chat_logprobs,
    completion_logprobs,
    now,
)
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.security import open_aio_channel

log = logging.getLogger("stageserve.openai")

# gRPC status of the router -> (HTTP status, OpenAI error type).
_HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    # The request does not fit this deployment (chat messages to a model without a template).
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """Answered as OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    @classmethod
    def from_grpc(cls, exc: grpc.aio.AioRpcError) -> ApiError:
        status, type_ = _HTTP_OF_GRPC.get(exc.code(), (500, "server_error"))
        return cls(status, exc.details() or exc.code().name, type_, exc.code().name.lower())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def response(self) -> Response:
        return Response(_dumps(self.body()), status_code=self.status, media_type="application/json")


# What json.dumps(data, ensure_ascii=False, separators=(",", ":")) builds on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(data: Any) -> bytes:
    return _ENCODER.encode(data).encode("utf-8")


def _sse(data: Any) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"


class FrontMetrics:
    """The front's own series (the router's are on its --metrics-port)."""

    def __init__(self) -> None:
        self.registry = new_registry()
        r, ns = self.registry, NAMESPACE
        self.requests = Counter(
            "openai_requests", "HTTP requests answered, by endpoint and HTTP status (a stream counts "
            "with the status it started with).", ["endpoint", "status"], namespace=ns, registry=r,
        )
        self.in_progress = Gauge(
            "openai_requests_in_progress", "Generation requests open (waiting or streaming).",
            namespace=ns, registry=r,
        )
        self.ttft = Histogram(
            "openai_time_to_first_token_seconds", "Time from a request's arrival at the front to its "
            "first token (the router's queueing, prefill and the extra hop included).",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "openai_e2e_request_latency_seconds", "Time from a request's arrival at the front to its last byte.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.generation_tokens = Counter(
            "openai_generation_tokens", "Tokens sent to HTTP clients.", namespace=ns, registry=r
        )
        self.disconnects = Counter(
            "openai_client_disconnects", "Requests whose client went away before the answer ended "
            "(their gRPC call was cancelled).", namespace=ns, registry=r,
        )


class Front:
    """One gRPC channel to the router, shared by every HTTP request of this process."""

    def __init__(self, config: Any) -> None:
        # An OpenAIFrontConfig (server.py); typed loosely to keep this module free of it.
        self.config = config
        self.metrics = FrontMetrics()
        self.channel: grpc.aio.Channel | None = None
        self.stub: gen_grpc.GenerationStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None
        self._model_name: str | None = config.served_model_name
        self.created = now()

    async def open(self) -> None:
        # On the server's event loop: a grpc.aio channel belongs to the loop it was made on.
        retry = RetryPolicy(max_attempts=self.config.router_retries + 1)
        self.channel = open_aio_channel(
            self.config.router_address, client_channel_options(retry), self.config.router_tls
        )
        self.stub = gen_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def metadata(request: Request) -> tuple[tuple[str, str], ...] | None:
        authorization = request.headers.get("authorization")
        return (("authorization", authorization),) if authorization else None

    async def model_info(self, request: Request) -> gen.ModelInfo:
        try:
            return await self.stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=10, metadata=self.metadata(request))
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_grpc(exc) from None

    async def served_model(self, request: Request) -> str:
        if self._model_name is None:
            # The router's name for it: the model folder's name.
            self._model_name = (await self.model_info(request)).model_name
        return self._model_name

    async def check_model(self, request: Request, model: str) -> str:
        served = await self.served_model(request)
        if model != served:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}",
                           "not_found_error", "model_not_found")
        return served

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
            )
            raise ApiError(400, f"invalid request: {problems}") from None

    # ---- generation --------------------------------------------------------------------------

    async def generate(self, request: Request, kind: str) -> Response:
        """POST /v1/completions (kind "completion") and /v1/chat/completions ("chat")."""
        arrived = time.monotonic()
        chat = kind == "chat"
        body = await self.parse(request, ChatCompletionRequest if chat else CompletionRequest)
        model = await self.check_model(request, body.model)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            grpc_request = body.to_grpc(request_id)
        except UnsupportedParameter as exc:
            raise ApiError(400, str(exc), code="unsupported_parameter") from None
        if body.user:
            log.info("request %s for user %r", request_id, body.user)
        call = self.stub.Generate(grpc_request, metadata=self.metadata(request))
        stream = call.__aiter__()
        self.metrics.in_progress.inc()
        handed_over = False
        try:
            # The first message, or the router's refusal (validation runs before any token).
            first = await _unless_disconnected(request, stream.__anext__())
            if first is None:
                self.metrics.disconnects.inc()
                return Response(status_code=499)
            self.metrics.ttft.observe(time.monotonic() - arrived)
            header = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                      "created": now(), "model": model}
            if body.stream:
                handed_over = True
                events = self._events(call, stream, first, header, chat, body.include_usage, arrived)
                return _ClosingStreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
            answer = Collected()
            answer.add(first)
            more = await _unless_disconnected(request, _collect(stream, answer))
            if more is None:
                self.metrics.disconnects.inc()
                return Response(status_code=499)
            return self._answer(header, answer, chat)
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_grpc(exc) from None
        except StopAsyncIteration:
            raise ApiError(502, "the router ended the stream without an answer", "server_error") from None
        finally:
            if not handed_over:
                call.cancel()  # A no-op once the call is over.
                self.metrics.in_progress.dec()
                self.metrics.e2e.observe(time.monotonic() - arrived)

    def _answer(self, header: dict[str, Any], answer: Collected, chat: bool) -> Response:
        if answer.finish_reason not in FINISH_REASONS:
            message = answer.error_message or "the request ended without an answer (cancelled by the router)"
            raise ApiError(500, message, "server_error")
        self.metrics.generation_tokens.inc(answer.completion_tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH_REASONS[answer.finish_reason],
                                  "stop_reason": answer.stop_reason or None}
        if chat:
            choice["message"] = {"role": "assistant", "content": answer.text}
            choice["logprobs"] = chat_logprobs(answer.logprobs) if answer.logprobs else None
        else:
            choice["text"] = answer.text
            choice["logprobs"] = completion_logprobs(answer.logprobs, 0) if answer.logprobs else None
        body = {**header, "choices": [choice], "usage": answer.usage()}
        return Response(_dumps(body), media_type="application/json")

    async def _events(
        self, call: grpc.aio.UnaryStreamCall, stream: AsyncIterator[gen.GenerateResponse],
        first: gen.GenerateResponse, header: dict[str, Any], chat: bool, include_usage: bool, arrived: float,
    ) -> AsyncIterator[bytes]:
        """The server-sent events of one streamed answer. Closing this generator (the client
        went away: Starlette's write failed, or it saw the disconnect) cancels the call."""
        header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}
        total = Collected()
        text_offset = 0
        ended = False
        # Every chunk is this header around one choice: serialised once, not once per token.
        prefix = b"data: " + _dumps(header)[:-1] + b',"choices":['
        suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

        def chunk(choice: dict[str, Any]) -> bytes:
            return prefix + _dumps(choice) + suffix

        try:
            if chat:
                # OpenAI's first chunk names the role, with empty content.
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            msg: gen.GenerateResponse | None = first
            while msg is not None:
                total.count(msg)
                self.metrics.generation_tokens.inc(len(msg.token_ids))
                if msg.finish_reason and msg.finish_reason not in FINISH_REASONS:
                    raise ApiError(500, msg.error_message or "the request was cancelled by the router", "server_error")
                finish = FINISH_REASONS.get(msg.finish_reason)
                if finish is None and not msg.text and not msg.logprobs:
                    # A token that ends inside a multi-byte character has no text yet.
                    msg = await anext(stream, None)
                    continue
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = msg.stop_reason or None
                if chat:
                    choice["delta"] = {"content": msg.text} if msg.text or finish is None else {}
                    choice["logprobs"] = chat_logprobs(list(msg.logprobs)) if msg.logprobs else None
                else:
                    choice["text"] = msg.text
                    choice["logprobs"] = completion_logprobs(list(msg.logprobs), text_offset) if msg.logprobs else None
                    text_offset += sum(len(lp.token) for lp in msg.logprobs)
                yield chunk(choice)
                msg = await anext(stream, None)
            if include_usage:
                yield _sse({**header, "choices": [], "usage": total.usage()})
            ended = True
        except grpc.aio.AioRpcError as exc:
            # After the 200 went out an error can only be an event (as vLLM and OpenAI do).
            yield _sse(ApiError.from_grpc(exc).body())
            ended = True
        except ApiError as exc:
            yield _sse(exc.body())
            ended = True
        finally:
            if not ended:
                self.metrics.disconnects.inc()
            call.cancel()  # The client went away (or the stream is over: a no-op).
            self.metrics.in_progress.dec()
            self.metrics.e2e.observe(time.monotonic() - arrived)
        yield b"data: [DONE]\n\n"

    # ---- the other endpoints -----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        info = await self.model_info(request)
        name = self.config.served_model_name or info.model_name
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "stageserve",
                "max_model_len": info.max_context}
        return Response(_dumps({"object": "list", "data": [card]}), media_type="application/json")

    async def health_check(self) -> Response:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            detail = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            serving, detail = False, f"router unreachable: {exc.code().name}"
        return Response(_dumps({"status": "SERVING" if serving else "NOT_SERVING", "router": detail}),
                        status_code=200 if serving else 503, media_type="application/json")


async def _collect(stream: AsyncIterator[gen.GenerateResponse], into: Collected) -> bool:
    async for msg in stream:
        into.add(msg)
    return True


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away. The body is read, so the next ASGI message is the
    disconnect (Starlette's StreamingResponse listens the same way): one waiting task per
    request instead of polling `is_disconnected`, which hundreds of waiting requests would
    pay for on every poll."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any | None:
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client went away, or this request itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, StopAsyncIteration):
                await task
    return None if task.cancelled() else task.result()


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator whatever ended the response, so the gRPC call is cancelled
    now (the generator's `finally`), not whenever the generator is garbage-collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _CountRequests:
    """Counts responses by route and status: a plain ASGI middleware, because Starlette's
    BaseHTTPMiddleware re-wraps streamed bodies (a cost per chunk) and hides disconnects."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: Any, metrics: FrontMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Unknown paths share one label: a scanner must not grow the series without bound.
        route = scope["path"] if scope["path"] in self.ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(config: Any) -> FastAPI:
    front = Front(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await front.open()
        yield
        await front.close()

    # No generated docs: the API is OpenAI's, documented there; fewer routes to expose.
    app = FastAPI(title="stageserve OpenAI-compatible API", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.front = front
    app.add_middleware(_CountRequests, metrics=front.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await front.generate(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await front.models(request)

    @app.get("/health")
    async def health() -> Response:
        return await front.health_check()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
