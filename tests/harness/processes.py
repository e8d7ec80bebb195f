"""Real processes for the system tests: `stageserve` commands started as a user starts them,
and the one way every test stops a process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stageserve.client import GenerationClient
from stageserve.launcher import free_port  # noqa: F401 - the tests take it from here

REPO = Path(__file__).resolve().parent.parent.parent
# `python -m` of the `stageserve` command, from the checkout under test (not an installed copy).
STAGESERVE = (sys.executable, "-m", "stageserve.cli")


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    pids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    except FileNotFoundError:
        pass  # gone meanwhile
    return pids


def command_of(pid: int) -> list[str]:
    """argv of `pid` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except FileNotFoundError:
        return []


def rank_pids(stage_pid: int) -> list[int]:
    """A stage's TP rank processes: its children running multiprocessing's spawn entry."""
    return sorted(pid for pid in child_pids(stage_pid) if any("spawn_main" in a for a in command_of(pid)))


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def stop_process(
    proc: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM, kill_group: bool = False
) -> int:
    """Asks `proc` to stop with `sig` (SIGTERM, as an orchestrator does; SIGINT, as Ctrl-C
    does), kills it if it has not exited within `timeout`, and returns its exit code.
    `kill_group`: then kills its whole process group too (a process started in its own
    session): rank processes orphaned by a killed stage would otherwise outlive the test."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    if kill_group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.wait()


class Process:
    """One `stageserve` command (argv after `stageserve`), its output in a log file.

    `new_session`: in its own process group, so `stop(kill_group=True)` reaches the ranks it
    spawned; `prefix`: a command it runs under (`ip netns exec NS`, which execs it, so the pid
    stays the command's)."""

    def __init__(
        self, name: str, args: Sequence[str], log_dir: Path, *, prefix: Sequence[str] = (),
        env: dict[str, str] | None = None, new_session: bool = True,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, *STAGESERVE, *args], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )

    def log(self, tail: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def terminate(self) -> None:
        """SIGTERM without waiting: several processes stop at once (each waits for its
        peers' streams to close, so one by one is slow)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0, kill_group: bool = False) -> int:
        code = stop_process(self.proc, timeout, kill_group=kill_group)
        self._log.close()
        return code


def stop_all(procs: Sequence[Process], kill_group: bool = False) -> None:
    """Every process asked at once, then each waited for."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop(kill_group=kill_group)


class ServingSystem:
    """`stageserve up` in a subprocess; stopped with SIGTERM like Ctrl-C would."""

    def __init__(
        self, model: Path, pp: int, tp: int, *extra: str, device: str = "cpu", startup_timeout: float = 240.0,
        token: str | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stageserve-up-{self.port}.log"
        self._log = open(self.log_path, "wb")
        cmd = [
            *STAGESERVE, "up", "--model", str(model), "--pp", str(pp), "--tp", str(tp),
            "--device", device, "--port", str(self.port),
            # Tests call stages' GetInfo directly, as an operator would (so they need the
            # stages' addresses in GetModelInfo); the stage token `up` gives its children by
            # default is covered by tests/system/test_security.py.
            "--no-stage-token", "--expose-stage-addresses", *extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        # `token`: for a system started with --auth-token-file (health needs none).
        self.client = GenerationClient(self.address, token=token)
        deadline = time.monotonic() + startup_timeout
        while not self.client.is_serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stageserve up did not start; log:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def child_pid(self, command: str) -> int:
        """The pid of `up`'s child running `stageserve <command>` ("router", "stage")."""
        return next(pid for pid in child_pids(self.proc.pid) if command_of(pid)[3:4] == [command])

    def stop(self) -> int:
        self.client.close()
        code = stop_process(self.proc)
        self._log.close()
        return code
