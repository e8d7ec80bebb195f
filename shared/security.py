"""Who may call what: TLS credentials, bearer tokens and the interceptors that check them.

Two independent secrets guard the two kinds of ports. The public Generation API may require
a bearer token (`--auth-token-file` on the router); a stage's control port may require the
stage token (`--stage-token-file` on router and stages) that only the router holds, and/or a
client certificate (mTLS). Health (and, on the router, reflection) stay open on purpose:
orchestrators probe them without secrets, and they reveal nothing a caller could misuse.

This module imports grpc only (no torch): `stageserve health` and `generate` use it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.grpc_options import CannotListen

AUTHORIZATION = "authorization"
_BEARER = "bearer "

# Services callable without a token: probes and API discovery.
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


class SecurityConfigError(ValueError):
    """A credential or token file that cannot be used; the message names the file and why."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} file {path!r}: {exc.strerror}") from exc
    if not data.strip():
        raise SecurityConfigError(f"the {what} file {path!r} is empty")
    return data


def read_tokens(path: str, what: str = "token") -> tuple[str, ...]:
    """One token per line (blank lines and surrounding spaces ignored); any of them is
    accepted, so a token can be rotated by adding the new one before removing the old."""
    text = _read(path, what).decode("utf-8", errors="strict")
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    for token in tokens:
        if any(c.isspace() for c in token) or not token.isprintable():
            raise SecurityConfigError(f"the {what} file {path!r} holds a token with spaces or control characters")
    return tokens


def read_token(path: str, what: str = "token") -> str:
    """The first token of the file: what a client sends."""
    return read_tokens(path, what)[0]


def write_secret_file(directory: str | None = None) -> tuple[str, str]:
    """A fresh random token in a new file only its owner can read (mkstemp makes it 0600).
    Returns (path, token); the caller deletes the file."""
    token = secrets.token_urlsafe(32)
    fd, path = tempfile.mkstemp(prefix="stageserve-stage-token-", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path, token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else None


# ---- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate; with `client_ca_file` it also requires (and verifies) a
    client certificate signed by that CA: mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client checks the server (`ca_file`; None: the system's roots) and, for mTLS,
    the certificate it presents. `server_name` overrides the name checked against the
    server's certificate, for a server reached by an address its certificate does not name."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityConfigError("a client certificate needs both its certificate and its key file")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "TLS key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "TLS certificate") if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None,
               server_name: str | None = None) -> ClientTls | None:
    """None (plaintext) unless some TLS setting was given."""
    if ca_file is None and cert_file is None and key_file is None and server_name is None:
        return None
    return ClientTls(ca_file, cert_file, key_file, server_name)


def open_channel(address: str, options: Sequence[tuple[str, Any]], tls: ClientTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.channel_options()])


def open_aio_channel(address: str, options: Sequence[tuple[str, Any]], tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.channel_options()])


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """The bound port; raises CannotListen if the address cannot be taken (with
    `server_options`, a port another process listens on is refused, not shared)."""
    try:
        port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials())
    except RuntimeError as exc:  # grpcio >= 1.60 raises; older versions return 0
        raise CannotListen(_cannot_listen(address)) from exc
    if port == 0:
        raise CannotListen(_cannot_listen(address))
    return port


def _cannot_listen(address: str) -> str:
    return (f"cannot listen on {address}: the port is already in use (another stageserve?) or the "
            "host is not an address of this machine; choose another --port / --host")


# ---- token checks ------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCheck:
    """Which tokens are accepted, which services are open, and what a refused caller is told."""

    tokens: tuple[str, ...]
    open_services: tuple[str, ...]
    # Appended to the refusal: which secret the server wants (never the secret itself).
    hint: str

    def __post_init__(self) -> None:
        assert self.tokens, "a TokenCheck with no token would refuse every call"

    def is_open(self, method: str) -> bool:
        return any(method.startswith(f"/{s}/") for s in self.open_services)

    def refusal(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None if the call may proceed, else why not."""
        values = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
        if not values:
            return f"missing credentials: send metadata `authorization: Bearer <token>` ({self.hint})"
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", errors="replace")
        if value[: len(_BEARER)].lower() != _BEARER:
            return f"the authorization metadata must be `Bearer <token>` ({self.hint})"
        given = value[len(_BEARER):].strip().encode()
        # Every accepted token is compared, in constant time each: the answer's timing does
        # not say how much of a guess was right, nor which token matched.
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(given, token.encode())
        return None if ok else f"the bearer token is not valid ({self.hint})"


def _refusing_handler(handler: grpc.RpcMethodHandler, abort: Callable[..., Any]) -> grpc.RpcMethodHandler:
    # The same cardinality as the real method, so the caller sees UNAUTHENTICATED rather
    # than a protocol error; requests are left unparsed (raw bytes), as nothing reads them.
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort)


class RequireToken(grpc.ServerInterceptor):
    """For the threaded servers (stages): UNAUTHENTICATED unless the call carries a token."""

    def __init__(self, check: TokenCheck) -> None:
        self.check = check

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or self.check.is_open(details.method):
            return handler
        reason = self.check.refusal(details.invocation_metadata)
        if reason is None:
            return handler

        def abort(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return _refusing_handler(handler, abort)


class AsyncRequireToken(grpc.aio.ServerInterceptor):
    """For the grpc.aio server (router): UNAUTHENTICATED unless the call carries a token."""

    def __init__(self, check: TokenCheck) -> None:
        self.check = check

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self.check.is_open(details.method):
            return handler
        reason = self.check.refusal(details.invocation_metadata)
        if reason is None:
            return handler

        async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return _refusing_handler(handler, abort)


# ---- the router's side of the stages -----------------------------------------------------


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata to every call of a channel: each StageWorker RPC, present and
    future, carries the stage token without each call site having to remember it."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
            details.credentials, details.wait_for_ready, details.compression,
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


@dataclass(frozen=True)
class StageAccess:
    """How the router reaches its stages: mTLS settings and the stage token (both optional)."""

    tls: ClientTls | None = None
    token: str | None = None

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        channel = open_channel(address, options, self.tls)
        metadata = bearer_metadata(self.token)
        return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel


def stage_token_check(path: str) -> TokenCheck:
    return TokenCheck(
        read_tokens(path, "stage token"), (HEALTH_SERVICE,),
        "stage ports answer only the router, which sends the token of --stage-token-file",
    )


def api_token_check(path: str) -> TokenCheck:
    return TokenCheck(
        read_tokens(path, "auth token"), (HEALTH_SERVICE, *REFLECTION_SERVICES),
        "this router requires a bearer token; health and reflection need none",
    )
