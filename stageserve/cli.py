"""The `stageserve` command: up, router, stage, openai, generate, health, plan, save-sharded."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.logging_setup import setup_logging

if TYPE_CHECKING:
    from shared.security import ClientTls, ServerTls
    from stage_worker.memory_plan import MemorySettings

DESCRIPTION = "stageserve: LLM serving with pipeline stages as separate gRPC services"

# add_argument is all the _add_*_flags helpers use: a parser or one of its argument groups.
Flags = argparse.ArgumentParser | argparse._ArgumentGroup


def _add_ops_flags(p: Flags, metrics_help: str) -> None:
    p.add_argument("--metrics-port", type=int, default=None, help=metrics_help)
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("STAGESERVE_LOG_FORMAT", "text"),
                   help="json: one object per line with request ids (default: $STAGESERVE_LOG_FORMAT or text)")


def _unsigned(bits: int) -> Callable[[str], int]:
    """An argparse type for a uintN proto field: a value out of range is a usage error
    (exit 2, a message), not a traceback when the request is built."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not 0 <= value < 2**bits:
            raise argparse.ArgumentTypeError(f"must be in [0, {2**bits - 1}], got {value}")
        return value

    parse.__name__ = f"uint{bits}"
    return parse


def _add_sampling_flags(p: Flags) -> None:
    p.add_argument("--max-new-tokens", type=_unsigned(32), default=64, help="0: up to the context limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=_unsigned(32), default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=0.0, help="0 means 1")
    p.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    p.add_argument("--seed", type=_unsigned(64), default=None, help="default: a random one per request")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)


def _sampling_from(args: argparse.Namespace) -> dict:
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, stop=args.stop, ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    if args.seed is not None:
        sampling["seed"] = args.seed
    return sampling


def _env_path(name: str) -> str | None:
    # Compose passes "${VAR:-}": an empty value means "not set".
    return os.environ.get(name) or None


def _add_load_format_flag(p: Flags) -> None:
    # The choices are stage_worker.loader.LOAD_FORMATS, spelled out so that parsing stays
    # free of torch (the stage validates them again).
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="auto: the folder's checkpoint; dummy: random weights made on each rank's device, "
                        "no file read, so the folder needs only config.json (benchmarks; the router serves "
                        "prompt_token_ids only if the folder has no tokenizer)")


def _add_execution_flags(p: Flags) -> None:
    # Spelled out like --load-format, so that parsing stays free of torch.
    p.add_argument("--kernel-backend", choices=["auto", "reference", "triton"], default="auto",
                   help="auto: Triton kernels (paged attention, fused norm/rotary/activation) on CUDA, the "
                        "plain-torch reference elsewhere; see stage_worker/layers/kernel_backend.py")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (they are captured at startup by default on CUDA)")
    _add_kv_cache_dtype_flag(p)


def _add_kv_cache_dtype_flag(p: Flags) -> None:
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="auto: K/V in the model dtype; fp8: float8_e4m3fn with a scale per token and kv head "
                        "(about half the bytes: twice the KV blocks, less to read per decode step; needs a GPU "
                        "of compute capability 8.9+, or the CPU)")


def _add_client_tls_flags(p: Flags, cert: bool = False) -> None:
    p.add_argument("--tls-ca", default=None,
                   help="connect over TLS, trusting this CA's certificates (PEM); default: plaintext")
    p.add_argument("--tls-server-name", default=None,
                   help="the name to check in the server's certificate, if --addr is not one it names")
    if cert:
        p.add_argument("--tls-cert", default=None, help="client certificate (PEM), for a port requiring mTLS")
        p.add_argument("--tls-key", default=None, help="the client certificate's private key (PEM)")


def _client_tls_from(args: argparse.Namespace) -> ClientTls | None:
    from shared.security import client_tls

    return client_tls(args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                      args.tls_server_name)


