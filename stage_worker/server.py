"""The StageWorker gRPC service of one pipeline stage.

This process holds no weights: it spawns the stage's TP rank processes, relays commands
to them in order, and answers health and info calls at once, even while a long step runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.config import ConfigError, ModelConfig, ParallelConfig, dtype_from_name
from shared.grpc_options import LIVENESS_SERVICE, server_options
from shared.interpreter import apply_interpreter_settings
from shared.metrics import add_build_info, model_name_of, serve_metrics
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from shared.security import RequireToken, ServerTls, add_port, stage_token_check
from shared.sharded_state import read_sharded_state
from shared.step_timeline import open_timeline
from stage_worker.distributed import read_epoch
from stage_worker.kv_cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from stage_worker.layers.kernel_backend import KERNEL_BACKENDS
from stage_worker.loader import LOAD_FORMATS
from stage_worker.metrics import StageMetrics
from stage_worker.rank_pool import RankFailure, RankPool
from stage_worker.rank_process import RankArgs

log = logging.getLogger("stageserve.stage")

SERVICE_NAME = "stageserve.v1.StageWorker"
CONTROL_TIMEOUT_S = 600.0


class StepOrderError(ValueError):
    """The router's steps do not arrive in increasing id order: its stream is refused."""


@dataclass(frozen=True)
class StageServerConfig:
    model_path: str
    parallel: ParallelConfig
    stage_index: int
    host: str
    port: int
    rendezvous: str
    device_type: str
    dtype: str
    join_timeout_s: float = 1800.0
    # Prometheus endpoint on host:metrics_port; None serves none.
    metrics_port: int | None = None
    # TLS on the control port; with a client CA, only callers holding a certificate it signed.
    tls: ServerTls | None = None
    # Only callers sending this file's token (the router) may call; health stays open.
    stage_token_file: str | None = None
    # "auto": the folder's checkpoint; "dummy": random weights, and the folder needs only config.json.
    load_format: str = "auto"
    # "auto" (Triton on CUDA), "reference" or "triton"; see stage_worker/layers/attention.py.
    kernel_backend: str = "auto"
    # No CUDA graphs for decode steps.
    enforce_eager: bool = False
    # "auto": K/V in the model dtype; "fp8": float8_e4m3fn with per-row scales (kv_cache.py).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ConfigError(
                f"unknown kernel backend {self.kernel_backend!r}; "
                f"choose one of {', '.join(KERNEL_BACKENDS)}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"unknown KV cache dtype {self.kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"unknown load format {self.load_format!r}; choose one of {', '.join(LOAD_FORMATS)}"
            )


