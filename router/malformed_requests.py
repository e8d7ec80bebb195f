"""Requests that are not valid protobuf, or too large to be valid, get INVALID_ARGUMENT
before the handler runs.

grpc parses a request before the handler runs; when parsing fails (bytes that are not
valid UTF-8 in a `string` field, a corrupt wire format) the client gets UNKNOWN with
"Unexpected <class DecodeError>", which reads like a server bug. The fault is the
client's, so this interceptor parses leniently and answers INVALID_ARGUMENT naming what
was wrong. Unknown fields are not an error: proto3 skips them, so newer clients work.

A method may also have a size check (router/request_size.py) that sees the serialized bytes
first: a request it refuses is never parsed at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

# Serialized request -> None, or why it is refused.
SizeCheck = Callable[[bytes], "str | None"]


class _Refused:
    def __init__(self, message: str) -> None:
        self.message = message


class RejectMalformedRequests(grpc.aio.ServerInterceptor):
    """Applies to the unary-request methods of the services named in `services`;
    `size_checks` maps full method names ("/pkg.Service/Method") to their size check, and
    `on_refused` (if given) is told the method of every refused request (metrics)."""

    def __init__(
        self, *services: str, size_checks: Mapping[str, SizeCheck] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._size_checks = dict(size_checks or {})
        self._on_refused = on_refused

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
        size_check = self._size_checks.get(details.method)

        def lenient_parse(data: bytes) -> Any:
            if size_check is not None:
                reason = size_check(data)
                if reason is not None:
                    return _Refused(reason)
            try:
                return parse(data)
            except DecodeError as exc:
                return _Refused(f"the request is not a valid protobuf message: {exc}")

        method = details.method
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream_behaviour(handler.unary_stream, method, self._on_refused),
                request_deserializer=lenient_parse,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _unary_behaviour(handler.unary_unary, method, self._on_refused),
            request_deserializer=lenient_parse,
            response_serializer=handler.response_serializer,
        )


async def _refuse(request: _Refused, context: grpc.aio.ServicerContext, method: str,
                  on_refused: Callable[[str], None] | None) -> None:
    if on_refused is not None:
        on_refused(method)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _stream_behaviour(
    inner: Callable[..., AsyncIterator[Any]], method: str, on_refused: Callable[[str], None] | None
) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Refused):
            await _refuse(request, context, method, on_refused)
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


def _unary_behaviour(
    inner: Callable[..., Awaitable[Any]], method: str, on_refused: Callable[[str], None] | None
) -> Callable[..., Awaitable[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Refused):
            await _refuse(request, context, method, on_refused)
        return await inner(request, context)

    return behaviour