def _add_api_security_flags(p: Flags) -> None:
    p.add_argument("--tls-cert", default=None, help="serve the public API over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--auth-token-file", default=_env_path("STAGESERVE_AUTH_TOKEN_FILE"),
                   help="require `authorization: Bearer <token>` on the API, a token per line of this file; "
                        "health and reflection stay open (default: $STAGESERVE_AUTH_TOKEN_FILE, else no auth)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless it is nothing worth saying (None, False for a
    switch) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS, []) or "default" in help_text.lower():
            return help_text
        return f"{help_text} (default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        # argparse skips the help column of a flag without help text: give it the default.
        if not action.help and action.default not in (None, False, argparse.SUPPRESS, []) and action.option_strings:
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _add_router_flags(p: Flags, memory: Flags | None = None) -> None:
    """Scheduler flags on `p`, KV memory flags on `memory` (default: `p` too)."""
    memory = memory if memory is not None else p
    memory.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step")
    p.add_argument("--max-queue-len", type=int, default=4096,
                   help="requests held (waiting + running) before new ones get RESOURCE_EXHAUSTED")
    p.add_argument("--max-inflight-steps", type=int, default=0,
                   help="micro-batches in flight (0: one per stage, times --steps-in-flight-per-seq "
                        "with async scheduling)")
    p.add_argument("--steps-in-flight-per-seq", type=int, default=0,
                   help="with async scheduling, steps one sequence may have in flight at once (0: 3 with "
                        "one stage, 2 with a pipeline); more hide a longer router-stage round trip")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="send each decode step only after the previous step's tokens reached the router "
                        "(slower: the control plane runs between GPU steps); for comparison and debugging")
    p.add_argument("--stream-interval", type=_positive_int, default=1,
                   help="tokens per streamed message after the first (the last is sent at once): fewer "
                        "messages for the router and clients at high concurrency, for a burstier stream")
    p.add_argument("--no-even-micro-batches", action="store_true",
                   help="with pipeline stages, let a micro-batch take any sequences not in flight (up to "
                        "--max-num-seqs) instead of one of pp even lanes taking turns; for comparison")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV blocks of shared prompt prefixes")
    memory.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of each GPU a stage may fill (weights, activations, KV cache)")
    memory.add_argument("--kv-cache-bytes", type=int, default=0,
                        help="fixed KV bytes per rank (0: what fits, profiled; CPU: 256 MiB)")
    memory.add_argument("--max-kv-blocks", type=int, default=0, help="cap on the KV pool (0: no cap)")
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="seconds the pipeline may take to answer a step before it is declared stuck")
    p.add_argument("--recovery-timeout", type=_non_negative_float, default=60.0,
                   help="when a stage fails, keep the requests in flight (and queue new ones) this many "
                        "seconds for the pipeline to recover, then recompute and continue them; past it "
                        "they end with UNAVAILABLE (0: at once, for clients that retry themselves)")
    p.add_argument("--shuffle-blocks-seed", type=int, default=None, help=argparse.SUPPRESS)


def _add_topology_flag(p: Flags) -> None:
    p.add_argument("--expose-stage-addresses", action="store_true",
                   help="list each stage's address in GetModelInfo (default: left empty, so API clients "
                        "do not learn the internal topology; the router logs the addresses at start-up)")


def _router_flag_values(args: argparse.Namespace) -> list[str]:
    """The router flags of `up`, passed through to the router process."""
    out = [
        "--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs), "--max-queue-len", str(args.max_queue_len),
        "--max-inflight-steps", str(args.max_inflight_steps),
        "--steps-in-flight-per-seq", str(args.steps_in_flight_per_seq),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--kv-cache-bytes", str(args.kv_cache_bytes), "--max-kv-blocks", str(args.max_kv_blocks),
        "--step-timeout", str(args.step_timeout), "--stream-interval", str(args.stream_interval),
        "--recovery-timeout", str(args.recovery_timeout),
    ]
    if args.no_prefix_caching:
        out.append("--no-prefix-caching")
    if args.no_async_scheduling:
        out.append("--no-async-scheduling")
    if args.no_even_micro_batches:
        out.append("--no-even-micro-batches")
    if args.expose_stage_addresses:
        out.append("--expose-stage-addresses")
    if args.shuffle_blocks_seed is not None:
        out += ["--shuffle-blocks-seed", str(args.shuffle_blocks_seed)]
    return out


