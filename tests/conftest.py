"""Session-wide test setup. The tests are grouped by what they run: tests/unit in this process
(and the gloo ranks it spawns), tests/system real `stageserve` processes (tests/harness/processes.py
starts and stops them), tests/gpu CUDA and the Triton kernels (CUDA-only tests skip themselves).

Without CUDA, Triton's kernels run in its interpreter. Triton reads TRITON_INTERPRET when it
is first imported, and any test module may import it at collection (before the kernel tests
that need the interpreter), so it is set here, before every test module. Stage processes the
tests start inherit it; it matters to them only with `--kernel-backend triton`.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

