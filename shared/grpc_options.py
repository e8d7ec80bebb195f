"""gRPC channel and server options used by every stageserve endpoint."""

from __future__ import annotations

# Generous for step messages of large batches, yet bounded so no peer can make us
# buffer an arbitrarily large message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
