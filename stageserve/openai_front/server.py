"""`stageserve openai`: the front's configuration and its uvicorn server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.security import ClientTls

log = logging.getLogger("stageserve.openai")

# The packages the front needs beyond the core ones (pyproject's `openai` extra).
MISSING_EXTRA = (
    "`stageserve openai` needs FastAPI and uvicorn, which the core package does not install: "
    "pip install 'stageserve[openai]'"
)


@dataclass(frozen=True)
class OpenAIFrontConfig:
    # The router's public API, host:port.
    router_address: str
    host: str = "0.0.0.0"
    port: int = 8080
    # The id /v1/models lists and requests must name; None: the router's model_name (the
    # model folder's name).
    served_model_name: str | None = None
    # TLS to the router (None: plaintext), as the other clients.
    router_tls: ClientTls | None = None
    # uvicorn's access log: one line per request (off by default: at hundreds of streams it
    # costs the front CPU).
    access_log: bool = False
    # Retries of UNAVAILABLE before a call's first message (a router restarting), with gRPC's
    # backoff, as `generate --retries`; 0-4 (gRPC caps attempts at 5).
    router_retries: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.router_retries <= 4:
            raise ValueError(f"router retries must be in [0, 4] (gRPC caps attempts at 5), got {self.router_retries}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be blank")
        if ":" not in self.router_address:
            raise ValueError(f"router address must be host:port, got {self.router_address!r}")


def serve(config: OpenAIFrontConfig) -> None:
    """Serves until SIGTERM / SIGINT: uvicorn stops accepting, gives open requests up to 10 s,
    then re-raises the signal, so the exit status says what stopped the process."""
    try:
        import uvicorn

        from stageserve.openai_front.app import create_app
    except ImportError as exc:
        raise SystemExit(f"stageserve: {MISSING_EXTRA} ({exc})") from None
    log.info("OpenAI-compatible API on http://%s:%d/v1 for the router at %s (%s)", config.host, config.port,
             config.router_address, "TLS" if config.router_tls else "plaintext")
    uvicorn.run(
        create_app(config), host=config.host, port=config.port, access_log=config.access_log,
        # The process's logging is set up by stageserve (text or JSON); uvicorn keeps to it.
        log_config=None,
        # grpc.aio runs on asyncio's own loop; uvloop is not a tested combination here.
        loop="asyncio",
        timeout_graceful_shutdown=10,
    )
