"""Host arrays to the device without waiting for the device.

A copy from pageable memory waits for the stream, which would serialise a step's
preparation behind the step still running on the GPU; a copy from pinned memory with
`non_blocking` only queues it. The pinned buffers are our own, reused round-robin: a fresh
pinned tensor per copy (`Tensor.pin_memory()`) goes through torch's caching host allocator,
whose blocks come back only after the work queued when they were freed has run; with the
next step always queued behind the running one that meant a new page-locked allocation per
copy, measured at 4.4 ms of a 256-sequence decode step's preparation on an H200 host
(benchmarks/input_batch_bench.py times the pieces). On CPU the tensors share the numpy
buffers.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

# Copies a staging slot is reused after: a step makes two or three, so this leaves several
# steps for a slot's copy to have run before it is overwritten (else the host waits for it).
NUM_STAGING_SLOTS = 16


class PinnedStaging:
    """Page-locked host buffers for one device's host-to-device copies, reused round-robin;
    a slot is refilled only once the copy that last read it has run."""

    def __init__(self, device: torch.device, num_slots: int = NUM_STAGING_SLOTS) -> None:
        assert device.type == "cuda", device
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None] * num_slots
        self._copied: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0
        self._lock = threading.Lock()

    def upload(self, host: np.ndarray) -> torch.Tensor:
        data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        dtype = torch.from_numpy(np.empty(0, dtype=host.dtype)).dtype
        with self._lock:
            slot = self._next
            self._next = (slot + 1) % len(self._buffers)
            copied = self._copied[slot]
            if copied is not None:
                copied.synchronize()  # queued NUM_STAGING_SLOTS copies ago: normally long done
            buffer = self._buffers[slot]
            if buffer is None or buffer.numel() < data.size:
                buffer = torch.empty(max(4096, 1 << max(data.size - 1, 0).bit_length()), dtype=torch.uint8,
                                     pin_memory=True)
                self._buffers[slot] = buffer
            staged = buffer[: data.size]
            staged.numpy()[:] = data
            on_device = staged.to(self.device, non_blocking=True)
            if copied is None:
                copied = self._copied[slot] = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        return on_device.view(dtype).view(host.shape)


_staging: dict[torch.device, PinnedStaging] = {}
_staging_lock = threading.Lock()


def upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """`host` on `device`, queued behind the stream's work."""
    if device.type == "cpu":
        return torch.from_numpy(host)
    with _staging_lock:
        staging = _staging.get(device)
        if staging is None:
            staging = _staging[device] = PinnedStaging(device)
    return staging.upload(host)


def upload_packed(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several int64 / int32 arrays (int64 ones first, so every part stays aligned) in one
    copy, as flat tensors of their own dtype."""
    dtypes = [a.dtype for a in arrays]
    assert set(dtypes) <= {np.dtype(np.int64), np.dtype(np.int32)}, dtypes
    assert dtypes == sorted(dtypes, key=lambda d: d != np.int64), "int64 arrays first"
    parts = [np.ascontiguousarray(a).ravel() for a in arrays]
    packed = np.concatenate([p.view(np.uint8) for p in parts]) if parts else np.empty(0, np.uint8)
    on_device = upload(packed, device)
    out: list[torch.Tensor] = []
    offset = 0
    for part in parts:
        dtype = torch.int64 if part.dtype == np.int64 else torch.int32
        out.append(on_device[offset : offset + part.nbytes].view(dtype))
        offset += part.nbytes
    return out
