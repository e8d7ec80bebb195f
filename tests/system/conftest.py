"""Fixtures of the system tests (real processes, started through tests/harness/processes.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chat_system(tmp_path_factory: pytest.TempPathFactory):
    """tests/harness/chat.py: one `stageserve up --openai-port` for the chat and front tests."""
    from tests.harness.chat import start_chat_system

    started = start_chat_system(tmp_path_factory.mktemp("chat-system"))
    yield started
    code = started.system.stop()
    assert code == 0, f"stageserve up exited with {code}; log:\n{started.system.log()}"
