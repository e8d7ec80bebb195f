"""The asyncio client for the public Generation API: the same calls, deadlines and retry
policy as `stageserve.client.GenerationClient`, on a grpc.aio channel, so one event loop can
drive many concurrent streams without a thread each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.security import ClientTls, bearer_metadata, open_aio_channel
from stageserve.client import GenerationResult, Prompt, RetryPolicy, build_request, client_channel_options


class AsyncGenerationClient:
    """Use as `async with AsyncGenerationClient(addr) as client:`; the channel must be
    created and closed on the event loop that uses it. `tls` and `token` as in GenerationClient."""

    def __init__(
        self, address: str, retry: RetryPolicy = RetryPolicy(), *, tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.channel = open_aio_channel(address, client_channel_options(retry), tls)
        self.metadata = bearer_metadata(token)
        self.stub = gen_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str = "",
        wait_for_ready: bool = False, **sampling: object,
    ) -> AsyncIterator[gen.GenerateResponse]:
        """Yields each streamed message; raises grpc.aio.AioRpcError on a non-OK status.
        `timeout` is the deadline of the whole call, retries included. Leaving the loop
        early (or cancelling the task) cancels the call, and the router frees the request."""
        call = self.stub.Generate(
            build_request(prompt, request_id, **sampling), timeout=timeout, wait_for_ready=wait_for_ready,
            metadata=self.metadata,
        )
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()  # A no-op once the call is over.

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str = "",
        wait_for_ready: bool = False, **sampling: object,
    ) -> GenerationResult:
        result = GenerationResult()
        async for msg in self.stream(
            prompt, timeout=timeout, request_id=request_id, wait_for_ready=wait_for_ready, **sampling
        ):
            result.add(msg)
        return result

    async def model_info(self, timeout: float = 10.0) -> gen.ModelInfo:
        return await self.stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    async def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float = 10.0) -> list[int]:
        reply = await self.stub.Tokenize(
            gen.TokenizeRequest(text=text, add_special_tokens=add_special_tokens), timeout=timeout,
            metadata=self.metadata,
        )
        return list(reply.token_ids)

    async def is_serving(self, service: str = "", timeout: float = 2.0) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_until_serving(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.is_serving():
                return True
            await asyncio.sleep(0.2)
        return False
