"""One serving system for the chat and OpenAI-front tests (tests/system/test_chat.py,
tests/system/test_openai.py): `stageserve up --openai-port` on a tiny model with a chat template, as a
user starts it, with a bearer token required (so the front's 401 is the router's own) and a
short queue (so its 429 is too). Started once per session: a system costs ~15-30 s of CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from stageserve.demo_model import write_tiny_model
from stageserve.openai_front.health_probe import front_is_healthy
from tests.harness.processes import ServingSystem, free_port

TOKEN = "chat-tests-token"
# Requests the router holds (waiting + running) before RESOURCE_EXHAUSTED.
MAX_QUEUE_LEN = 4
SERVED_MODEL = "tiny-chat"


@dataclass
class ChatSystem:
    system: ServingSystem
    model_dir: Path
    # The same weights without a chat template (a base model).
    base_model_dir: Path
    # http://127.0.0.1:PORT (the OpenAI API is under /v1).
    url: str


def start_chat_system(root: Path) -> ChatSystem:
    model_dir = write_tiny_model(root / "chat", seed=3, num_layers=2)
    base_dir = write_tiny_model(root / "base", seed=3, num_layers=2, chat_template=None)
    token_file = root / "tokens"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    system = ServingSystem(
        model_dir, 1, 1, "--kv-cache-bytes", str(4 * 2**20), "--auth-token-file", str(token_file),
        "--max-queue-len", str(MAX_QUEUE_LEN), "--openai-port", str(port), "--served-model-name", SERVED_MODEL,
        token=TOKEN,
    )
    url = f"http://127.0.0.1:{port}"
    # `up` starts the front beside the router; the gRPC side may be ready a moment before it.
    deadline = time.monotonic() + 60
    while not front_is_healthy(url):
        if time.monotonic() > deadline:
            system.stop()
            raise RuntimeError(f"the OpenAI front did not become healthy; log:\n{system.log()}")
        time.sleep(0.2)
    return ChatSystem(system=system, model_dir=model_dir, base_model_dir=base_dir, url=url)
