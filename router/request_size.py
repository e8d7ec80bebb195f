"""Refusing a request whose wire size already proves it invalid, before protobuf parses it.

A GenerateRequest carrying 60 MB of token ids or of stop strings is invalid whatever those
bytes hold (a prompt may have at most max_context - 1 tokens, sampling.stop at most a few
short strings), yet parsing it builds the message and validating it used to build a Python
object per element: seconds with the GIL held, during which every other stream stalled, and
hundreds of MB of garbage. The server's deserializer receives the serialized bytes
before anything is parsed, and the sizes of the top-level fields can be read from the wire
format without decoding their contents; a field larger than any valid value of it is refused
right there, naming the field and the limit.

Only fields this router knows are bounded: unknown fields (a newer client's) are skipped by
proto3 parsing and cost no Python objects, so they are left alone. Requests far beyond any
valid size never get this far: `max_request_bytes` is the server's receive limit, which grpc
enforces before the message is read into Python at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.request_validation import RequestLimits

# UTF-8 spends at most 4 bytes on a character (Python's len counts characters).
_UTF8_MAX = 4
# A uint32 varint takes at most 5 bytes, plus 1 for its tag when a repeated field is sent
# unpacked (parsers accept both encodings).
_UINT32_MAX = 6
# Room for a field's own tag and length prefix, and for fields of the message added later.
_SLACK = 1024
# Top-level fields read before giving up: a normal request has a handful; a request made of
# thousands of tiny fields is left to the parser (which builds no Python object per field).
_MAX_SCANNED_FIELDS = 1024


@dataclass(frozen=True)
class FieldBound:
    name: str
    max_bytes: int
    # What a valid value may hold, for the refusal.
    allowed: str


def generate_request_bounds(limits: RequestLimits) -> dict[int, FieldBound]:
    """Largest valid wire size of each GenerateRequest field, by field number."""
    max_ids = limits.max_context - 1
    # 14 scalar fields of at most 11 bytes each (tag + 10-byte varint), the stop strings
    # and the stop token ids.
    sampling = (
        14 * 11
        + limits.max_stop_strings * (_UTF8_MAX * limits.max_stop_string_len + 4)
        + limits.max_stop_token_ids * _UINT32_MAX
        + _SLACK
    )
    return {
        1: FieldBound("prompt", _UTF8_MAX * limits.max_prompt_chars + _SLACK,
                      f"a prompt may have at most {limits.max_prompt_chars} characters"),
        2: FieldBound("prompt_token_ids", _UINT32_MAX * max_ids + _SLACK,
                      f"a prompt may have at most {max_ids} token ids (the context limit is {limits.max_context})"),
        3: FieldBound("sampling", sampling,
                      f"sampling.stop may hold at most {limits.max_stop_strings} strings of at most "
                      f"{limits.max_stop_string_len} characters and sampling.stop_token_ids at most "
                      f"{limits.max_stop_token_ids} ids"),
        # request_id is left to validation, whose message says more (printable characters),
        # and which the request cap keeps cheap.
    }


def tokenize_request_bounds(limits: RequestLimits) -> dict[int, FieldBound]:
    return {
        1: FieldBound("text", _UTF8_MAX * limits.max_prompt_chars + _SLACK,
                      f"text may have at most {limits.max_prompt_chars} characters"),
    }


def max_request_bytes(limits: RequestLimits) -> int:
    """The router's cap on one request message, which grpc enforces before reading the
    message (RESOURCE_EXHAUSTED): twice the largest valid GenerateRequest, so that fields
    this router does not know (a newer client's) have as much room again. Measured on the
    2-core CPU machine: each 60 MB request the router did read (and then refused) stalled
    its event loop 150-330 ms, in grpc's own copy of the message into Python bytes."""
    largest = sum(b.max_bytes for b in generate_request_bounds(limits).values())
    largest = max(largest, sum(b.max_bytes for b in tokenize_request_bounds(limits).values()))
    return 2 * largest


def size_check(bounds: dict[int, FieldBound]) -> Callable[[bytes], str | None]:
    """A check of serialized requests against `bounds`: None, or why the request is refused."""

    def check(data: bytes) -> str | None:
        sizes = top_level_field_sizes(data)
        for number, size in sizes.items():
            bound = bounds.get(number)
            if bound is not None and size > bound.max_bytes:
                return (f"{bound.name} is {size} bytes on the wire, more than any valid one "
                        f"(at most {bound.max_bytes} bytes): {bound.allowed}")
        return None

    return check


def top_level_field_sizes(data: bytes) -> dict[int, int]:
    """Bytes of each length-delimited top-level field (summed over repeats: protobuf merges a
    message field sent several times), read from the wire format without parsing contents.
    Stops early (returning what it read) at a malformed byte, which the parser then reports,
    or after _MAX_SCANNED_FIELDS fields."""
    sizes: dict[int, int] = {}
    pos, end = 0, len(data)
    for _ in range(_MAX_SCANNED_FIELDS):
        if pos >= end:
            break
        tag, pos = _varint(data, pos)
        if tag is None:
            break
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            if value is None:
                break
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if length is None:
                break
            sizes[number] = sizes.get(number, 0) + length
            pos += length
        else:
            # Groups (deprecated) or garbage: the parser has the last word.
            break
    return sizes


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """(value, position after it); value None if the bytes end first or it runs over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return None, pos
