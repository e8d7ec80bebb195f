"""Requests that are not valid protobuf get INVALID_ARGUMENT, not UNKNOWN.

grpc parses a request before the handler runs; when parsing fails (bytes that are not
valid UTF-8 in a `string` field, a corrupt wire format) the client gets UNKNOWN with
"Unexpected <class DecodeError>", which reads like a server bug. The fault is the
client's, so this interceptor parses leniently and answers INVALID_ARGUMENT naming what
was wrong. Unknown fields are not an error: proto3 skips them, so newer clients work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


def _reason(request: _Malformed) -> str:
    return f"the request is not a valid protobuf message: {request.error}"


class RejectMalformedRequests(grpc.aio.ServerInterceptor):
    """Applies to the unary-request methods of the services named in `services`."""

    def __init__(self, *services: str) -> None:
        self._prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (
            handler is None
            or handler.request_streaming
            or handler.request_deserializer is None
            or not details.method.startswith(self._prefixes)
        ):
            return handler
        parse = handler.request_deserializer

        def lenient_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Malformed(str(exc))

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream_behaviour(handler.unary_stream),
                request_deserializer=lenient_parse,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _unary_behaviour(handler.unary_unary),
            request_deserializer=lenient_parse,
            response_serializer=handler.response_serializer,
        )


def _stream_behaviour(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _reason(request))
        responses = inner(request, context)
        try:
            async for response in responses:
                yield response
        finally:
            # A client gone mid-stream closes this generator; closing the inner one now runs
            # its cleanup (freeing the request's KV blocks) at once, not whenever it is
            # garbage-collected.
            await responses.aclose()

    return behaviour


def _unary_behaviour(inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _reason(request))
        return await inner(request, context)

    return behaviour
