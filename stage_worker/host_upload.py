"""Host arrays to the device without waiting for the device.

A copy from pageable memory waits for the stream, which would serialise a step's
preparation behind the step still running on the GPU; going through pinned memory with
`non_blocking` only queues it (the caching host allocator keeps the pinned buffer alive until
the copy has run). On CPU the tensors share the numpy buffers.
"""

from __future__ import annotations

import numpy as np
import torch


def upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """`host` on `device`, queued behind the stream's work."""
    tensor = torch.from_numpy(host)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


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
