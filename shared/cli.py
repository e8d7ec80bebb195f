"""The `stageserve` command: up, router, stage, generate, health."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc

DESCRIPTION = "stageserve: LLM serving with pipeline stages as separate gRPC services"


def _setup_logging(name: str) -> None:
    logging.basicConfig(
        level=os.environ.get("STAGESERVE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(message)s",
    )


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
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


def _add_router_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step")
    p.add_argument("--max-queue-len", type=int, default=4096,
                   help="requests held (waiting + running) before new ones get RESOURCE_EXHAUSTED")
    p.add_argument("--max-inflight-steps", type=int, default=0, help="micro-batches in flight (0: one per stage)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-bytes", type=int, default=0, help="fixed KV bytes per rank (default: profiled)")
    p.add_argument("--max-kv-blocks", type=int, default=0, help="cap on the KV pool (0: no cap)")
    p.add_argument("--shuffle-blocks-seed", type=int, default=None, help=argparse.SUPPRESS)


def _router_flag_values(args: argparse.Namespace) -> list[str]:
    """The router flags of `up`, passed through to the router process."""
    out = [
        "--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs), "--max-queue-len", str(args.max_queue_len),
        "--max-inflight-steps", str(args.max_inflight_steps),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--kv-cache-bytes", str(args.kv_cache_bytes), "--max-kv-blocks", str(args.max_kv_blocks),
    ]
    if args.no_prefix_caching:
        out.append("--no-prefix-caching")
    if args.shuffle_blocks_seed is not None:
        out += ["--shuffle-blocks-seed", str(args.shuffle_blocks_seed)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stageserve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start router and stages on this machine and serve until Ctrl-C")
    up.add_argument("--model", default=None, help="HF model folder (default: a built-in demo model)")
    up.add_argument("--pp", type=int, default=1, help="pipeline stages")
    up.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    up.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    up.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051)
    up.add_argument("--layer-partition", default=None, help="layers per stage, e.g. 10,12,10")
    up.add_argument("--startup-timeout", type=float, default=1800.0)
    up.add_argument("--prompt", default=None, help="once serving, stream an answer to this prompt")
    _add_router_flags(up)
    _add_sampling_flags(up)

    router = sub.add_parser("router", help="run the router service")
    router.add_argument("--model", required=True, help="HF model folder (config and tokenizer are read)")
    router.add_argument("--stages", required=True, help="stage addresses in stage order, comma-separated")
    router.add_argument("--host", default="0.0.0.0")
    router.add_argument("--port", type=int, default=50051)
    router.add_argument("--rendezvous-port", type=int, default=29500)
    router.add_argument("--startup-timeout", type=float, default=1800.0)
    _add_router_flags(router)

    stage = sub.add_parser("stage", help="run one pipeline stage")
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

    generate = sub.add_parser("generate", help="stream an answer from a running router")
    generate.add_argument("prompt")
    generate.add_argument("--addr", default="127.0.0.1:50051")
    generate.add_argument("--timeout", type=float, default=None)
    _add_sampling_flags(generate)

    health = sub.add_parser("health", help="exit 0 only if the service reports SERVING")
    health.add_argument("--addr", default="127.0.0.1:50051")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=3.0)
    return parser


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def stream_to_stdout(address: str, prompt: str, sampling: dict, timeout: float | None = None) -> int:
    from shared.client import FINISH_REASONS, GenerationClient

    with GenerationClient(address) as client:
        try:
            for msg in client.stream(prompt, timeout=timeout, **sampling):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    reason = FINISH_REASONS.get(msg.finish_reason, "?")
                    extra = f": {msg.error_message}" if msg.error_message else ""
                    print(f"\n[finish: {reason}{extra}]")
        except grpc.RpcError as exc:
            print(f"\nstageserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from shared.config import CacheConfig, ConfigError, ParallelConfig, SchedulerConfig

    try:
        if args.command == "up":
            from shared.demo_model import ensure_demo_model
            from shared.launcher import UpConfig, resolve_device, run_up

            model = args.model or str(ensure_demo_model())
            device = resolve_device(args.device, args.pp * args.tp)
            config = UpConfig(
                model_path=model, num_stages=args.pp, tp_size=args.tp, device=device,
                dtype=resolve_dtype(args.dtype, device), host=args.host, port=args.port,
                layer_partition=args.layer_partition, router_args=tuple(_router_flag_values(args)),
                startup_timeout_s=args.startup_timeout,
            )
            return run_up(config, args.prompt, _sampling_from(args))
        if args.command == "router":
            _setup_logging("router")
            from router.server import RouterConfig, serve

            serve(RouterConfig(
                model_path=args.model,
                stage_addresses=tuple(a.strip() for a in args.stages.split(",") if a.strip()),
                host=args.host, port=args.port, rendezvous_port=args.rendezvous_port,
                scheduler=SchedulerConfig(
                    max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                    max_queue_len=args.max_queue_len, max_inflight_steps=args.max_inflight_steps,
                    enable_prefix_caching=not args.no_prefix_caching,
                ),
                cache=CacheConfig(block_size=args.block_size),
                gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_bytes=args.kv_cache_bytes, max_kv_blocks=args.max_kv_blocks,
                startup_timeout_s=args.startup_timeout, shuffle_blocks_seed=args.shuffle_blocks_seed,
            ))
            return 0
        if args.command == "stage":
            _setup_logging(f"stage{args.stage_index}")
            from shared.config import ModelConfig
            from shared.launcher import resolve_device
            from shared.partition import parse_layer_partition, resolve_layer_partition
            from stage_worker.server import StageServerConfig, serve

            model = ModelConfig.from_pretrained(args.model)
            explicit = parse_layer_partition(args.layer_partition) if args.layer_partition else None
            partition = resolve_layer_partition(model.num_hidden_layers, args.num_stages, explicit)
            device = resolve_device(args.device, args.tp)
            serve(StageServerConfig(
                model_path=args.model,
                parallel=ParallelConfig(num_stages=args.num_stages, tp_size=args.tp, layer_partition=partition),
                stage_index=args.stage_index, host=args.host, port=args.port, rendezvous=args.rendezvous,
                device_type=device, dtype=resolve_dtype(args.dtype, device),
            ))
            return 0
        if args.command == "generate":
            return stream_to_stdout(args.addr, args.prompt, _sampling_from(args), args.timeout)
        if args.command == "health":
            from shared.client import GenerationClient

            with GenerationClient(args.addr) as client:
                ok = client.is_serving(args.service, timeout=args.timeout)
            print("SERVING" if ok else "NOT_SERVING")
            return 0 if ok else 1
    except ConfigError as exc:
        print(f"stageserve: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
