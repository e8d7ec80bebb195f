"""Sampled tokens that a stage holds before the router has seen them (asynchronous scheduling).

With asynchronous scheduling the router sends a sequence's next decode step before the
token that step starts from has come back (`append_sampled` in protos/stage_worker.proto).
The stages then append a placeholder to the sequence's tokens and remember where the real
token is:

* the last stage sampled it: the sampler's output on the device, plus a pinned host copy
  that lands when the step's device-to-host copy completes;
* the first stage of a pipeline received it from the last stage (`TokenForward` below,
  NCCL on GPU), into a device buffer, asynchronously;
* middle stages never need its value (they see hidden states, not token ids).

The first stage gathers the token into its next step's input ids on the device, so no host
ever waits for it. The last stage needs the value on the host only for penalties (the
sampler counts previous tokens); then it waits for the copy
(`ModelRunner._resolve_known_tokens`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stage_worker.layers.sampler import SamplerOutput

# Stands for a token the stage appended before knowing its value. Never a valid token id,
# so a placeholder that reached the embedding or the sampler's penalties would fail loudly.
PLACEHOLDER = -1


class SamplerHostCopy:
    """One device-to-host copy of a step's sampler output, started at once and waited for
    by whoever needs the values first: everything as float64 (exact for token ids) in one
    pinned buffer, [n ids, n logprobs, n*k top ids, n*k top logprobs]."""

    def __init__(self, output: SamplerOutput) -> None:
        self.num_tokens = output.token_ids.shape[0]
        packed = torch.cat((
            output.token_ids.double(),
            output.logprobs.double(),
            output.top_token_ids.double().flatten(),
            output.top_logprobs.double().flatten(),
        ))
        self._ready: torch.cuda.Event | None = None
        if packed.device.type == "cuda":
            # Pinned, so the copy only queues behind the step's kernels.
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = packed
        self._landed = False
        self._values: list[float] | None = None
        self._token_ids: list[int] | None = None

    def done(self) -> bool:
        """Whether the copy has landed (never blocks)."""
        # The rank's main thread asks for every sequence of a step: query the event once it
        # has landed no more (both threads may set the flag; it only ever turns True).
        if not self._landed:
            self._landed = self._ready is None or self._ready.query()
        return self._landed

    def values(self) -> list[float]:
        """The packed values; waits for the copy (without the GIL) if it is still running."""
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._values = self._host.tolist()
        return self._values

    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            self._token_ids = [int(v) for v in self.values()[: self.num_tokens]]
        return self._token_ids


class SampledTokens:
    """One step's sampled token ids on this stage, in the step's order of sampled sequences."""

    def __init__(
        self,
        device_ids: torch.Tensor,
        *,
        recv_work: dist.Work | None = None,
        host_copy: SamplerHostCopy | None = None,
    ) -> None:
        # [num_sampled] int64 on the stage's device.
        self.device_ids = device_ids
        # The asynchronous receive filling device_ids (first stage of a pipeline).
        self._recv_work = recv_work
        # The last stage's copy of its sampler output to the host.
        self.host_copy = host_copy

    def device_ready(self) -> torch.Tensor:
        """device_ids, once whatever fills them is ordered before the current stream's next
        work (NCCL: a stream dependency, the host does not wait; gloo: waits)."""
        if self._recv_work is not None:
            self._recv_work.wait()
            self._recv_work = None
        return self.device_ids


@dataclass
class SampledToken:
    """Where one sequence's not-yet-known token is: row `row` of `tokens` (None on stages
    that never need the value)."""

    tokens: SampledTokens | None
    row: int


class TokenForward:
    """Sends the last stage's sampled ids to the first stage, TP rank to the same TP rank
    (every rank of the last stage samples the same tokens; every rank of the first stage
    needs them all for its vocab-parallel embedding).

    Both sides post one operation per step that forwards, in step order, so the sends and
    receives match. Sends are waited lazily, like the hidden-state hop's. Every receive is
    kept until it has completed, also those no later step reads (a sequence that stopped):
    with gloo, dropping such a receive early was seen to shift the matching (the next step's
    ids landed in the following receive's buffer, and the pipeline deadlocked).
    """

    def __init__(self, first_rank: int, last_rank: int, is_first: bool) -> None:
        self.peer = last_rank if is_first else first_rank
        self.is_first = is_first
        self._pending_sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._pending_recvs: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def send(self, token_ids: torch.Tensor) -> None:
        assert not self.is_first
        self.wait_sends()
        token_ids = token_ids.contiguous()
        self._pending_sends.append((dist.isend(token_ids, dst=self.peer), token_ids))

    def recv(self, num_tokens: int, device: torch.device) -> SampledTokens:
        assert self.is_first
        while self._pending_recvs and self._pending_recvs[0][0].is_completed():
            self._pending_recvs.popleft()
        buffer = torch.empty(num_tokens, dtype=torch.int64, device=device)
        work = dist.irecv(buffer, src=self.peer)
        self._pending_recvs.append((work, buffer))
        return SampledTokens(buffer, recv_work=work)

    def wait_sends(self) -> None:
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends.clear()
