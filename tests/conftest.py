"""Session-wide test setup.

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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chat_system(tmp_path_factory: pytest.TempPathFactory):
    """tests/chat_harness.py: one `stageserve up --openai-port` for the chat and front tests."""
    from tests.chat_harness import start_chat_system

    started = start_chat_system(tmp_path_factory.mktemp("chat-system"))
    yield started
    code = started.system.stop()
    assert code == 0, f"stageserve up exited with {code}; log:\n{started.system.log()}"
