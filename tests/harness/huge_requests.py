"""Oversized requests and a sender that runs them from its own process.

The tests that measure the router while it refuses these send them from worker processes:
building and sending 60 MB in the measuring process would hold its GIL and show up as a
gap of the stream it measures. Kept free of torch so that a spawned worker starts fast.
"""

from __future__ import annotations

import grpc

from shared.proto import generation_pb2 as gen
from stageserve.client import build_request

HUGE = 60_000_000  # bytes: under the 64 MiB limit of the stages' channels, over the router's cap
LARGE = 3_000_000  # bytes: under the router's cap, far over any valid value of the field
BAD = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
GENERATE = "/stageserve.v1.Generation/Generate"


def string_field(number: int, data: bytes) -> bytes:
    """A length-delimited field on the wire (what proto3 uses for string and message)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def token_ids(size: int) -> bytes:
    # prompt_token_ids (field 2) holding `size` packed one-byte ids, written on the wire directly.
    return string_field(2, string_field(1, b"\x05" * size))


def stop_strings(size: int) -> bytes:
    # A valid prompt, then sampling (field 3) holding `size` bytes of stop strings (field 7).
    stops = b"".join([string_field(7, b"s" * 58)] * (size // 60))
    return build_request([0, 5, 6], max_new_tokens=4).SerializeToString() + string_field(3, stops)


def long_prompt() -> bytes:
    # Under the character limit, so it is tokenized (~600k tokens) before being refused.
    return build_request("lorem ipsum " * 83_333 + "abc", max_new_tokens=4).SerializeToString()


# name -> (request bytes, expected status, part of its message)
KINDS = {
    "60 MB of token ids": (lambda: token_ids(HUGE), TOO_LARGE, "Received message larger than max"),
    "60 MB of stop strings": (lambda: stop_strings(HUGE), TOO_LARGE, "Received message larger than max"),
    "3 MB of token ids": (lambda: token_ids(LARGE), BAD, "prompt_token_ids is 3000005 bytes on the wire"),
    "3 MB of stop strings": (lambda: stop_strings(LARGE), BAD, "sampling.stop may hold at most 16 strings"),
    "a prompt of 999,999 characters": (long_prompt, BAD, "context limit"),
}


def refused(address: str, kind: str, times: int = 1) -> str:
    """Sends the request `kind` names `times` times; "" if each got the expected refusal,
    else what came back instead."""
    make, code, says = KINDS[kind]
    request = make()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=gen.GenerateResponse.FromString)
        for _ in range(times):
            try:
                list(call(request, timeout=120))
            except grpc.RpcError as exc:
                if exc.code() == code and says in (exc.details() or ""):
                    continue
                return f"{kind}: {exc.code().name} {exc.details()[:300]}"
            return f"{kind}: served, not refused"
    return ""
