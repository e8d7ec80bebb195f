"""The router's lifecycle: the rendezvous store the stages join, bringing the pipeline and its
engine up, health, and recovery after a stage failure (router/recovery.py runs the rounds).

The gRPC handlers (router/server.py) read the pipeline's state through `ServingState`; only
this module's threads (bring-up, recovery) change it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health, health_pb2

from router.block_manager import BlockManager
from router.config import RouterConfig
from router.control_plane import CachePlan, PipelineState, bring_up
from router.engine import Engine
from router.metrics import RouterMetrics
from router.recovery import PipelineRecovery
from router.scheduler import Scheduler
from router.stage_client import StageClient
from router.tokenizer import TokenIdsOnly
from shared.config import ModelConfig
from shared.grpc_options import LIVENESS_SERVICE, CannotListen
from shared.rendezvous import EPOCH_KEY

log = logging.getLogger("stageserve.router")

SERVICE_NAME = "stageserve.v1.Generation"


@dataclass
class ServingState:
    """What the gRPC handlers read of the pipeline. Each field changes by one assignment from
    the bring-up or recovery thread, which the handlers see whole (a reference swap)."""

    engine: Engine | None = None
    pipeline: PipelineState | None = None
    # Why the pipeline is being re-formed; None while it serves or first starts.
    recovering: str | None = None


def listen_socket(host: str, port: int, what: str, flag: str) -> socket.socket:
    """A TCP socket listening on host:port, or CannotListen saying which flag to change.
    SO_REUSEADDR (a restart may reuse a port still in TIME_WAIT) but never SO_REUSEPORT:
    a port another process listens on is refused, not shared."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CannotListen(f"cannot listen for the {what} on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise CannotListen(
            f"cannot listen for the {what} on {host}:{port}: {exc.strerror or exc}; choose another {flag}"
        ) from exc
    return sock


class Router:
    """Owns the rendezvous store, the stage clients, the engine and the health status."""

    def __init__(
        self, config: RouterConfig, model: ModelConfig, tokenizer: Any | None, metrics: RouterMetrics
    ) -> None:
        self.config = config
        self.model = model
        # None: the folder has no tokenizer; the engine then decodes nothing.
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.state = ServingState()
        self.health = health.aio.HealthServicer()
        self.stages = [StageClient(a, config.stage_access) for a in config.stage_addresses]
        self._store = None
        self._store_socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recovery = PipelineRecovery(
            self.stages, self._publish_epoch, self.start_engine, self._set_serving_from_thread
        )

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.serving.set(1 if serving else 0)

    async def report_alive(self) -> None:
        """Liveness: SERVING while this process runs, whatever the pipeline's state (readiness)."""
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def host_rendezvous(self) -> None:
        import torch.distributed as dist

        # The stages' ranks join the process group through this store; the router is the
        # one process every stage already has to reach. TCPStore itself listens on every
        # interface whatever host it is given, so it gets a socket bound here instead.
        host, port = self.config.store_host, self.config.rendezvous_port
        self._store_socket = listen_socket(host, port, "rendezvous store", "--rendezvous-port")
        self._store = dist.TCPStore(
            host, port, is_master=True, wait_for_workers=False, master_listen_fd=self._store_socket.fileno()
        )
        self._publish_epoch(0)
        log.info("rendezvous store on %s:%d", host, port)

    def start_in_background(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Brings the pipeline up on a daemon thread, not the loop's executor: a SIGTERM during
        a long bring-up must not wait for it to finish. The future ends with it."""
        self._loop = loop
        started: asyncio.Future[None] = loop.create_future()

        def bring_up_thread() -> None:
            try:
                self.start_engine()
                loop.call_soon_threadsafe(started.set_result, None)
            except BaseException as exc:  # noqa: BLE001 - reported by the awaiting coroutine
                loop.call_soon_threadsafe(started.set_exception, exc)

        threading.Thread(target=bring_up_thread, name="bring-up", daemon=True).start()
        return started

    def start_engine(self) -> None:
        cfg = self.config
        pipeline = bring_up(
            self.stages,
            self.model,
            CachePlan(
                block_size=cfg.cache.block_size,
                max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
                max_num_seqs=cfg.scheduler.max_num_seqs,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                kv_cache_bytes=cfg.kv_cache_bytes,
                max_kv_blocks=cfg.max_kv_blocks,
            ),
            cfg.startup_timeout_s,
        )
        block_manager = BlockManager(
            pipeline.num_blocks,
            cfg.cache.block_size,
            enable_prefix_caching=cfg.scheduler.enable_prefix_caching,
            shuffle_seed=cfg.shuffle_blocks_seed,
        )
        if self.state.engine is not None:
            # A recovery: the engine that kept the requests carries on with the new pipeline
            # (and its empty pool; the sizes may differ if a stage came back with other memory).
            self.state.pipeline = pipeline
            self.state.engine.resume(block_manager)
            self.state.recovering = None
            return
        scheduler = Scheduler(
            cfg.scheduler, block_manager, max_context=self.model.max_context, num_stages=len(self.stages)
        )
        engine = Engine(
            self.stages,
            scheduler,
            self.tokenizer if self.tokenizer is not None else TokenIdsOnly(),
            self.model.eos_token_ids,
            self.model.max_context,
            max_inflight=cfg.scheduler.inflight_steps(len(self.stages)),
            forward_sampled_tokens=cfg.scheduler.async_scheduling and len(self.stages) > 1,
            max_pending=cfg.scheduler.max_queue_len,
            step_timeout_s=cfg.step_timeout_s,
            stream_interval=cfg.stream_interval,
            on_failure=self._on_engine_failure,
            recovery_timeout_s=cfg.recovery_timeout_s,
            metrics=self.metrics,
        )
        self.metrics.export_engine_state(engine)
        engine.start()
        self.state.pipeline = pipeline
        self.state.engine = engine
        self.state.recovering = None

    async def stop(self) -> None:
        """No more recoveries, NOT_SERVING, and the engine ends every request."""
        self.recovery.stop()
        await self.set_serving(False)
        if self.state.engine is not None:
            self.state.engine.stop()

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    # ---- recovery (router/recovery.py) ----------------------------------------------------

    def _publish_epoch(self, epoch: int) -> None:
        assert self._store is not None, "host_rendezvous first"
        self._store.set(EPOCH_KEY, str(epoch))

    def _on_engine_failure(self, reason: str) -> None:
        # From the engine thread, once it has kept (or ended) every request.
        self.state.recovering = reason
        self.recovery.trigger(reason)

    def _set_serving_from_thread(self, serving: bool) -> None:
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.set_serving(serving), self._loop)

    async def watch_health(self, stop: asyncio.Event) -> None:
        """Router health is SERVING only while the engine runs and every stage serves."""
        loop = asyncio.get_running_loop()
        serving = True
        while not stop.is_set():
            engine = self.state.engine
            stages_ok = all(await asyncio.gather(*(loop.run_in_executor(None, s.is_serving) for s in self.stages)))
            now = engine is not None and engine.serving and stages_ok
            if now != serving:
                serving = now
                await self.set_serving(now)
                log.warning("router health: %s", "SERVING" if now else "NOT_SERVING")
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
