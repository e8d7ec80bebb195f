"""The stage's TP rank processes, seen from the stage's gRPC process.

Commands go to every rank over its own pipe, under one lock, so every rank sees them in
the same order. One reader thread routes replies: step results (rank 0 only) to the
step sink, control replies to per-rank queues, and a rank that dies or reports a fatal
error to the failure callback.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from shared.proto import stage_worker_pb2 as pb
from stage_worker.rank_process import RankArgs, rank_main


class RankFailure(RuntimeError):
    pass


class RankPool:
    def __init__(
        self,
        args_per_rank: list[RankArgs],
        on_loaded: Callable[[pb.RankReady], None],
        on_ready: Callable[[pb.RankReady], None],
        on_failure: Callable[[str], None],
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for args in args_per_rank:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=rank_main, args=(args, child), daemon=True,
                               name=f"stage{args.stage_index}-tp{args.tp_rank}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._on_loaded = on_loaded
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._send_lock = threading.Lock()
        self._control: list[queue.Queue[pb.RankReply]] = [queue.Queue() for _ in args_per_rank]
        self._step_sink: Callable[[pb.StepResult], None] | None = None
        self.failed: str | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, name="rank-replies", daemon=True)
        self._reader.start()

    @property
    def size(self) -> int:
        return len(self._conns)

    def set_step_sink(self, sink: Callable[[pb.StepResult], None] | None) -> None:
        self._step_sink = sink

    def send(self, command: pb.RankCommand) -> None:
        if self.failed:
            raise RankFailure(self.failed)
        data = command.SerializeToString()
        with self._send_lock:
            try:
                for conn in self._conns:
                    conn.send_bytes(data)
            except OSError as exc:
                # A rank died (or the pool was killed) before the reader thread noticed.
                raise RankFailure(self.failed or f"a TP rank is gone: {exc}") from None

    def call(self, command: pb.RankCommand, timeout_s: float) -> list[pb.RankReply]:
        """Sends a control command and returns every rank's reply."""
        self.send(command)
        replies = []
        for q in self._control:
            try:
                reply = q.get(timeout=timeout_s)
            except queue.Empty:
                raise RankFailure(f"a rank did not answer within {timeout_s:.0f} s") from None
            if reply.WhichOneof("reply") == "fatal_error":
                raise RankFailure(reply.fatal_error)
            replies.append(reply)
        return replies

    def _fail(self, message: str) -> None:
        if self.failed is None and not self._stopping:
            self.failed = message
            # Wake up anyone waiting on a control reply.
            for q in self._control:
                q.put(pb.RankReply(fatal_error=message))
            self._on_failure(message)

    def _read_loop(self) -> None:
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        conns = {id(c): i for i, c in enumerate(self._conns)}
        waitables: list = list(self._conns) + list(sentinels)
        while waitables:
            for ready in wait(waitables):
                if isinstance(ready, Connection):
                    rank = conns[id(ready)]
                    try:
                        reply = pb.RankReply.FromString(ready.recv_bytes())
                    except (EOFError, OSError):
                        waitables.remove(ready)
                        continue
                    self._route(rank, reply)
                else:
                    rank = sentinels[ready]
                    waitables.remove(ready)
                    self._procs[rank].join(1)  # reaped, so its exit code is known
                    code = self._procs[rank].exitcode
                    if not self._stopping:
                        self._fail(f"TP rank {rank} exited (exit code {code})")

    def _route(self, rank: int, reply: pb.RankReply) -> None:
        if self._stopping:
            return  # A pool being replaced must not move the stage's state any more.
        kind = reply.WhichOneof("reply")
        if kind == "step":
            sink = self._step_sink
            if sink is not None:
                sink(reply.step)
        elif kind == "loaded":
            self._on_loaded(reply.loaded)
        elif kind == "ready":
            self._on_ready(reply.ready)
        elif kind == "fatal_error":
            self._fail(reply.fatal_error)
        else:
            self._control[rank].put(reply)

    def kill(self, reason: str) -> None:
        """Kills every rank at once (Rejoin): some may be blocked in a collective with a
        dead peer and would never read a shutdown command."""
        self._stopping = True
        if self.failed is None:
            self.failed = reason
        for q in self._control:
            q.put(pb.RankReply(fatal_error=reason))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(10)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        try:
            with self._send_lock:
                for conn in self._conns:
                    conn.send_bytes(pb.RankCommand(shutdown=pb.Shutdown()).SerializeToString())
        except (OSError, ValueError):
            pass
        for proc in self._procs:
            proc.join(timeout_s)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
