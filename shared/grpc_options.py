"""gRPC channel and server options used by every stageserve endpoint, the health service name
that reports liveness, and the error every server raises when it cannot take its port."""

from __future__ import annotations

# Generous for step messages of large batches, yet bounded so no peer can make us
# buffer an arbitrarily large message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The health service name every stageserve process reports SERVING while it runs (liveness);
# "" and the API's own service name report whether it can serve requests (readiness).
LIVENESS_SERVICE = "liveness"


class CannotListen(RuntimeError):
    """A server could not take its address (port taken, or not an address of this host);
    the command that started it prints the message and exits non-zero."""


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Notice a vanished peer on an idle long-lived stream.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Server side: accept the keepalive pings above instead of answering GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


def server_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, max_receive_bytes: int | None = None
) -> list[tuple[str, int]]:
    """`channel_options` plus what only a server needs; `max_receive_bytes` (default
    `max_message_bytes`) caps the requests it accepts."""
    options = [
        (name, max_receive_bytes if name == "grpc.max_receive_message_length" and max_receive_bytes else value)
        for name, value in channel_options(max_message_bytes)
    ]
    return [
        *options,
        # grpcio turns SO_REUSEPORT on by default: a second router started on a taken port
        # would bind it too, and the kernel would split new connections between the two.
        # Off, the second one fails to bind and says so.
        ("grpc.so_reuseport", 0),
    ]
