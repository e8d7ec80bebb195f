"""The body of one TP rank process: load the stage's slice of the model, join the process
group, then execute commands from the stage's gRPC process in the order they arrive.

Commands come over a local pipe as serialized `RankCommand` protos; nothing here listens
on the network.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from shared.config import ModelConfig, ParallelConfig, dtype_from_name
from shared.interpreter import apply_interpreter_settings, freeze_startup_objects
from shared.proto import stage_worker_pb2 as pb


@dataclass(frozen=True)
class RankArgs:
    model_path: str
    parallel: ParallelConfig
    stage_index: int
    tp_rank: int
    device_type: str
    dtype: str
    rendezvous: str
    join_timeout_s: float
    cpu_threads: int
    # The process-group generation to join (see Rejoin in protos/stage_worker.proto).
    epoch: int = 0
    # stage_worker.loader.LOAD_FORMATS: "auto" reads the checkpoint, "dummy" makes random weights.
    load_format: str = "auto"
    kernel_backend: str = "auto"
    enforce_eager: bool = False
    # stage_worker.kv_cache.KV_CACHE_DTYPES: "auto" (the model dtype) or "fp8".
    kv_cache_dtype: str = "auto"


# The main thread (control replies) and the step finisher (step results) both reply.
_SEND_LOCK = threading.Lock()


def _reply(conn: Connection, reply: pb.RankReply) -> None:
    data = reply.SerializeToString()
    with _SEND_LOCK:
        conn.send_bytes(data)


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Ends this process once `parent_pid` is no longer its parent.

    A stage process killed hard (SIGKILL, the OOM killer) cannot stop its ranks, and a rank
    blocked in the rendezvous or a collective would otherwise live on until a timeout of up
    to half an hour, holding its GPU memory. (PR_SET_PDEATHSIG would fire when the *thread*
    that spawned the rank ends, and the stage spawns ranks from short-lived threads.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def rank_main(args: RankArgs, conn: Connection) -> None:
    """Entry point of a spawned rank process."""
    # The stage process's pid as multiprocessing recorded it at spawn, not getppid(): the
    # stage may already be gone by now.
    parent = multiprocessing.parent_process()
    exit_with_parent(parent.pid if parent is not None else os.getppid())
    # `kill -USR1 <pid>` prints every thread's stack: where a stuck rank waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    apply_interpreter_settings()
    # tqdm (the weight loader's progress bar) otherwise creates a multiprocessing lock, a
    # named semaphore the resource tracker watches; a rank ends with os._exit, which skips
    # the lock's cleanup, and every shutdown printed "leaked semaphore objects". A thread
    # lock is all one process's bars need.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        _run(args, conn)
    except (EOFError, BrokenPipeError):
        # The stage process is gone: nothing left to serve.
        sys.exit(1)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the stage process
        message = f"rank {args.tp_rank} of stage {args.stage_index}: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        try:
            _reply(conn, pb.RankReply(fatal_error=message))
        except (OSError, EOFError):
            pass
        sys.exit(1)


def _run(args: RankArgs, conn: Connection) -> None:
    # Imported here so the spawn of the process is cheap and import errors are reported.
    from stage_worker.distributed import (
        RankPlacement,
        declare_tp_placement,
        destroy_distributed,
        init_distributed,
    )
    from stage_worker.model_runner import ModelRunner
    from stage_worker.step_finisher import StepFinisher

    if args.device_type == "cuda":
        device = torch.device("cuda", args.tp_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.cpu_threads))
    config = ModelConfig.from_pretrained(args.model_path)
    layout = args.parallel.stage_layout(args.stage_index)
    placement = RankPlacement(args.parallel, args.stage_index, args.tp_rank)
    declare_tp_placement(placement, device)
    runner = ModelRunner(
        config, layout, placement, dtype_from_name(args.dtype), device, load_format=args.load_format,
        kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
    )
    summary = runner.load()
    report = pb.RankReady(
        tp_rank=args.tp_rank,
        parameter_names=summary.parameter_names,
        parameter_bytes=summary.parameter_bytes,
        bytes_read=summary.bytes_read,
        load_seconds=summary.load_seconds,
    )
    _reply(conn, pb.RankReply(loaded=report))
    init_distributed(placement, args.rendezvous, device, timeout_s=args.join_timeout_s, epoch=args.epoch)
    runner.attach_hop()
    _reply(conn, pb.RankReply(ready=report))

    def finisher_failed(exc: BaseException) -> None:
        traceback.print_exception(exc)
        message = f"rank {args.tp_rank} of stage {args.stage_index}: {type(exc).__name__}: {exc}"
        try:
            _reply(conn, pb.RankReply(fatal_error=message))
        finally:
            os._exit(1)

    # Only rank 0 reports step results (every rank computes the same ones).
    report_step = (lambda result: _reply(conn, pb.RankReply(step=result))) if args.tp_rank == 0 else None
    finisher = StepFinisher(runner, report_step, finisher_failed)
    try:
        while True:
            command = pb.RankCommand.FromString(conn.recv_bytes())
            kind = command.WhichOneof("command")
            if kind == "step":
                finisher.submit(runner.launch(command.step))
                continue
            # Control commands see no step half done.
            finisher.drain()
            if kind == "profile":
                _reply(conn, pb.RankReply(profile=runner.profile(command.profile)))
            elif kind == "init_cache":
                _reply(conn, pb.RankReply(init_cache=runner.init_cache(command.init_cache)))
                # Weights, cache and graphs exist: keep them out of every later collection.
                freeze_startup_objects()
            elif kind == "shutdown":
                break
            else:
                raise AssertionError(f"unknown rank command {kind!r}")
    finally:
        finisher.drain()
        for hop in (runner.hop, runner.token_forward):
            if hop is not None:
                hop.wait_sends()
        destroy_distributed()
    os._exit(0)