def _server_tls(args: argparse.Namespace, client_ca: str | None = None) -> ServerTls | None:
    from shared.security import SecurityConfigError, ServerTls

    if args.tls_cert is None and args.tls_key is None:
        if client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(args.tls_cert, args.tls_key, client_ca)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stageserve", description=DESCRIPTION, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # Every command's --help shows the defaults.
    add_command = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    up = add_command("up", help="start router and stages on this machine and serve until Ctrl-C",
                     description="Starts the router and one process per stage on this machine, waits until "
                                 "they serve, and serves until Ctrl-C / SIGTERM.")
    serving = up.add_argument_group("serving")
    serving.add_argument("--model", default=None, help="HF model folder (default: a built-in demo model)")
    serving.add_argument("--pp", type=int, default=1, help="pipeline stages")
    serving.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    serving.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="auto: cuda if this machine has pp x tp GPUs")
    serving.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, "
                                                         "bfloat16, float16")
    serving.add_argument("--host", default="127.0.0.1", help="the router's API address")
    serving.add_argument("--port", type=int, default=50051, help="the router's API port")
    serving.add_argument("--layer-partition", default=None, help="layers per stage, e.g. 10,12,10")
    serving.add_argument("--sequence-parallel", action="store_true",
                         help="shard the residual stream by tokens inside each stage's TP group")
    serving.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for SERVING")
    serving.add_argument("--openai-port", type=int, default=None,
                         help="also start the OpenAI-compatible HTTP front (`stageserve openai`) on this port, "
                              "on --host (default: none)")
    serving.add_argument("--served-model-name", default=None,
                         help="with --openai-port: the model id of the HTTP API (default: the model folder's name)")
    serving.add_argument("--max-stage-failures", type=_positive_int, default=3,
                         help="a stage process that exits while serving is started again, unless this is its "
                              "Nth exit within --stage-failure-window; then `up` stops with its error (1: never "
                              "restart)")
    serving.add_argument("--stage-failure-window", type=_positive_float, default=300.0,
                         help="seconds over which --max-stage-failures counts a stage's exits")
    _add_load_format_flag(serving)
    _add_execution_flags(serving)
    _add_ops_flags(serving, "Prometheus /metrics: the router on this port, stage i on this port + 1 + i "
                            "(default: none)")
    _add_router_flags(up.add_argument_group("scheduler"), up.add_argument_group("memory"))
    security = up.add_argument_group("security")
    _add_api_security_flags(security)
    security.add_argument("--tls-ca", default=None,
                          help="the CA `up` itself trusts when it checks the router (default: --tls-cert, "
                               "right for a self-signed certificate)")
    security.add_argument("--no-stage-token", action="store_true",
                          help="do not give router and stages a fresh random stage token (default: one, in a "
                               "0600 file)")
    _add_topology_flag(security)
    prompt = up.add_argument_group("--prompt", "stream one answer once serving (these flags sample it)")
    prompt.add_argument("--prompt", default=None,
                        help="once serving, stream an answer to this prompt (needs the model folder's tokenizer)")
    _add_sampling_flags(prompt)

    router = add_command("router", help="run the router service")
    router.add_argument("--model", required=True, help="HF model folder (config and tokenizer are read)")
    router.add_argument("--stages", required=True, help="stage addresses in stage order, comma-separated")
    router.add_argument("--host", default="0.0.0.0")
    router.add_argument("--port", type=int, default=50051)
    router.add_argument("--rendezvous-port", type=int, default=29500)
    router.add_argument("--rendezvous-host", default=None,
                        help="address the rendezvous store listens on, which the stages' ranks must reach "
                             "(default: --host); it has no authentication, so keep it off public interfaces")
    router.add_argument("--startup-timeout", type=float, default=1800.0)
    _add_api_security_flags(router)
    router.add_argument("--stage-token-file", default=_env_path("STAGESERVE_STAGE_TOKEN_FILE"),
                        help="send this file's first token to the stages on every call "
                             "(default: $STAGESERVE_STAGE_TOKEN_FILE, else none)")
    router.add_argument("--stage-tls-ca", default=None, help="reach the stages over TLS, trusting this CA")
    router.add_argument("--stage-tls-cert", default=None, help="client certificate shown to mTLS stages")
    router.add_argument("--stage-tls-key", default=None, help="its private key")
    router.add_argument("--stage-tls-server-name", default=None,
                        help="the name checked in the stages' certificates (default: each stage's host)")
    _add_router_flags(router)
    _add_topology_flag(router)
    _add_ops_flags(router, "serve Prometheus /metrics on this port (default: none)")

    stage = add_command("stage", help="run one pipeline stage")
    stage.add_argument("--model", required=True)
    stage.add_argument("--stage-index", type=int, required=True)
    stage.add_argument("--num-stages", type=int, required=True)
    stage.add_argument("--tp", type=int, default=1)
    stage.add_argument("--host", default="0.0.0.0")
    stage.add_argument("--port", type=int, required=True)
    stage.add_argument("--rendezvous", required=True, help="HOST:PORT of the router's rendezvous store")
    stage.add_argument("--layer-partition", default=None)
    stage.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    stage.add_argument("--dtype", default="auto")
    stage.add_argument("--sequence-parallel", action="store_true",
                       help="shard the residual stream by tokens inside the TP group (needs --tp > 1)")
    _add_load_format_flag(stage)
    _add_execution_flags(stage)
    stage.add_argument("--tls-cert", default=None, help="serve the control port over TLS with this certificate")
    stage.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    stage.add_argument("--tls-client-ca", default=None,
                       help="mTLS: accept only callers with a certificate signed by this CA (health included)")
    stage.add_argument("--stage-token-file", default=_env_path("STAGESERVE_STAGE_TOKEN_FILE"),
                       help="answer only callers sending a token of this file (the router); health stays open "
                            "(default: $STAGESERVE_STAGE_TOKEN_FILE, else no check)")
    _add_ops_flags(stage, "serve Prometheus /metrics on this port (default: none)")

    front = add_command("openai", help="serve the OpenAI-compatible HTTP API as a gRPC client of a router")
    front.add_argument("--router", default="127.0.0.1:50051", help="the router's public API, host:port")
    front.add_argument("--host", default="0.0.0.0")
    front.add_argument("--port", type=int, default=8080)
    front.add_argument("--served-model-name", default=None,
                       help="the model id /v1/models lists and requests name (default: the router's "
                            "model_name, i.e. the model folder's name)")
    front.add_argument("--access-log", action="store_true", help="log one line per HTTP request")
    front.add_argument("--router-retries", type=int, default=4,
                       help="retries of UNAVAILABLE before a call's first token (0-4; gRPC caps attempts at 5)")
    _add_client_tls_flags(front)
    front.add_argument("--log-format", choices=["text", "json"],
                       default=os.environ.get("STAGESERVE_LOG_FORMAT", "text"),
                       help="json: one object per line (default: $STAGESERVE_LOG_FORMAT or text)")

    generate = add_command("generate", help="stream an answer from a running router")
    generate.add_argument("prompt", help="the prompt; with --chat, the user's message")
    generate.add_argument("--chat", action="store_true",
                          help="send the prompt as a user message, rendered by the model's chat template "
                               "in the router (needs a model with one)")
    generate.add_argument("--system", default=None,
                          help="a system message before the user's (implies --chat)")
    generate.add_argument("--addr", default="127.0.0.1:50051")
    generate.add_argument("--timeout", type=float, default=None, help="deadline of the whole call, in seconds")
    generate.add_argument("--retries", type=int, default=4,
                          help="retries of UNAVAILABLE before the first token (0-4; gRPC caps attempts at 5)")
    _add_client_tls_flags(generate)
    generate.add_argument("--auth-token-file", default=_env_path("STAGESERVE_AUTH_TOKEN_FILE"),
                          help="send the first token of this file as `authorization: Bearer` "
                               "(default: $STAGESERVE_AUTH_TOKEN_FILE)")
    _add_sampling_flags(generate)

    health = add_command(
        "health", help="exit 0 only if the service reports SERVING",
        description="Prints the status and exits as grpc_health_probe does: 0 SERVING, 2 unreachable "
                    "(connection failed or timed out), 3 the call failed otherwise (e.g. credentials), "
                    "4 NOT_SERVING or unknown service.")
    health.add_argument("--addr", default="127.0.0.1:50051")
    health.add_argument("--service", default="", help="health service name (default \"\": readiness)")
    health.add_argument("--liveness", action="store_true",
                        help="check liveness (the process runs) instead of readiness (it can serve)")
    health.add_argument("--timeout", type=float, default=3.0)
    _add_client_tls_flags(health, cert=True)

    plan = add_command("plan", help="print the layer partition, each stage's weights and KV blocks, "
                                       "and the pool, from config.json alone (no weights are read)")
    plan.add_argument("--model", required=True, help="model folder; config.json is all it needs")
    plan.add_argument("--pp", type=int, default=1, help="pipeline stages")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    plan.add_argument("--gpu-memory", default=None,
                      help="memory of one GPU, e.g. 80GiB (default: this machine's GPU, if it has one)")
    plan.add_argument("--reserved-memory", default="0",
                      help="held back per GPU besides weights and activations (CUDA context, NCCL)")
    plan.add_argument("--dtype", default="bfloat16", help="serving dtype: bfloat16, float16, float32")
    _add_kv_cache_dtype_flag(plan)
    plan.add_argument("--layer-partition", default=None, help="also show this partition, e.g. 9,11,12")
    _add_memory_flags(plan)

    save = add_command("save-sharded", help="write the weights as one file set per stage x TP rank, "
                                               "which stages load with no re-slicing")
    save.add_argument("--model", required=True, help="Hugging Face model folder")
    save.add_argument("--pp", type=int, default=1, help="pipeline stages")
    save.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    save.add_argument("--layer-partition", default=None,
                      help="layers per stage (default: memory-balanced with --gpu-memory, else even)")
    save.add_argument("--gpu-memory", default=None, help="memory of one GPU, for the balanced default")
    save.add_argument("--out", required=True, help="new (or empty) output folder")
    save.add_argument("--dtype", default="auto", help="auto keeps the checkpoint's dtype")
    save.add_argument("--max-shard-size", default="4GiB", help="files are split at this size, e.g. 4GiB, 500MB")
    return parser


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    # The router flags that decide how many KV blocks fit (same defaults as the router).
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-bytes", type=int, default=0, help="fixed KV bytes per rank (0: from memory)")