class StageWorkerService(pb_grpc.StageWorkerServicer):
    def __init__(self, config: StageServerConfig, health_servicer: health.HealthServicer) -> None:
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model_path)
        self.layout = config.parallel.stage_layout(config.stage_index)
        if self.layout.last_layer > self.model_config.num_hidden_layers:
            raise ValueError(
                f"layer partition {list(config.parallel.layer_partition)} covers "
                f"{sum(config.parallel.layer_partition)} layers; the model has "
                f"{self.model_config.num_hidden_layers}"
            )
        self.health = health_servicer
        self._lock = threading.Lock()
        self.state = pb.STAGE_STATE_LOADING
        self.error = ""
        self._loaded: dict[int, pb.RankReady] = {}
        self._ready: dict[int, pb.RankReady] = {}
        self.num_kv_blocks = 0
        self.block_size = 0
        # The memory report in GetInfo: the last Profile answer and the allocated cache.
        self.profile: pb.ProfileResponse | None = None
        self.kv_cache_bytes = 0
        # Dummy weights ignore whatever files the folder holds.
        self.sharded_state = (
            config.load_format == "auto" and read_sharded_state(config.model_path) is not None
        )
        self._execute_active = False
        self._set_health(False)
        # Liveness: SERVING while the process runs and its ranks are alive (readiness is "").
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.metrics = StageMetrics(config.stage_index, self, model_name_of(config.model_path))
        add_build_info(
            self.metrics.registry, component="stage", stage=config.stage_index,
            num_stages=config.parallel.num_stages, tensor_parallel_size=config.parallel.tp_size,
            first_layer=self.layout.first_layer, last_layer=self.layout.last_layer,
            device=config.device_type, dtype=config.dtype, load_format=config.load_format,
            kernel_backend=config.kernel_backend, sequence_parallel=config.parallel.sequence_parallel,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        tp = config.parallel.tp_size
        cpu_threads = max(1, (os.cpu_count() or 1) // (tp * config.parallel.num_stages))
        self._rank_args = [
            RankArgs(
                model_path=config.model_path,
                parallel=config.parallel,
                stage_index=config.stage_index,
                tp_rank=r,
                device_type=config.device_type,
                dtype=config.dtype,
                rendezvous=config.rendezvous,
                join_timeout_s=config.join_timeout_s,
                cpu_threads=cpu_threads,
                load_format=config.load_format,
                kernel_backend=config.kernel_backend,
                enforce_eager=config.enforce_eager,
                kv_cache_dtype=config.kv_cache_dtype,
            )
            for r in range(tp)
        ]
        # The process-group generation the ranks are in; None until the ranks start.
        self.epoch: int | None = None
        self.pool: RankPool | None = None
        # Serializes replacing the ranks (startup, Rejoin, shutdown).
        self._ranks_lock = threading.Lock()
        self._shut_down = False
        # A stage restarted by the operator joins the group the router forms now: the epoch
        # comes from the router's store, which may not be up yet, so off the gRPC threads.
        threading.Thread(target=self._start_at_current_epoch, name="read-epoch", daemon=True).start()

    def _start_at_current_epoch(self) -> None:
        try:
            epoch = read_epoch(self.config.rendezvous, self.config.join_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a timeout or refused connection, reported as FAILED
            self._on_failure(f"cannot read the current epoch from the router's store at "
                             f"{self.config.rendezvous}: {exc}")
            return
        with self._ranks_lock:
            if self.epoch is None and not self._shut_down:  # else a Rejoin came first
                self._start_ranks(epoch)

    def _start_ranks(self, epoch: int) -> None:
        """Replaces every rank with fresh ones that join `epoch`'s group. Under _ranks_lock."""
        if self.pool is not None:
            # All of them: a survivor may be blocked in a collective with a dead peer.
            self.pool.kill(f"stage {self.config.stage_index} is rejoining in epoch {epoch}")
        with self._lock:
            self.epoch = epoch
            self.state = pb.STAGE_STATE_LOADING
            self.error = ""
            self._loaded.clear()
            self._ready.clear()
            self.num_kv_blocks = self.block_size = self.kv_cache_bytes = 0
            self.profile = None
        self._set_health(False)
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        args = [dataclasses.replace(a, epoch=epoch) for a in self._rank_args]
        self.pool = RankPool(args, self._on_loaded, self._on_ready, self._on_failure)
        log.info("stage %d: starting %d rank(s) for epoch %d", self.config.stage_index, len(args), epoch)

    # ---- state -------------------------------------------------------------------------

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _on_loaded(self, report: pb.RankReady) -> None:
        with self._lock:
            self._loaded[report.tp_rank] = report
            if len(self._loaded) == len(self._rank_args) and self.state == pb.STAGE_STATE_LOADING:
                self.state = pb.STAGE_STATE_JOINING
                log.info("stage %d: weights loaded, joining the process group", self.config.stage_index)

    def _on_ready(self, report: pb.RankReady) -> None:
        with self._lock:
            self._ready[report.tp_rank] = report
            if len(self._ready) == len(self._rank_args) and self.state == pb.STAGE_STATE_JOINING:
                self.state = pb.STAGE_STATE_READY
                log.info("stage %d: process group formed", self.config.stage_index)

    def _on_failure(self, message: str) -> None:
        log.error("stage %d failed: %s", self.config.stage_index, message)
        with self._lock:
            self.state = pb.STAGE_STATE_FAILED
            self.error = message
        self._set_health(False)
        # Not live until the router's Rejoin replaces the ranks (or an orchestrator's liveness
        # probe restarts the process, which then joins the current epoch by itself).
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _require(self, context: grpc.ServicerContext, *states: int) -> None:
        if self.state == pb.STAGE_STATE_FAILED:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"stage failed: {self.error}")
        if self.state not in states:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage is {pb.StageState.Name(self.state)}; this call needs "
                + " or ".join(pb.StageState.Name(s) for s in states),
            )

    # ---- RPCs --------------------------------------------------------------------------

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.StageInfo:
        cfg = self.model_config
        info = pb.StageInfo(
            stage_index=self.layout.stage_index,
            num_stages=self.layout.num_stages,
            first_layer=self.layout.first_layer,
            last_layer=self.layout.last_layer,
            tp_size=self.config.parallel.tp_size,
            dtype=self.config.dtype,
            device=self.config.device_type,
            state=self.state,
            error=self.error,
            architecture=cfg.architecture,
            has_embedding=self.layout.is_first,
            has_lm_head=self.layout.is_last,
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            num_layers=cfg.num_hidden_layers,
            model_path=self.config.model_path,
            kv_cache_bytes=self.kv_cache_bytes,
            sharded_state=self.sharded_state,
            kv_cache_dtype=str(
                resolve_kv_cache_dtype(self.config.kv_cache_dtype, dtype_from_name(self.config.dtype))
            ).removeprefix("torch."),
        )
        if self.profile is not None:
            info.profile.CopyFrom(self.profile)
        reports = [self._loaded[r] for r in sorted(self._loaded)]
        for report in reports:
            info.ranks.add(
                tp_rank=report.tp_rank,
                parameter_bytes=report.parameter_bytes,
                bytes_read=report.bytes_read,
                load_seconds=report.load_seconds,
            )
            info.parameter_bytes += report.parameter_bytes
        if request.include_parameter_names and reports:
            # Rank 0's names are the stage's names: TP ranks hold slices of the same tensors.
            info.parameter_names.extend(reports[0].parameter_names)
        return info

    def Profile(self, request: pb.ProfileRequest, context: grpc.ServicerContext) -> pb.ProfileResponse:
        self._require(context, pb.STAGE_STATE_READY, pb.STAGE_STATE_SERVING)
        if request.block_size < 1 or request.max_num_batched_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_size and max_num_batched_tokens must be >= 1")
        try:
            replies = self.pool.call(pb.RankCommand(profile=request), CONTROL_TIMEOUT_S)
        except RankFailure as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        # The tightest rank decides for the stage.
        self.profile = min((r.profile for r in replies), key=lambda p: p.num_blocks)
        return self.profile

    def InitCache(self, request: pb.InitCacheRequest, context: grpc.ServicerContext) -> pb.InitCacheResponse:
        self._require(context, pb.STAGE_STATE_READY, pb.STAGE_STATE_SERVING)
        if request.num_blocks < 1 or request.block_size < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks and block_size must be >= 1")
        if self._execute_active:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "cannot resize the cache while an Execute stream is open")
        try:
            replies = self.pool.call(pb.RankCommand(init_cache=request), CONTROL_TIMEOUT_S)
        except RankFailure as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        with self._lock:
            self.num_kv_blocks = request.num_blocks
            self.block_size = request.block_size
            self.state = pb.STAGE_STATE_SERVING
        self.kv_cache_bytes = sum(r.init_cache.kv_cache_bytes for r in replies)
        self._set_health(True)
        first = replies[0].init_cache
        if first.cuda_graph_sizes:
            log.info("stage %d: decode CUDA graphs for batch sizes %s captured in %.1f s",
                     self.config.stage_index, list(first.cuda_graph_sizes), first.graph_capture_seconds)
        log.info("stage %d: %d KV blocks of %d tokens allocated; serving",
                 self.config.stage_index, request.num_blocks, request.block_size)
        return pb.InitCacheResponse(
            kv_cache_bytes=self.kv_cache_bytes,
            cuda_graph_sizes=first.cuda_graph_sizes,
            graph_capture_seconds=max(r.init_cache.graph_capture_seconds for r in replies),
        )

    def Rejoin(self, request: pb.RejoinRequest, context: grpc.ServicerContext) -> pb.RejoinResponse:
        with self._ranks_lock:
            if self._shut_down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the stage is shutting down")
            if self.epoch is not None and request.epoch < self.epoch:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the stage is in epoch {self.epoch}; it cannot rejoin the older epoch {request.epoch}",
                )
            if request.epoch == self.epoch and self.state != pb.STAGE_STATE_FAILED:
                return pb.RejoinResponse(state=self.state, epoch=request.epoch)  # idempotent
            log.warning("stage %d: rejoining in epoch %d (was %s, %s)", self.config.stage_index,
                        request.epoch, self.epoch, pb.StageState.Name(self.state))
            self._start_ranks(request.epoch)
            return pb.RejoinResponse(state=self.state, epoch=request.epoch)

    def Execute(
        self, request_iterator: Iterator[pb.StepRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StepResult]:
        self._require(context, pb.STAGE_STATE_SERVING)
        with self._lock:
            if self._execute_active:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "another router already holds the Execute stream")
            self._execute_active = True
        # Rejoin replaces self.pool and kills this one, which ends the stream below.
        pool = self.pool
        assert pool is not None, "SERVING without ranks"
        # Rank 0's results in order; an error that ends the stream; None when the pump is done.
        results: queue.Queue[pb.StepResult | StepOrderError | RankFailure | None] = queue.Queue()
        pool.set_step_sink(results.put)
        timeline = open_timeline(f"stage{self.config.stage_index}")
        sent = 0
        pump_done = threading.Event()

        def pump() -> None:
            nonlocal sent
            last_step = 0
            try:
                for step in request_iterator:
                    if step.step_id <= last_step:
                        results.put(StepOrderError(f"step ids must increase: got {step.step_id} after {last_step}"))
                        return
                    last_step = step.step_id
                    sent += 1
                    self.metrics.on_step_sent(step.step_id)
                    if timeline is not None:
                        timeline.instant("execute", "step in", time.monotonic_ns(), step=step.step_id)
                    pool.send(pb.RankCommand(step=step))
            except RankFailure as exc:
                results.put(exc)
            except grpc.RpcError:
                pass  # The router went away; the stream ends below.
            finally:
                pump_done.set()
                results.put(None)

        threading.Thread(target=pump, name="execute-pump", daemon=True).start()
        received = 0
        try:
            while not (pump_done.is_set() and received >= sent):
                try:
                    item = results.get(timeout=0.5)
                except queue.Empty:
                    item = None
                if pool.failed:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"stage failed: {pool.failed}")
                if isinstance(item, StepOrderError):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, RankFailure):
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"stage failed: {item}")
                if item is not None:
                    received += 1
                    self.metrics.on_step_done(item)
                    if timeline is not None:
                        timeline.instant("execute", "result out", time.monotonic_ns(), step=item.step_id)
                    yield item
        finally:
            pool.set_step_sink(None)
            with self._lock:
                self._execute_active = False

    def shutdown(self) -> None:
        self._set_health(False)
        with self._ranks_lock:
            self._shut_down = True
            if self.pool is not None:
                self.pool.shutdown()


