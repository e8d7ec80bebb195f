"""The router process: public Generation service (grpc.aio, so thousands of open streams
cost no thread each), standard health service, rendezvous store for the stages, and the
engine thread that drives the pipeline."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.block_manager import BlockManager
from router.chat_template import ChatRenderer, chat_template_of
from router.control_plane import CachePlan, PipelineState, bring_up
from router.engine import DEFAULT_RECOVERY_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, Engine, EngineUnavailable
from router.malformed_requests import RejectMalformedRequests
from router.metrics import RouterMetrics
from router.prompt_encoder import LARGE_TEXT_CHARS, PromptEncoder
from router.recovery import PipelineRecovery
from router.request_size import generate_request_bounds, max_request_bytes, size_check, tokenize_request_bounds
from router.request_validation import InvalidRequestError, RequestLimits, validate_request
from router.response_stream import ResponseOutbox, StreamItem, coalesce, drain
from router.scheduler import QueueFullError, Scheduler
from router.stage_client import StageClient
from shared.config import CacheConfig, ModelConfig, SchedulerConfig
from shared.grpc_options import LIVENESS_SERVICE, CannotListen, server_options
from shared.interpreter import apply_interpreter_settings, freeze_startup_objects
from shared.metrics import MODEL_NAME_LABEL, add_build_info, model_name_of, new_registry, serve_metrics
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.rendezvous import EPOCH_KEY
from shared.security import AsyncRequireToken, ServerTls, StageAccess, add_port, api_token_check

log = logging.getLogger("stageserve.router")

SERVICE_NAME = "stageserve.v1.Generation"

# Files any Hugging Face tokenizer is read from; a folder with none of them has no tokenizer
# (a config.json-only folder served with --load-format dummy). Checked before AutoTokenizer
# runs, because transformers may build an empty tokenizer from config.json alone.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "vocab.txt", "spiece.model",
)


def tokenizer_files(model_path: str | Path) -> list[str]:
    """The tokenizer files in the model folder (empty: the router serves token ids only)."""
    return [name for name in TOKENIZER_FILES if (Path(model_path) / name).is_file()]


def load_tokenizer(model_path: str) -> Any | None:
    """The folder's tokenizer, or None if it has no tokenizer files (a broken one still fails)."""
    if not tokenizer_files(model_path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class TokenIdsOnly:
    """Stands in for the tokenizer in the detokenizer of a router without one: every decode
    is "", so responses carry token ids and empty text."""

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        return ""


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


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, config: RouterConfig, model: ModelConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.model = model
        # None: the folder has no tokenizer; only prompt_token_ids requests without stop strings.
        self.tokenizer = tokenizer
        self.limits = RequestLimits.from_model_config(model)
        # Ids past the context are never needed: such a prompt is refused by its count.
        self._encoder = PromptEncoder(tokenizer, self.limits.max_context) if tokenizer is not None else None
        # Long texts (Tokenize, or prompts of a slow tokenizer) take a second or more of a
        # core each: one at a time on one thread, so that eight of them at once still leave
        # the event loop and the engine thread a core.
        self._large_text_worker = ThreadPoolExecutor(1, thread_name_prefix="large-text")
        self.engine: Engine | None = None
        self.pipeline: PipelineState | None = None
        # Why the pipeline is being re-formed; None while it serves or first starts.
        self.recovering: str | None = None
        self.metrics = RouterMetrics()  # the Router gives it its own
        self._outbox: ResponseOutbox | None = None
        # None: `messages` requests get FAILED_PRECONDITION (no tokenizer, or a base model).
        self.render_chat = ChatRenderer(tokenizer) if chat_template_of(tokenizer) is not None else None
        # Token id -> the token decoded alone, for logprob_token_text; bounded by the vocabulary.
        self._token_texts: dict[int, str] = {}

    def _outbox_for(self, loop: asyncio.AbstractEventLoop) -> ResponseOutbox:
        # One per event loop: the router has one, but a test may serve from several in turn.
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = ResponseOutbox(loop)
        return self._outbox

    def _encode(self, text: str) -> Sequence[int]:
        assert self._encoder is not None, "checked by _needs_tokenizer"
        return self._encoder.encode(text)

    def start(self) -> None:
        """Starts the tokenizer process for long prompts (router/prompt_encoder.py)."""
        if self._encoder is not None:
            self._encoder.start()

    def close(self) -> None:
        """Ends the tokenizer process and the large-text thread."""
        if self._encoder is not None:
            self._encoder.close()
        self._large_text_worker.shutdown(wait=False, cancel_futures=True)

    def _executor_for(self, text_chars: int) -> ThreadPoolExecutor | None:
        """The large-text worker for long texts, else the loop's default executor (None)."""
        return self._large_text_worker if text_chars >= LARGE_TEXT_CHARS else None

    def size_checks(self) -> dict[str, Any]:
        """Per-method checks of serialized requests (router/request_size.py): a request too
        large to be valid is refused before it is parsed."""
        return {
            f"/{SERVICE_NAME}/Generate": size_check(generate_request_bounds(self.limits)),
            f"/{SERVICE_NAME}/Tokenize": size_check(tokenize_request_bounds(self.limits)),
        }

    def _no_tokenizer(self, needs: str) -> str:
        return (
            f"model folder {self.model.model_path} has no tokenizer, so this router cannot {needs}; "
            "send prompt_token_ids (and no stop strings): responses then carry token ids with empty text"
        )

    def _needs_tokenizer(self, request: gen.GenerateRequest) -> str | None:
        """Why this router cannot serve `request` (it lacks a tokenizer or a chat template);
        None if it can."""
        if request.WhichOneof("input") == "messages" and self.render_chat is None:
            if self.tokenizer is None:
                return self._no_tokenizer("render chat messages")
            return (
                f"model folder {self.model.model_path} has no chat template (tokenizer_config.json "
                "\"chat_template\" or chat_template.jinja), so this router cannot render messages; "
                "send a prompt formatted by the client, or serve an instruct model"
            )
        if self.tokenizer is not None:
            return None
        if request.WhichOneof("input") == "prompt":
            return self._no_tokenizer("tokenize a text prompt")
        if request.sampling.stop:
            return self._no_tokenizer("match stop strings")
        if request.sampling.logprob_token_text:
            return self._no_tokenizer("decode logprob tokens (logprob_token_text)")
        return None

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _add_token_texts(self, response: gen.GenerateResponse) -> None:
        for lp in response.logprobs:
            lp.token = self._token_text(lp.token_id)
            for alt in lp.top:
                alt.token = self._token_text(alt.token_id)

    async def Generate(
        self, request: gen.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen.GenerateResponse]:
        # FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is fine, this deployment lacks
        # the tokenizer it needs.
        missing = self._needs_tokenizer(request)
        if missing is not None:
            self.metrics.on_rejected("failed_precondition")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, missing)
        engine = self.engine
        # While the pipeline recovers, the engine keeps requests (--recovery-timeout) and this
        # one waits with them; one that keeps none (0, or past that time) refuses at once.
        if engine is None or engine.failed:
            self.metrics.on_rejected("unavailable")
            if self.recovering is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"recovering: {self.recovering}")
            reason = engine.failed if engine is not None else "the pipeline is starting"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not serving: {reason}")
        loop = asyncio.get_running_loop()
        prompt_chars = len(request.prompt) if request.WhichOneof("input") == "prompt" else 0
        refusal = None
        try:
            # Tokenizing a long prompt must not stall every other stream on the event loop.
            validated = await loop.run_in_executor(
                self._executor_for(prompt_chars), validate_request, request, self._encode, self.limits,
                self.render_chat,
            )
        except InvalidRequestError as exc:
            refusal = str(exc)
        if refusal is not None:
            # Aborted outside the except block: inside it, the abort's exception would chain
            # the validation error, whose traceback holds the validation frames and their
            # locals (the tokenized prompt), in a reference cycle only a full garbage
            # collection frees (rare: shared/interpreter.py raises the thresholds).
            self.metrics.on_rejected("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        responses: asyncio.Queue[StreamItem] = asyncio.Queue()
        outbox = self._outbox_for(loop)
        try:
            seq_id = engine.submit(validated, functools.partial(outbox.put, responses))
        except QueueFullError as exc:
            self.metrics.on_rejected("resource_exhausted")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineUnavailable as exc:
            self.metrics.on_rejected("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not serving: {exc}")
        token_texts = request.sampling.logprob_token_text
        finished = False
        # The last message is held until the stream's end says how it ended: a request the
        # pipeline failure ended gets UNAVAILABLE (retryable) instead of a final message.
        last: gen.GenerateResponse | None = None
        try:
            while True:
                for item in coalesce(drain(responses, await responses.get())):
                    if isinstance(item, EngineUnavailable):
                        finished = True
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"unavailable: {item}")
                    if item is None:
                        finished = True
                        if last is not None:
                            yield last
                        return
                    if token_texts:
                        self._add_token_texts(item)
                    if item.finish_reason:
                        last = item
                    else:
                        yield item
        finally:
            # Cancelled, disconnected or past its deadline: free its blocks at the next step.
            if not finished:
                engine.abort(seq_id)

    async def GetModelInfo(self, request: gen.GetModelInfoRequest, context) -> gen.ModelInfo:
        info = gen.ModelInfo(
            model_name=model_name_of(self.model.model_path),
            architecture=self.model.architecture,
            max_context=self.model.max_context,
            vocab_size=self.model.vocab_size,
            pipeline_parallel_size=len(self.config.stage_addresses),
            block_size=self.config.cache.block_size,
            num_layers=self.model.num_hidden_layers,
            eos_token_ids=list(self.model.eos_token_ids),
        )
        pipeline, engine = self.pipeline, self.engine
        if pipeline is not None and engine is not None:
            info.tensor_parallel_size = pipeline.infos[0].tp_size
            info.dtype = pipeline.infos[0].dtype
            info.num_kv_blocks = pipeline.num_blocks
            info.free_kv_blocks = engine.block_manager.num_free_blocks
            for stage_info, profile, address in zip(
                pipeline.infos, pipeline.profiles, self.config.stage_addresses
            ):
                info.stages.add(
                    stage_index=stage_info.stage_index,
                    address=address if self.config.expose_stage_addresses else "",
                    first_layer=stage_info.first_layer,
                    last_layer=stage_info.last_layer,
                    weight_bytes=profile.weight_bytes,
                    kv_blocks=profile.num_blocks,
                    peak_activation_bytes=profile.peak_activation_bytes,
                    kv_bytes=pipeline.num_blocks * profile.block_bytes,
                    kv_block_bytes=profile.block_bytes,
                    # A --max-kv-blocks cap below every stage's room means no stage set the pool.
                    limits_pool=stage_info.stage_index == pipeline.limiting_stage
                    and profile.num_blocks == pipeline.num_blocks,
                )
        return info

    async def Tokenize(self, request: gen.TokenizeRequest, context) -> gen.TokenizeResponse:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._no_tokenizer("tokenize text"))
        text = request.text  # each read of a proto string field builds a new str
        if len(text) > self.limits.max_prompt_chars:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text has {len(text)} characters; at most {self.limits.max_prompt_chars} allowed",
            )
        # A long text costs seconds of CPU: off the event loop, or every stream stalls meanwhile.
        return await asyncio.get_running_loop().run_in_executor(
            self._executor_for(len(text)), self._tokenize, text, request.add_special_tokens
        )

    def _tokenize(self, text: str, add_special_tokens: bool) -> gen.TokenizeResponse:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return gen.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))


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

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.model = ModelConfig.from_pretrained(config.model_path)
        tokenizer = load_tokenizer(config.model_path)
        if tokenizer is None:
            log.warning("model folder %s has no tokenizer (none of %s): serving prompt_token_ids only; "
                        "text prompts, stop strings and Tokenize get FAILED_PRECONDITION, and responses "
                        "carry token ids with empty text", config.model_path, ", ".join(TOKENIZER_FILES))
        self.service = GenerationService(config, self.model, tokenizer)
        self.metrics = self.service.metrics = RouterMetrics(
            new_registry(labels={MODEL_NAME_LABEL: model_name_of(config.model_path)})
        )
        add_build_info(
            self.metrics.registry, component="router", architecture=self.model.architecture,
            pipeline_parallel_size=len(config.stage_addresses), block_size=config.cache.block_size,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            async_scheduling=config.scheduler.async_scheduling, stream_interval=config.stream_interval,
            prefix_caching=config.scheduler.enable_prefix_caching, tls=config.tls is not None,
        )
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

    def start_engine(self) -> None:
        cfg = self.config
        state = bring_up(
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
            state.num_blocks,
            cfg.cache.block_size,
            enable_prefix_caching=cfg.scheduler.enable_prefix_caching,
            shuffle_seed=cfg.shuffle_blocks_seed,
        )
        if self.service.engine is not None:
            # A recovery: the engine that kept the requests carries on with the new pipeline
            # (and its empty pool; the sizes may differ if a stage came back with other memory).
            self.service.pipeline = state
            self.service.engine.resume(block_manager)
            self.service.recovering = None
            return
        scheduler = Scheduler(
            cfg.scheduler, block_manager, max_context=self.model.max_context, num_stages=len(self.stages)
        )
        engine = Engine(
            self.stages,
            scheduler,
            self.service.tokenizer if self.service.tokenizer is not None else TokenIdsOnly(),
            self.model.eos_token_ids,
            self.model.max_context,
            max_inflight=cfg.scheduler.inflight_steps(len(self.stages)),
            forward_sampled_tokens=cfg.scheduler.async_scheduling and len(self.stages) > 1,
            max_pending=cfg.scheduler.max_queue_len,
            step_timeout_s=cfg.step_timeout_s,
            stream_interval=cfg.stream_interval,
            on_failure=self._on_engine_failure,
            recovery_timeout_s=cfg.recovery_timeout_s,
        )
        self.metrics.attach(engine)
        engine.start()
        self.service.pipeline = state
        self.service.engine = engine
        self.service.recovering = None

    # ---- recovery (router/recovery.py) ----------------------------------------------------

    def _publish_epoch(self, epoch: int) -> None:
        assert self._store is not None, "host_rendezvous first"
        self._store.set(EPOCH_KEY, str(epoch))

    def _on_engine_failure(self, reason: str) -> None:
        # From the engine thread, once it has kept (or ended) every request.
        self.service.recovering = reason
        self.recovery.trigger(reason)

    def _set_serving_from_thread(self, serving: bool) -> None:
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.set_serving(serving), self._loop)

    async def watch_health(self, stop: asyncio.Event) -> None:
        """Router health is SERVING only while the engine runs and every stage serves."""
        loop = asyncio.get_running_loop()
        serving = True
        while not stop.is_set():
            engine = self.service.engine
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


