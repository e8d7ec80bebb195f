"""A stage dies mid-generation and does not come back in time, end to end on CPU with real
processes: the router (--recovery-timeout 2) and two tp=2 stages started one by one (as
compose starts them). The stage 0 process is killed with SIGKILL (its ranks become orphans)
and not restarted: the router keeps the in-flight stream, and a request sent meanwhile,
for the recovery timeout, then ends both with UNAVAILABLE; router health is NOT_SERVING and
new requests are refused at once. Once the operator starts the same command again, the
router re-forms the process group through Rejoin and serves the same greedy tokens.

Streams that the recovered pipeline carries on (a killed TP rank, a killed stage process
restarted by `stageserve up`) are tested in tests/system/test_recovery.py. The figures (time to
fail the stream, to refuse a new request, to recover) are printed; docs/reliability.md
reports them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from router.stage_client import StageClient
from shared.proto import stage_worker_pb2 as pb
from stageserve.client import GenerationClient, RetryPolicy
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import Process, free_port, stop_all

pytestmark = pytest.mark.timeout(240)

NUM_STAGES, TP = 2, 2
NO_RETRY = RetryPolicy(max_attempts=1)
PROMPT = "the quick brown fox"
GREEDY = dict(max_new_tokens=12, ignore_eos=True)
# Long enough to be mid-stream for many seconds when the fault strikes.
LONG = dict(max_new_tokens=480, ignore_eos=True)
FAIL_WITHIN_S = 5.0
RECOVER_WITHIN_S = 60.0
# The router keeps the streams this long for a stage to come back.
RECOVERY_TIMEOUT_S = 2.0


class FaultCluster:
    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model, self.log_dir = model, log_dir
        self.port, self.rendezvous = free_port(), free_port()
        self.stage_ports = [free_port() for _ in range(NUM_STAGES)]
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, Process] = {}
        self.procs["router"] = Process("router", [
            "router", "--model", str(model), "--stages", ",".join(f"127.0.0.1:{p}" for p in self.stage_ports),
            "--host", "127.0.0.1", "--port", str(self.port), "--rendezvous-port", str(self.rendezvous),
            "--kv-cache-bytes", str(8 << 20), "--max-num-batched-tokens", "256",
            "--recovery-timeout", str(RECOVERY_TIMEOUT_S),
        ], log_dir)
        for index in range(NUM_STAGES):
            self.start_stage(index)
        self.client = GenerationClient(self.address, NO_RETRY)

    def start_stage(self, index: int, suffix: str = "") -> None:
        self.procs[f"stage{index}"] = Process(f"stage{index}{suffix}", [
            "stage", "--model", str(self.model), "--stage-index", str(index),
            "--num-stages", str(NUM_STAGES), "--tp", str(TP), "--host", "127.0.0.1",
            "--port", str(self.stage_ports[index]), "--rendezvous", f"127.0.0.1:{self.rendezvous}",
            "--device", "cpu",
        ], self.log_dir)

    def wait_serving(self, timeout: float) -> float:
        """Seconds until the router reports SERVING."""
        start = time.monotonic()
        while not self.client.is_serving():
            dead = [f"{n} exited {p.proc.returncode}:\n{p.log()[-3000:]}"
                    for n, p in self.procs.items() if p.proc.poll() is not None]
            assert not dead, dead
            assert time.monotonic() - start < timeout, (
                f"router not SERVING within {timeout} s:\n{self.procs['router'].log()[-4000:]}"
            )
            time.sleep(0.1)
        return time.monotonic() - start

    def stop(self) -> None:
        self.client.close()
        # Orphaned ranks of a killed stage share its process group (its own session).
        stop_all(list(self.procs.values()), kill_group=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    root = tmp_path_factory.mktemp("fault")
    model = write_tiny_model(root / "model", "LlamaForCausalLM", seed=11)
    c = FaultCluster(model, root)
    try:
        c.wait_serving(timeout=180)
        yield c
    finally:
        c.stop()


def _wait_pool_full(client: GenerationClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = client.model_info()
        if info.free_kv_blocks == info.num_kv_blocks:
            return
        assert time.monotonic() < deadline, f"{info.free_kv_blocks} of {info.num_kv_blocks} blocks free"
        time.sleep(0.1)


class LongStream:
    """A long streamed generation on its own thread; records how and when it ended."""

    def __init__(self, client: GenerationClient) -> None:
        self.tokens = 0
        self.error: grpc.RpcError | None = None
        self.ended_at: float | None = None
        self.first_token = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(client,), daemon=True).start()

    def _run(self, client: GenerationClient) -> None:
        try:
            for msg in client.stream(PROMPT, timeout=120, **LONG):
                self.tokens += len(msg.token_ids)
                if self.tokens >= 3:
                    self.first_token.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.done.set()
            self.first_token.set()


def test_a_stage_that_does_not_come_back_in_time_ends_the_streams_unavailable(cluster: FaultCluster) -> None:
    client = cluster.client
    victim = cluster.procs["stage0"]
    survivor = cluster.procs["stage1"].proc
    expected = client.generate(PROMPT, timeout=60, **GREEDY).token_ids
    assert len(expected) == GREEDY["max_new_tokens"]
    stream = LongStream(client)
    assert stream.first_token.wait(60), "the long generation never started"
    assert not stream.done.is_set(), f"the long generation ended before the fault: {stream.error}"
    killed_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    # Health follows at once.
    deadline = time.monotonic() + 2.0
    while client.is_serving():
        assert time.monotonic() < deadline, "router still SERVING 2 s after the failure"
        time.sleep(0.05)
    # A request sent during the recovery waits with the kept stream instead of failing.
    waiting = LongStream(client)
    assert stream.done.wait(RECOVERY_TIMEOUT_S + FAIL_WITHIN_S), "the in-flight request hangs after the fault"
    fail_s = stream.ended_at - killed_at
    print(f"\nin-flight request ended {fail_s:.2f} s after the kill ({stream.tokens} tokens streamed)")
    for ended in (stream, waiting):
        assert ended.done.wait(FAIL_WITHIN_S)
        assert ended.error is not None, "a kept request ended without an error"
        assert ended.error.code() == grpc.StatusCode.UNAVAILABLE, ended.error
        assert f"did not recover within {RECOVERY_TIMEOUT_S:g} s (--recovery-timeout)" in ended.error.details()
    assert waiting.tokens == 0
    # Kept until the timeout (the kill is seen within tens of ms), then ended promptly.
    assert RECOVERY_TIMEOUT_S <= fail_s < RECOVERY_TIMEOUT_S + FAIL_WITHIN_S

    # Past the timeout, a new request is refused, fast.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, timeout=30, **GREEDY)
    refuse_s = time.monotonic() - started
    print(f"a new request was refused in {refuse_s * 1000:.0f} ms: {err.value.details()}")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith("recovering: ")
    assert refuse_s < 1.0

    # The operator starts the same command again: the stage rejoins the current epoch. Orphaned
    # ranks of the killed process, if any are left, go with its process group.
    victim.stop(kill_group=True)
    cluster.start_stage(0, suffix="-restarted")
    recover_s = cluster.wait_serving(timeout=RECOVER_WITHIN_S)
    print(f"router SERVING again {time.monotonic() - killed_at:.1f} s after the kill "
          f"({recover_s:.1f} s after the checks above)")
    assert client.generate(PROMPT, timeout=60, **GREEDY).token_ids == expected
    _wait_pool_full(client)
    # The other stage and the router were not restarted.
    assert survivor.poll() is None and cluster.procs["router"].proc.poll() is None


def test_rejoin_is_idempotent_and_never_goes_back(cluster: FaultCluster) -> None:
    cluster.wait_serving(timeout=RECOVER_WITHIN_S)
    stage = StageClient(f"127.0.0.1:{cluster.stage_ports[1]}")
    try:
        epoch = 0
        try:
            stage.rejoin(0)
        except grpc.RpcError as exc:  # after the tests above, the stages are past epoch 0
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            assert "cannot rejoin the older epoch 0" in exc.details()
            epoch = int(exc.details().split("epoch ")[1].split(";")[0])
        # The epoch the stage is in: a no-op that leaves it serving, and the router too.
        reply = stage.rejoin(epoch)
        assert reply.state == pb.STAGE_STATE_SERVING and reply.epoch == epoch
        assert stage.is_serving() and cluster.client.is_serving()
        assert cluster.client.generate(PROMPT, timeout=60, **GREEDY).finish_reason == "length"
    finally:
        stage.close()
