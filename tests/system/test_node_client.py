"""A client in another language, written against the .proto files only: the Node example
(examples/node, @grpc/grpc-js + @grpc/proto-loader from npm) streams from a running
`stageserve up` and gets the same greedy tokens as the Python client."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO, ServingSystem, stop_process

pytestmark = pytest.mark.timeout(600)

EXAMPLE = REPO / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServingSystem]]:
    """The example copied to a temp folder with its npm dependencies installed there, and a
    running system; npm installs while the system starts."""
    if NODE is None or NPM is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    work = tmp_path_factory.mktemp("node-client")
    for name in ("package.json", "package-lock.json", "client.js"):
        shutil.copy(EXAMPLE / name, work / name)
    # `npm ci`: exactly the versions the example's lock file names.
    npm = subprocess.Popen(
        [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        model = write_tiny_model(work / "model", "LlamaForCausalLM", seed=11)
        running = ServingSystem(model, 1, 1, "--kv-cache-bytes", str(8 << 20))
    except BaseException:
        stop_process(npm, 0, signal.SIGKILL)
        raise
    try:
        output, _ = npm.communicate(timeout=300)
        assert npm.returncode == 0, f"npm ci failed:\n{output}"
        yield work / "client.js", running
    finally:
        running.stop()


@pytest.fixture
def node_client(setup: tuple[Path, ServingSystem]) -> Path:
    return setup[0]


@pytest.fixture
def system(setup: tuple[Path, ServingSystem]) -> ServingSystem:
    return setup[1]


def run_node(client: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODE, str(client), "--proto-dir", str(REPO / "protos"), *args],
        capture_output=True, text=True, timeout=120,
    )


def test_node_client_streams_the_same_tokens_as_the_python_client(
    node_client: Path, system: ServingSystem
) -> None:
    expected = system.client.generate("Hello from Node", max_new_tokens=8, timeout=60)
    out = run_node(node_client, "--addr", system.address, "--max-new-tokens", "8", "--timeout", "60",
                   "--request-id", "node-1", "--json", "Hello from Node")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finish_reason"] == "FINISH_REASON_LENGTH"
    assert summary["token_ids"] == expected.token_ids
    assert summary["text"] == expected.text
    # Streamed: a message per token, or fewer when tokens queued up for a slow reader.
    assert 1 <= summary["messages"] <= 8
    assert summary["prompt_tokens"] == expected.prompt_tokens


def test_node_client_plain_output_and_errors(node_client: Path, system: ServingSystem) -> None:
    out = run_node(node_client, "--addr", system.address, "--max-new-tokens", "3", "Hi")
    assert out.returncode == 0, out.stderr
    # stdout is the answer alone; how it ended goes to stderr.
    assert "[finish" not in out.stdout and out.stderr.rstrip().endswith("[finish: FINISH_REASON_LENGTH]")
    # The router's validation reaches a Node caller as a status with its message.
    bad = run_node(node_client, "--addr", system.address, "--temperature=-1", "Hi")
    assert bad.returncode == 1
    assert bad.stderr.startswith("INVALID_ARGUMENT: ") and "temperature" in bad.stderr
    # A deadline the server cannot meet.
    late = run_node(node_client, "--addr", system.address, "--max-new-tokens", "480", "--ignore-eos",
                    "--timeout", "0.3", "Hi")
    assert late.returncode == 1 and late.stderr.startswith("DEADLINE_EXCEEDED"), late.stderr
    assert run_node(node_client, "--max-new-tokens", "x", "Hi").returncode == 2
    # The TLS and token options of the Python client: a file that is not there is a usage error.
    missing = run_node(node_client, "--auth-token-file", "/nonexistent/token", "Hi")
    assert missing.returncode == 2 and "cannot read the auth token file" in missing.stderr
    missing = run_node(node_client, "--tls-ca", "/nonexistent/ca.pem", "Hi")
    assert missing.returncode == 2 and "cannot read the CA file" in missing.stderr