def _memory_settings(args: argparse.Namespace, dtype: str, device_bytes: int | None) -> MemorySettings:
    from shared.config import dtype_from_name
    from shared.sizes import parse_size
    from stage_worker.memory_plan import MemorySettings

    # `up` and `save-sharded` lack some of plan's flags: those take the router's defaults.
    return MemorySettings(
        dtype=dtype_from_name(dtype),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        block_size=getattr(args, "block_size", 16),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 2048),
        max_num_seqs=getattr(args, "max_num_seqs", 64),
        device_bytes=device_bytes,
        gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9),
        reserved_bytes=parse_size(getattr(args, "reserved_memory", "0")),
        kv_cache_bytes=getattr(args, "kv_cache_bytes", 0),
    )


def _plan(args: argparse.Namespace) -> int:
    from shared.config import ModelConfig
    from shared.partition import parse_layer_partition
    from shared.sizes import parse_size
    from stage_worker.memory_plan import render_plan
    from stageserve.launcher import local_gpu_memory, resolve_device

    model = ModelConfig.from_pretrained(args.model)
    if args.gpu_memory is not None:
        device_bytes: int | None = parse_size(args.gpu_memory)
    elif resolve_device("auto", 1) == "cuda":
        device_bytes = local_gpu_memory(1)
    else:
        device_bytes = None
    explicit = parse_layer_partition(args.layer_partition) if args.layer_partition else None
    print(render_plan(model, args.pp, args.tp, _memory_settings(args, args.dtype, device_bytes), explicit))
    return 0


