"""Runs a function in N spawned processes joined in one gloo group (a CPU TP group).

`fn` must be importable by the children (a module-level function of a test module or a
package); its return value comes back with tensors moved to the CPU.
"""

from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    from stage_worker.distributed import TensorParallelGroup, destroy_distributed, set_tp_group

    # Several ranks share two cores: one thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        store = dist.TCPStore(_HOST, port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        set_tp_group(TensorParallelGroup(dist.group.WORLD, rank, world_size, "gloo"))
        result = fn(*args)
        torch.save({"result": _to_cpu(result)}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
    finally:
        destroy_distributed()


def run_tp(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """Runs fn(*args) on ranks 0..world_size-1 of a fresh gloo group; returns each rank's result."""
    ctx = mp.get_context("spawn")
    # The parent hosts the rendezvous store on a free port the OS picks.
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="tp_harness_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, store.port, out_dir, fn, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in hung:
            procs[rank].kill()
            procs[rank].join()
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout_s}s")
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} exited with code {procs[rank].exitcode} and no result")
            payload = torch.load(path, weights_only=False)
            if "error" in payload:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
    del store
    return results

