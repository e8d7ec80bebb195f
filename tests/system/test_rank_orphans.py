"""A rank must not outlive its stage process.

Killed hard (SIGKILL, the OOM killer), a stage process cannot stop its ranks; a rank blocked
in the rendezvous or a collective would then live on until its join timeout (up to half an
hour), holding its memory (on a GPU host, its weights on the GPU). Here a real rank is
spawned as the stage spawns it, loads a model and blocks in a rendezvous nobody completes;
its parent is killed with SIGKILL; the rank must be gone within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO, free_port, stop_process

PARENT = textwrap.dedent("""
    import multiprocessing as mp
    import sys
    import time

    from shared.config import ParallelConfig
    from shared.proto import stage_worker_pb2 as pb
    from stage_worker.rank_process import RankArgs, rank_main

    if __name__ == "__main__":
        model, rendezvous = sys.argv[1], sys.argv[2]
        args = RankArgs(model_path=model, parallel=ParallelConfig(1, 1, (2,)), stage_index=0, tp_rank=0,
                        device_type="cpu", dtype="float32", rendezvous=rendezvous, join_timeout_s=600.0,
                        cpu_threads=1)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        rank = ctx.Process(target=rank_main, args=(args, child), daemon=True)
        rank.start()
        reply = pb.RankReply.FromString(parent.recv_bytes())
        assert reply.WhichOneof("reply") == "loaded", reply
        print(rank.pid, flush=True)  # loaded: the rank now blocks in the rendezvous
        time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # exited, not reaped yet by whoever adopted it


def test_a_rank_blocked_in_the_rendezvous_exits_when_its_stage_process_is_killed(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", "LlamaForCausalLM", num_layers=2, seed=5)
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    # Nobody listens there: the rank's TCPStore client retries until its join timeout.
    rendezvous = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, str(script), str(model), rendezvous], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        rank_pid = int(parent.stdout.readline())
        time.sleep(1.0)
        assert not _gone(rank_pid), "the rank should be waiting in the rendezvous"
        stop_process(parent, 10, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(rank_pid):
            assert time.monotonic() < deadline, f"rank {rank_pid} outlived its killed parent by 10 s"
            time.sleep(0.1)
    finally:
        stop_process(parent, sig=signal.SIGKILL)
