"""Stages on other hosts, simulated with Linux network namespaces: the router and each of two
stages run in their own namespace, joined by veth pairs to a bridge in a fourth one, on a
private subnet the test creates. Each process has its own address and its own loopback, so
nothing reaches another process over 127.0.0.1: the stages join the router's rendezvous at
its address, gloo carries the hidden states between namespaces, and greedy output equals
transformers. Needs root and iproute2 (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO, Process
from tests.harness.reference import comparable_prefix, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SUBNET = "10.77.0"
ROUTER_IP, STAGE_IPS = f"{SUBNET}.1", (f"{SUBNET}.2", f"{SUBNET}.3")
ROUTER_PORT, RENDEZVOUS_PORT, STAGE_PORT = 50051, 29500, 50061
PROMPT_IDS = [0, 17, 230, 41, 99, 5, 300]
NEW_TOKENS = 12


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the test; None if it can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"ssprobe{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except subprocess.CalledProcessError as exc:
        return f"network namespaces or veth pairs are not allowed here: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Network:
    """One namespace per process plus a switch namespace holding the bridge. Interface names
    are local to each namespace, so nothing is created in the host's namespace."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.switch = f"ss{tag}sw"
        self.nodes: dict[str, str] = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, (role, address) in enumerate((("router", ROUTER_IP), ("stage0", STAGE_IPS[0]),
                                                 ("stage1", STAGE_IPS[1]))):
            ns = f"ss{tag}{role}"
            _ip("netns", "add", ns)
            self.nodes[role] = ns
            # One veth pair per process: eth0 in its namespace, h<i> on the switch's bridge.
            _ip("-n", self.switch, "link", "add", f"h{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"h{index}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        for ns in (*self.nodes.values(), self.switch):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def ns_process(ns: str, name: str, args: list[str], log_dir: Path) -> Process:
    """A `stageserve` command inside a namespace (`ip netns exec` execs it: the pid is python's)."""
    # gloo would otherwise advertise the address the host name resolves to, which is not
    # this namespace's; eth0 is the only interface that reaches the others.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0"}
    return Process(name, args, log_dir, prefix=["ip", "netns", "exec", ns], env=env)


# Runs in the router's namespace: waits for SERVING, checks that the stages' ports are not
# reachable over this namespace's loopback, and generates.
CLIENT = """
import json, socket, sys, time
from stageserve.client import GenerationClient
address, stage_port, prompt, n = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
client = GenerationClient(address)
deadline = time.monotonic() + 200
while not client.is_serving():
    if time.monotonic() > deadline:
        sys.exit("the router did not serve within 200 s")
    time.sleep(0.3)
with socket.socket() as s:
    s.settimeout(2)
    loopback = s.connect_ex(("127.0.0.1", stage_port)) == 0
result = client.generate(prompt, max_new_tokens=n, ignore_eos=True, timeout=120)
info = client.model_info()
print(json.dumps({"tokens": list(result.token_ids), "stages": [s.address for s in info.stages],
                  "stage_reachable_over_loopback": loopback}))
"""


@pytest.fixture
def network() -> Iterator[Network]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Network()
    try:
        yield net
    finally:
        net.close()


def test_router_and_stages_in_separate_network_namespaces(network: Network, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=5)
    stages = ",".join(f"{ip}:{STAGE_PORT}" for ip in STAGE_IPS)
    procs = [ns_process(network.nodes["router"], "router", [
        "router", "--model", str(model), "--stages", stages, "--host", ROUTER_IP, "--port", str(ROUTER_PORT),
        "--rendezvous-port", str(RENDEZVOUS_PORT), "--kv-cache-bytes", str(4 << 20), "--expose-stage-addresses",
    ], tmp_path)]
    for index, ip in enumerate(STAGE_IPS):
        procs.append(ns_process(network.nodes[f"stage{index}"], f"stage{index}", [
            "stage", "--model", str(model), "--stage-index", str(index), "--num-stages", "2", "--tp", "1",
            "--host", ip, "--port", str(STAGE_PORT), "--rendezvous", f"{ROUTER_IP}:{RENDEZVOUS_PORT}",
            "--device", "cpu",
        ], tmp_path))
    try:
        client = subprocess.run(
            ["ip", "netns", "exec", network.nodes["router"], sys.executable, "-c", CLIENT,
             f"{ROUTER_IP}:{ROUTER_PORT}", str(STAGE_PORT), json.dumps(PROMPT_IDS), str(NEW_TOKENS)],
            cwd=REPO, capture_output=True, text=True, timeout=260,
        )
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-3000:]}" for p in procs)
        assert client.returncode == 0, f"{client.stderr[-3000:]}\n{logs}"
        got = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        # Their rank processes share their process groups.
        for proc in procs:
            proc.stop(kill_group=True)
    assert got["stages"] == [f"{ip}:{STAGE_PORT}" for ip in STAGE_IPS]
    # Each namespace has its own loopback: the stage is reachable only at its address.
    assert not got["stage_reachable_over_loopback"]
    ref = hf_greedy(model, PROMPT_IDS, NEW_TOKENS)
    n = comparable_prefix(ref)
    assert got["tokens"][:n] == ref.token_ids[:n]
