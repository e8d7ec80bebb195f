"""The router's configuration (the `stageserve router` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import CacheConfig, SchedulerConfig
from shared.security import ServerTls, StageAccess

# A stage that neither answers nor breaks its stream (a hung collective, a wedged rank)
# would leave every client waiting forever; past this long without an answer the pipeline
# is declared failed. Generous: a cold first step or a long CPU prefill must not trip it.
DEFAULT_STEP_TIMEOUT_S = 120.0
# How long the streams in flight when a stage fails are kept for the re-formed pipeline to
# carry on (the router's --recovery-timeout). A stage restarted at once rejoins in 7-11 s on
# the CPU test machine; with real checkpoints the weights' load time adds to that.
DEFAULT_RECOVERY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RouterConfig:
    model_path: str
    stage_addresses: tuple[str, ...]
    host: str
    port: int
    # The TCPStore the stages' ranks rendezvous through.
    rendezvous_port: int
    scheduler: SchedulerConfig
    cache: CacheConfig
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: int = 0
    max_kv_blocks: int = 0
    startup_timeout_s: float = 1800.0
    # Tests: a seeded shuffle of the free block list, so block tables are non-contiguous.
    shuffle_blocks_seed: int | None = None
    # A step no stage answers for this long fails the pipeline (a stuck stage).
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    # A stage failure keeps the requests in flight this long for the re-formed pipeline to
    # continue them (0: they end with UNAVAILABLE at once, today's fail-fast behaviour).
    recovery_timeout_s: float = DEFAULT_RECOVERY_TIMEOUT_S
    # Tokens per streamed message after the first (Engine.stream_interval).
    stream_interval: int = 1
    # Prometheus endpoint on host:metrics_port; None serves none.
    metrics_port: int | None = None
    # TLS on the public API (None: plaintext).
    tls: ServerTls | None = None
    # Bearer tokens the public API requires (None: no auth); health and reflection stay open.
    auth_token_file: str | None = None
    # mTLS and the stage token the router presents to its stages.
    stage_access: StageAccess = StageAccess()
    # The address the rendezvous store listens on; None: `host`. The store has no
    # authentication, so it should listen only where the stages' ranks reach it.
    rendezvous_host: str | None = None
    # GetModelInfo lists each stage's address only with this on: the internal topology is
    # the operator's business, not every API client's (the router logs it at start-up).
    expose_stage_addresses: bool = False

    @property
    def store_host(self) -> str:
        return self.host if self.rendezvous_host is None else self.rendezvous_host