def _save_sharded(args: argparse.Namespace) -> int:
    from shared.config import ModelConfig, ParallelConfig
    from shared.partition import parse_layer_partition, resolve_layer_partition
    from shared.sizes import parse_size
    from stage_worker.memory_plan import default_partition
    from stage_worker.save_sharded import SaveShardedConfig, save_sharded, summarize

    model = ModelConfig.from_pretrained(args.model)
    if args.layer_partition:
        partition = resolve_layer_partition(
            model.num_hidden_layers, args.pp, parse_layer_partition(args.layer_partition)
        )
    else:
        device_bytes = parse_size(args.gpu_memory) if args.gpu_memory else None
        dtype = model.checkpoint_dtype if args.dtype == "auto" else args.dtype
        partition = default_partition(
            model, args.pp, args.tp, _memory_settings(args, dtype, device_bytes)
        ).partition
    state = save_sharded(
        SaveShardedConfig(
            model_path=args.model, out_dir=args.out,
            parallel=ParallelConfig(num_stages=args.pp, tp_size=args.tp, layer_partition=partition),
            dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
        ),
        progress=sys.stderr.isatty(),
    )
    print(summarize(state))
    return 0


def _generate_input(args: argparse.Namespace) -> str | list[dict[str, str]]:
    """`generate`'s prompt, or with --chat / --system the conversation the router renders."""
    if not (args.chat or args.system is not None):
        return args.prompt
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.prompt}]


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The client commands come first and never import torch (shared.config does): a health
    # probe runs every few seconds and must stay cheap.
    if args.command == "generate":
        if not 0 <= args.retries <= 4:
            print(f"stageserve: --retries must be in [0, 4] (gRPC caps attempts at 5), got {args.retries}",
                  file=sys.stderr)
            return 2
        from shared.security import SecurityConfigError, read_token

        try:
            token = read_token(args.auth_token_file, "auth token") if args.auth_token_file else None
            from stageserve.client import stream_to_stdout

            return stream_to_stdout(args.addr, _generate_input(args), _sampling_from(args), args.timeout,
                                    args.retries, _client_tls_from(args), token)
        except SecurityConfigError as exc:
            print(f"stageserve: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # Ctrl-C: the call is cancelled as the channel closes; the shell's convention, no traceback.
            print(file=sys.stderr)
            return 130
    if args.command == "openai":
        # A client of the router like `generate`: no torch here either.
        from shared.security import SecurityConfigError
        from stageserve.openai_front.server import OpenAIFrontConfig, serve

        setup_logging("openai", args.log_format)
        try:
            config = OpenAIFrontConfig(
                router_address=args.router, host=args.host, port=args.port,
                served_model_name=args.served_model_name, router_tls=_client_tls_from(args),
                access_log=args.access_log, router_retries=args.router_retries,
            )
        except (ValueError, SecurityConfigError) as exc:
            print(f"stageserve: {exc}", file=sys.stderr)
            return 2
        serve(config)
        return 0
    if args.command == "health":
        from shared.security import SecurityConfigError
        from stageserve.client import LIVENESS_SERVICE, GenerationClient

        try:
            client = GenerationClient(args.addr, tls=_client_tls_from(args))
        except SecurityConfigError as exc:
            print(f"stageserve: {exc}", file=sys.stderr)
            return 2
        with client:
            health = client.health_status(LIVENESS_SERVICE if args.liveness else args.service, timeout=args.timeout)
        print(health.status)
        if health.detail:
            print(f"stageserve: {args.addr}: {health.detail}", file=sys.stderr)
        return health.exit_code
    from shared.config import CacheConfig, ConfigError, ParallelConfig, SchedulerConfig
    from shared.grpc_options import CannotListen
    from shared.security import SecurityConfigError, StageAccess, client_tls, read_token

    try:
        if args.command == "up":
            from stageserve.demo_model import ensure_demo_model
            from stageserve.launcher import StageRestartPolicy, UpConfig, resolve_device, run_up

            from shared.partition import format_partition
            from stageserve.launcher import choose_up_partition

            if args.port == 0:
                # `up` checks its router on the port it gave it; an OS-chosen one it would not know.
                raise ConfigError("--port 0 is not supported by `up`: give a free port (default 50051)")
            model = args.model or str(ensure_demo_model())
            setup_logging("up", args.log_format)
            if args.prompt is not None:
                from router.tokenizer import tokenizer_files

                if not tokenizer_files(model):
                    raise ConfigError(
                        f"--prompt needs a tokenizer, and model folder {model} has none; serve without "
                        "--prompt and send prompt_token_ids (e.g. benchmarks/load_generator.py)"
                    )
            device = resolve_device(args.device, args.pp * args.tp)
            dtype = resolve_dtype(args.dtype, device)
            choice = choose_up_partition(
                model, args.pp, args.tp, device, args.layer_partition, _memory_settings(args, dtype, None),
                load_format=args.load_format,
            )
            print(f"stageserve: layer partition {format_partition(choice.partition)} ({choice.reason})", flush=True)
            config = UpConfig(
                model_path=model, num_stages=args.pp, tp_size=args.tp, device=device,
                dtype=dtype, host=args.host, port=args.port,
                layer_partition=format_partition(choice.partition), router_args=tuple(_router_flag_values(args)),
                startup_timeout_s=args.startup_timeout, metrics_port=args.metrics_port,
                log_format=args.log_format, sequence_parallel=args.sequence_parallel,
                tls=_server_tls(args), tls_ca=args.tls_ca, auth_token_file=args.auth_token_file,
                stage_token=not args.no_stage_token, load_format=args.load_format,
                kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager,
                kv_cache_dtype=args.kv_cache_dtype, openai_port=args.openai_port, served_model_name=args.served_model_name,
                stage_restart=StageRestartPolicy(args.max_stage_failures, args.stage_failure_window),
            )
            return run_up(config, args.prompt, _sampling_from(args))
        if args.command == "router":
            setup_logging("router", args.log_format)
            from router.config import RouterConfig
            from router.server import serve

            serve(RouterConfig(
                model_path=args.model,
                stage_addresses=tuple(a.strip() for a in args.stages.split(",") if a.strip()),
                host=args.host, port=args.port, rendezvous_port=args.rendezvous_port,
                rendezvous_host=args.rendezvous_host, expose_stage_addresses=args.expose_stage_addresses,
                scheduler=SchedulerConfig(
                    max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                    max_queue_len=args.max_queue_len, max_inflight_steps=args.max_inflight_steps,
                    enable_prefix_caching=not args.no_prefix_caching,
                    async_scheduling=not args.no_async_scheduling,
                    even_micro_batches=not args.no_even_micro_batches,
                    steps_in_flight_per_seq=args.steps_in_flight_per_seq,
                ),
                cache=CacheConfig(block_size=args.block_size),
                gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_bytes=args.kv_cache_bytes, max_kv_blocks=args.max_kv_blocks,
                startup_timeout_s=args.startup_timeout, shuffle_blocks_seed=args.shuffle_blocks_seed,
                step_timeout_s=args.step_timeout, stream_interval=args.stream_interval,
                recovery_timeout_s=args.recovery_timeout, metrics_port=args.metrics_port,
                tls=_server_tls(args), auth_token_file=args.auth_token_file,
                stage_access=StageAccess(
                    tls=client_tls(args.stage_tls_ca, args.stage_tls_cert, args.stage_tls_key,
                                   args.stage_tls_server_name),
                    token=read_token(args.stage_token_file, "stage token") if args.stage_token_file else None,
                ),
            ))
            return 0
        if args.command == "stage":
            setup_logging(f"stage{args.stage_index}", args.log_format)
            from shared.config import ModelConfig
            from shared.partition import parse_layer_partition, resolve_layer_partition
            from stage_worker.server import StageServerConfig, serve
            from stageserve.launcher import resolve_device

            from shared.sharded_state import read_sharded_state

            model = ModelConfig.from_pretrained(args.model)
            explicit = parse_layer_partition(args.layer_partition) if args.layer_partition else None
            # Dummy weights read no file, so a sharded folder's layout does not bind them.
            sharded = read_sharded_state(args.model) if args.load_format == "auto" else None
            if sharded is not None:
                # The folder fixes the layout: another one stops the stage here, saying which.
                explicit = sharded.resolve_layout(args.num_stages, args.tp, explicit)
            partition = resolve_layer_partition(model.num_hidden_layers, args.num_stages, explicit)
            device = resolve_device(args.device, args.tp)
            serve(StageServerConfig(
                model_path=args.model,
                parallel=ParallelConfig(
                    num_stages=args.num_stages, tp_size=args.tp, layer_partition=partition,
                    sequence_parallel=args.sequence_parallel,
                ),
                stage_index=args.stage_index, host=args.host, port=args.port, rendezvous=args.rendezvous,
                device_type=device, dtype=resolve_dtype(args.dtype, device), metrics_port=args.metrics_port,
                tls=_server_tls(args, args.tls_client_ca), stage_token_file=args.stage_token_file,
                load_format=args.load_format, kernel_backend=args.kernel_backend,
                enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
            ))
            return 0
        if args.command == "plan":
            return _plan(args)
        if args.command == "save-sharded":
            return _save_sharded(args)
    except (ConfigError, SecurityConfigError) as exc:
        print(f"stageserve: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"stageserve: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
