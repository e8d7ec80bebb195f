"""Process groups of a stage rank: one global group of every stage rank, a tensor-parallel
subgroup per stage, and point-to-point hops between neighbouring stages.

NCCL on GPU, gloo on CPU. Everything a layer calls goes through `TensorParallelGroup`, so
the model code never asks which backend it runs on.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.config import ParallelConfig
from shared.rendezvous import EPOCH_KEY, epoch_prefix


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank process sits in the deployment."""

    parallel: ParallelConfig
    stage_index: int
    tp_rank: int

    @property
    def global_rank(self) -> int:
        return self.parallel.global_rank(self.stage_index, self.tp_rank)

    @property
    def tp_size(self) -> int:
        return self.parallel.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.parallel.num_stages - 1


class TensorParallelGroup:
    """Collectives inside one stage's TP group. With size 1 every op is the identity."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int, backend: str) -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.backend = backend

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        assert self.group is not None, "collective before init_distributed"
        dist.all_reduce(x, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group and returns this rank's 1/size of the rows (dim 0).

        x.shape[0] must be a multiple of the group size.
        """
        if self.size == 1:
            return x
        assert self.group is not None, "collective before init_distributed"
        assert x.shape[0] % self.size == 0, f"{x.shape[0]} rows for a group of {self.size}"
        x = x.contiguous()
        rows = x.shape[0] // self.size
        if self.backend == "nccl":
            out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.reduce_scatter_tensor(out, x, group=self.group)
            return out
        # gloo has no reduce_scatter: all-reduce, then keep this rank's rows.
        dist.all_reduce(x, group=self.group)
        return x[self.rank * rows : (self.rank + 1) * rows].clone()

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` along `dim` (same shape on every rank)."""
        if self.size == 1:
            return x
        assert self.group is not None, "collective before init_distributed"
        x = x.contiguous()
        if self.backend == "nccl":
            # [size * x.shape[0], ...] in one collective, then moved to `dim`.
            out = torch.empty((self.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            if dim in (0, -x.dim()):
                return out
            chunks = out.chunk(self.size, dim=0)
            return torch.cat(chunks, dim=dim)
        # gloo has no all_gather_into_tensor: gather into a list.
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


_TP_GROUP = TensorParallelGroup(None, 0, 1, "gloo")


def get_tp_group() -> TensorParallelGroup:
    return _TP_GROUP


def set_tp_group(group: TensorParallelGroup) -> None:
    global _TP_GROUP
    _TP_GROUP = group


def declare_tp_placement(placement: RankPlacement, device: torch.device) -> None:
    """Makes the rank's TP position known before the process group exists.

    Layers read their TP rank and size when they are built, and a rank builds and loads
    its slice of the model before joining the group (loading is the slow part, and the
    stages load in parallel). Collectives need `init_distributed` first.
    """
    set_tp_group(TensorParallelGroup(None, placement.tp_rank, placement.tp_size, backend_for(device)))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    placement: RankPlacement,
    rendezvous: str,
    device: torch.device,
    timeout_s: float = 600.0,
    epoch: int = 0,
) -> None:
    """Joins epoch `epoch`'s global group through the router's TCPStore and builds every
    TP subgroup.

    Blocks until every rank of every stage has joined. Each epoch rendezvouses under its own
    key prefix: the keys a broken group left behind (rank counters, barriers) would
    otherwise confuse the next one.
    """
    host, _, port = rendezvous.rpartition(":")
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore(
        epoch_prefix(epoch), dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    )
    parallel = placement.parallel
    kwargs = {}
    if device.type == "cuda":
        # Binding the device lets NCCL create communicators eagerly and pick the right GPU.
        kwargs["device_id"] = device
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=placement.global_rank,
        world_size=parallel.world_size,
        timeout=timeout,
        **kwargs,
    )
    # new_group is collective over the whole world: every rank creates every stage's group,
    # in the same order, and keeps its own.
    own = None
    for stage in range(parallel.num_stages):
        ranks = [parallel.global_rank(stage, r) for r in range(parallel.tp_size)]
        group = dist.new_group(ranks, backend=backend) if parallel.tp_size > 1 else None
        if stage == placement.stage_index:
            own = group
    set_tp_group(TensorParallelGroup(own, placement.tp_rank, parallel.tp_size, backend))


def read_epoch(rendezvous: str, timeout_s: float) -> int:
    """The current process-group epoch, as the router published it in its store; waits up
    to `timeout_s` for the router to be up."""
    host, _, port = rendezvous.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    return int(store.get(EPOCH_KEY).decode())


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TensorParallelGroup(None, 0, 1, "gloo"))


class StageHop:
    """Sends hidden states to the same TP rank of the next stage, receives from the previous.

    Sends are asynchronous and waited lazily (before the next send), so a stage moves on to
    its next micro-batch while the previous one's hidden states are still on the wire.
    """

    def __init__(self, placement: RankPlacement) -> None:
        self.placement = placement
        parallel = placement.parallel
        self.next_rank = (
            None
            if placement.is_last_stage
            else parallel.global_rank(placement.stage_index + 1, placement.tp_rank)
        )
        self.prev_rank = (
            None
            if placement.is_first_stage
            else parallel.global_rank(placement.stage_index - 1, placement.tp_rank)
        )
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor) -> None:
        assert self.next_rank is not None
        self.wait_sends()
        tensor = tensor.contiguous()
        work = dist.isend(tensor, dst=self.next_rank)
        # Keep the tensor alive until the send completes.
        self._pending.append((work, tensor))

    def wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.prev_rank is not None
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=self.prev_rank)
        return out