def serve(config: StageServerConfig) -> None:
    """Runs the stage until SIGTERM / SIGINT."""
    apply_interpreter_settings()
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    # Checked before the ranks spawn: a bad token file fails the stage at once.
    interceptors = [RequireToken(stage_token_check(config.stage_token_file))] if config.stage_token_file else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), options=server_options(), interceptors=interceptors
    )
    service = StageWorkerService(config, health_servicer)
    pb_grpc.add_StageWorkerServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    metrics_endpoint = None
    try:
        # A taken port (CannotListen) ends the stage here, its ranks with it.
        add_port(server, address, config.tls)
        if config.metrics_port is not None:
            metrics_endpoint = serve_metrics(service.metrics.registry, config.metrics_port, config.host)
    except BaseException:
        service.shutdown()
        raise
    server.start()
    log.info("stage %d of %d listening on %s (layers [%d, %d), tp %d, %s %s, %s weights; %s, %s)",
             config.stage_index, config.parallel.num_stages, address, service.layout.first_layer,
             service.layout.last_layer, config.parallel.tp_size, config.device_type, config.dtype,
             ("random (dummy)" if config.load_format == "dummy" else "checkpoint")
             + (f", linear {service.model_config.quantization.describe()}" if service.model_config.quantization else ""),
             "mTLS" if config.tls and config.tls.client_ca_file else "TLS" if config.tls else "plaintext",
             "stage token required" if config.stage_token_file else "no stage token")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("stage %d stopping", config.stage_index)
    server.stop(grace=2.0)
    if metrics_endpoint is not None:
        metrics_endpoint.stop()
    service.shutdown()
