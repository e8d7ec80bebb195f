"""CPU time of the router's engine thread per generated token, without gRPC or a GPU.

The engine (scheduler, block accounting, step building, detokenizing, response building)
runs against a stage that answers every step at once with a fixed token, so all the time
measured is the router's own. At hundreds of streams this per-token cost, together with the
gRPC streams on the event loop, is what bounds tokens/s (docs/benchmarks.md).

    python3 benchmarks/router_engine_cpu.py --streams 256 --prompt-len 512 --output-len 128 [--pp 2] [--tokenizer DIR] [--profile]

Without --tokenizer the engine serves token ids only (as a config-only model folder does);
with one, every token is detokenized. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.block_manager import BlockManager  # noqa: E402
from router.engine import Engine  # noqa: E402
from router.request_validation import RequestLimits, validate_request  # noqa: E402
from router.scheduler import Scheduler  # noqa: E402
from router.tokenizer import TokenIdsOnly  # noqa: E402
from shared.config import SchedulerConfig  # noqa: E402
from shared.interpreter import apply_interpreter_settings  # noqa: E402
from shared.proto import generation_pb2 as gen  # noqa: E402
from shared.proto import stage_worker_pb2 as pb  # noqa: E402

VOCAB = 32000


class InstantStage:
    """Answers each step at once: the last stage with one token (id 7) for every sequence the
    step samples, the others with an empty result."""

    address = "instant"

    def __init__(self, stage_index: int = 0, is_last: bool = True) -> None:
        self.stage_index = stage_index
        self.is_last = is_last

    def open_execute(self, on_result, on_error) -> None:
        self._on_result = on_result

    def send_step(self, step: pb.StepRequest) -> None:
        result = pb.StepResult(step_id=step.step_id, stage_index=self.stage_index)
        if self.is_last:
            result.tokens.extend(
                pb.SampledToken(seq_id=s.seq_id, token_id=7, logprob=-1.0) for s in step.seqs if s.sample
            )
        self._on_result(result)

    def close(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tokenizer", default=None, help="a folder AutoTokenizer reads (default: token ids only)")
    p.add_argument("--sync", action="store_true", help="--no-async-scheduling")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (their micro-batches take turns in lanes)")
    p.add_argument("--steps-in-flight-per-seq", type=int, default=0, help="as the router's flag (0: its default)")
    p.add_argument("--profile", action="store_true", help="cProfile the engine thread; print the top functions")
    args = p.parse_args()
    apply_interpreter_settings()  # the router's switch interval and collector settings
    tokenizer = TokenIdsOnly()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    block_size, max_context = 16, args.prompt_len + args.output_len + 16
    blocks = args.streams * (max_context // block_size + 2)
    config = SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=args.streams,
                             max_queue_len=args.streams, async_scheduling=not args.sync,
                             steps_in_flight_per_seq=args.steps_in_flight_per_seq)
    scheduler = Scheduler(config, BlockManager(blocks, block_size), max_context=max_context, num_stages=args.pp)
    stages = [InstantStage(i, i == args.pp - 1) for i in range(args.pp)]
    engine = Engine(stages, scheduler, tokenizer, (), max_context,
                    max_inflight=config.inflight_steps(args.pp), max_pending=args.streams,
                    forward_sampled_tokens=args.pp > 1 and not args.sync)
    limits = RequestLimits(vocab_size=VOCAB, max_context=max_context)
    done = threading.Semaphore(0)
    tokens = 0

    def sink(item: object) -> None:
        nonlocal tokens
        if isinstance(item, gen.GenerateResponse):
            tokens += len(item.token_ids)
        elif item is None:
            done.release()

    requests = []
    for i in range(args.streams):
        request = gen.GenerateRequest(sampling=gen.SamplingParams(max_new_tokens=args.output_len, ignore_eos=True))
        request.prompt_token_ids.ids.extend((i * 7919 + j) % (VOCAB - 3) + 3 for j in range(args.prompt_len))
        requests.append(validate_request(request, lambda text: [], limits))
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        loop = engine._loop

        def profiled_loop() -> None:
            profiler.enable()  # profiles the calling thread: the engine's
            try:
                loop()
            finally:
                profiler.disable()

        # Not started yet: its target is swapped for the profiled one.
        engine._thread = threading.Thread(target=profiled_loop, name="engine", daemon=True)
    engine.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for request in requests:
        engine.submit(request, sink)
    for _ in requests:
        done.acquire()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    engine.stop()
    steps = engine.stats.steps
    print(f"{args.streams} streams x {args.output_len} tokens ({args.prompt_len}-token prompts), pp={args.pp}, "
          f"{'sync' if args.sync else 'async'} scheduling, "
          f"{'tokenizer ' + args.tokenizer if args.tokenizer else 'token ids only'}")
    # tok/s here is the engine thread's ceiling: the stages answer at once.
    print("| tokens | steps | wall s | tok/s | CPU s | CPU us per token | CPU ms per step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {tokens} | {steps} | {wall:.2f} | {tokens / wall:.0f} | {cpu:.2f} | {cpu / tokens * 1e6:.1f} | "
          f"{cpu / steps * 1e3:.2f} |")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