async def serve_async(config: RouterConfig) -> None:
    router = Router(config)
    router.host_rendezvous()
    # The token check comes first: an unauthenticated caller's request is not even parsed.
    auth = [AsyncRequireToken(api_token_check(config.auth_token_file))] if config.auth_token_file else []
    refuse = RejectMalformedRequests(
        SERVICE_NAME, size_checks=router.service.size_checks(),
        on_refused=lambda method: router.metrics.on_rejected("invalid_argument") if method.endswith("/Generate") else None,
    )
    server = grpc.aio.server(
        options=server_options(max_receive_bytes=max_request_bytes(router.service.limits)),
        interceptors=[*auth, refuse],
    )
    gen_grpc.add_GenerationServicer_to_server(router.service, server)
    health_pb2_grpc.add_HealthServicer_to_server(router.health, server)
    # grpcurl and similar tools discover the API from the server, without the .proto files.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    add_port(server, address, config.tls)
    await router.set_serving(False)
    # Liveness: SERVING while this process runs, whatever the pipeline's state (readiness).
    await router.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    metrics_endpoint = None
    if config.metrics_port is not None:
        metrics_endpoint = serve_metrics(router.metrics.registry, config.metrics_port, config.host)
    await server.start()
    log.info("router listening on %s (%s, %s); waiting for %d stage(s): %s", address,
             "TLS" if config.tls else "plaintext", "bearer token required" if auth else "no auth",
             len(config.stage_addresses), ", ".join(config.stage_addresses))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    router._loop = loop
    startup: asyncio.Future[None] = loop.create_future()

    def bring_up_thread() -> None:
        # A daemon thread, not the loop's executor: a SIGTERM during a long bring-up must
        # not wait for it to finish.
        try:
            router.start_engine()
            loop.call_soon_threadsafe(startup.set_result, None)
        except BaseException as exc:  # noqa: BLE001 - reported by the awaiting coroutine
            loop.call_soon_threadsafe(startup.set_exception, exc)

    threading.Thread(target=bring_up_thread, name="bring-up", daemon=True).start()
    # While the stages load their weights: the tokenizer process is up before serving.
    await loop.run_in_executor(None, router.service.start)
    stop_wait = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    watcher = None
    if startup in done:
        if startup.exception() is not None:
            log.error("bring-up failed: %s", startup.exception())
            await server.stop(grace=0)
            raise SystemExit(1)
        # Before the first request: the tokenizer, the protos, the stage clients.
        freeze_startup_objects()
        await router.set_serving(True)
        log.info("router serving on %s", address)
        watcher = asyncio.ensure_future(router.watch_health(stop))
        await stop.wait()
    log.info("router stopping")
    router.recovery.stop()
    await router.set_serving(False)
    if watcher is not None:
        await watcher
    if router.service.engine is not None:
        router.service.engine.stop()
    await server.stop(grace=2.0)
    if metrics_endpoint is not None:
        metrics_endpoint.stop()
    router.service.close()
    for stage in router.stages:
        stage.close()


def serve(config: RouterConfig) -> None:
    apply_interpreter_settings()
    asyncio.run(serve_async(config))
