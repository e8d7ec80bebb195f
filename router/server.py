"""The router process: the public Generation service (grpc.aio, so thousands of open streams
cost no thread each), the standard health service and reflection. The pipeline behind it is
brought up, watched and recovered by the router's lifecycle (router/lifecycle.py); the engine
thread drives it (router/engine.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.chat_template import ChatRenderer, chat_template_of
from router.config import RouterConfig
from router.engine_events import EngineUnavailable
from router.lifecycle import SERVICE_NAME, Router, ServingState
from router.malformed_requests import RejectMalformedRequests
from router.metrics import RouterMetrics
from router.prompt_encoder import LARGE_TEXT_CHARS, PromptEncoder
from router.request_size import generate_request_bounds, max_request_bytes, size_check, tokenize_request_bounds
from router.request_validation import InvalidRequestError, RequestLimits, validate_request
from router.response_stream import ResponseOutbox, StreamItem, coalesce, drain
from router.scheduler import QueueFullError
from router.tokenizer import TOKENIZER_FILES, load_tokenizer
from shared.config import ModelConfig
from shared.grpc_options import server_options
from shared.interpreter import apply_interpreter_settings, freeze_startup_objects
from shared.metrics import MODEL_NAME_LABEL, add_build_info, model_name_of, new_registry, serve_metrics
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.security import AsyncRequireToken, add_port, api_token_check

log = logging.getLogger("stageserve.router")


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(
        self, config: RouterConfig, model: ModelConfig, tokenizer: Any | None, metrics: RouterMetrics,
        state: ServingState,
    ) -> None:
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
        # The pipeline's state, as the router's lifecycle (router/lifecycle.py) changes it.
        self.state = state
        self.metrics = metrics
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
        engine = self.state.engine
        # While the pipeline recovers, the engine keeps requests (--recovery-timeout) and this
        # one waits with them; one that keeps none (0, or past that time) refuses at once.
        if engine is None or engine.failed:
            self.metrics.on_rejected("unavailable")
            if self.state.recovering is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"recovering: {self.state.recovering}")
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
        pipeline, engine = self.state.pipeline, self.state.engine
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


async def serve_async(config: RouterConfig) -> None:
    model = ModelConfig.from_pretrained(config.model_path)
    tokenizer = load_tokenizer(config.model_path)
    if tokenizer is None:
        log.warning("model folder %s has no tokenizer (none of %s): serving prompt_token_ids only; "
                    "text prompts, stop strings and Tokenize get FAILED_PRECONDITION, and responses "
                    "carry token ids with empty text", config.model_path, ", ".join(TOKENIZER_FILES))
    metrics = RouterMetrics(
        new_registry(labels={MODEL_NAME_LABEL: model_name_of(config.model_path)}),
        num_stages=len(config.stage_addresses),
    )
    add_build_info(
        metrics.registry, component="router", architecture=model.architecture,
        pipeline_parallel_size=len(config.stage_addresses), block_size=config.cache.block_size,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        async_scheduling=config.scheduler.async_scheduling, stream_interval=config.stream_interval,
        prefix_caching=config.scheduler.enable_prefix_caching, tls=config.tls is not None,
    )
    router = Router(config, model, tokenizer, metrics)
    service = GenerationService(config, model, tokenizer, metrics, router.state)
    router.host_rendezvous()
    # The token check comes first: an unauthenticated caller's request is not even parsed.
    auth = [AsyncRequireToken(api_token_check(config.auth_token_file))] if config.auth_token_file else []
    refuse = RejectMalformedRequests(
        SERVICE_NAME, size_checks=service.size_checks(),
        on_refused=lambda method: metrics.on_rejected("invalid_argument") if method.endswith("/Generate") else None,
    )
    server = grpc.aio.server(
        options=server_options(max_receive_bytes=max_request_bytes(service.limits)),
        interceptors=[*auth, refuse],
    )
    gen_grpc.add_GenerationServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(router.health, server)
    # grpcurl and similar tools discover the API from the server, without the .proto files.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    add_port(server, address, config.tls)
    await router.set_serving(False)
    await router.report_alive()
    metrics_endpoint = None
    if config.metrics_port is not None:
        metrics_endpoint = serve_metrics(metrics.registry, config.metrics_port, config.host)
    await server.start()
    log.info("router listening on %s (%s, %s); waiting for %d stage(s): %s", address,
             "TLS" if config.tls else "plaintext", "bearer token required" if auth else "no auth",
             len(config.stage_addresses), ", ".join(config.stage_addresses))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    startup = router.start_in_background(loop)
    # While the stages load their weights: the tokenizer process is up before serving.
    await loop.run_in_executor(None, service.start)
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
    if watcher is not None:
        await watcher
    await router.stop()
    await server.stop(grace=2.0)
    if metrics_endpoint is not None:
        metrics_endpoint.stop()
    service.close()
    router.close()


def serve(config: RouterConfig) -> None:
    apply_interpreter_settings()
    asyncio.run(serve_async(config))
