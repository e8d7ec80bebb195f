"""stage_worker/host_upload.py: host arrays reach the device unchanged, packed or not, and the
reused pinned staging slots never hand a copy another copy's bytes, even with the device busy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage_worker.host_upload import NUM_STAGING_SLOTS, PinnedStaging, upload, upload_packed


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices(), ids=str)
def test_upload_keeps_dtype_shape_and_values(device: torch.device) -> None:
    arrays = [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array([-1, 7, 2**31 - 1], dtype=np.int32),
        np.linspace(0, 1, 5, dtype=np.float64),
        np.empty(0, dtype=np.int64),
        np.array([True, False, True]),
    ]
    for host in arrays:
        on_device = upload(host, device)
        assert on_device.device.type == device.type and tuple(on_device.shape) == host.shape
        assert np.array_equal(on_device.cpu().numpy(), host)


@pytest.mark.parametrize("device", _devices(), ids=str)
def test_upload_packed_splits_back_into_the_arrays(device: torch.device) -> None:
    longs = [np.arange(5, dtype=np.int64), np.array([2**40, -3], dtype=np.int64)]
    ints = [np.arange(7, dtype=np.int32), np.zeros((2, 3), dtype=np.int32) + 9]
    parts = upload_packed(longs + ints, device)
    for host, part in zip(longs + ints, parts):
        assert part.dtype == (torch.int64 if host.dtype == np.int64 else torch.int32)
        assert np.array_equal(part.cpu().numpy(), host.ravel())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reused_staging_slots_hold_each_copy_until_it_ran() -> None:
    device = torch.device("cuda")
    staging = PinnedStaging(device, num_slots=3)
    busy = torch.randn(2048, 2048, device=device)
    results = []
    for i in range(4 * NUM_STAGING_SLOTS):
        if i % 5 == 0:
            for _ in range(10):  # queue device work, so the copies wait behind it
                busy = busy @ busy / 2048
        # Growing sizes: slots get reallocated while earlier copies are still queued.
        host = np.full(100 + 37 * i, i, dtype=np.int64)
        results.append((i, host.size, staging.upload(host)))
    torch.cuda.synchronize()
    for i, size, on_device in results:
        assert on_device.shape == (size,) and bool((on_device == i).all()), i
