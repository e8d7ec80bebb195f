"""`stageserve up`: the router and one process per stage on this machine, as separate
processes exactly as compose would start them, stopped together."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from shared.config import ModelConfig, replace
from shared.partition import parse_layer_partition, resolve_layer_partition
from shared.security import ServerTls, client_tls, read_token, write_secret_file
from shared.sharded_state import read_sharded_state
from stage_worker.memory_plan import MemorySettings, PartitionChoice, default_partition
from stageserve.client import GenerationClient


@dataclass(frozen=True)
class StageRestartPolicy:
    """What `up` does when a stage process exits while serving: start it again with the
    same command (compose's `restart: unless-stopped`), so it rejoins the router's current
    epoch and the streams the router kept carry on; a stage that exits `max_failures` times
    within `window_s` is broken, not unlucky, and stops `up` with its error."""

    # Exits within the window that stop `up`; 1: never restart (the first exit stops it).
    max_failures: int = 3
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {self.max_failures}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {self.window_s}")


@dataclass(frozen=True)
class UpConfig:
    model_path: str
    num_stages: int
    tp_size: int
    device: str
    dtype: str
    host: str
    port: int
    # Every stage gets it (see choose_up_partition); None leaves the stages' own default.
    layer_partition: str | None
    router_args: tuple[str, ...]
    startup_timeout_s: float
    # Router's /metrics port; stage i gets metrics_port + 1 + i. None: no endpoints.
    metrics_port: int | None = None
    log_format: str = "text"
    sequence_parallel: bool = False
    # The public API's TLS and bearer tokens, passed to the router.
    tls: ServerTls | None = None
    # The CA `up` trusts when it checks its own router (None: tls.cert_file, for self-signed).
    tls_ca: str | None = None
    auth_token_file: str | None = None
    # A fresh random stage token for router and stages: only the router may call a stage.
    stage_token: bool = True
    # Every stage's --load-format: "auto" (the checkpoint) or "dummy" (random weights).
    load_format: str = "auto"
    # Every stage's --kernel-backend, --enforce-eager and --kv-cache-dtype.
    kernel_backend: str = "auto"
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    # The OpenAI-compatible front (`stageserve openai`) on host:openai_port; None: none.
    openai_port: int | None = None
    served_model_name: str | None = None
    stage_restart: StageRestartPolicy = StageRestartPolicy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Children get SIGTERM if `up` itself dies (even by SIGKILL): no orphaned stages.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def resolve_device(device: str, gpus_needed: int) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= gpus_needed else "cpu"


def local_gpu_memory(num_gpus: int) -> int:
    """Total memory of the smallest of the first `num_gpus` visible GPUs (what every stage
    rank gets, since `up` gives stage i GPUs [i*tp, (i+1)*tp))."""
    import torch

    # Device properties, not mem_get_info: the latter creates a CUDA context, which would
    # hold a few hundred MiB of GPU 0 for as long as `up` runs.
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(num_gpus))


def choose_up_partition(
    model_path: str, num_stages: int, tp_size: int, device: str, explicit: str | None, settings: MemorySettings,
    load_format: str = "auto",
) -> PartitionChoice:
    """The partition `up` passes to every stage, decided once here so that they agree: a
    sharded folder's own (unless the weights are dummy ones, which read no file), else
    --layer-partition, else the memory-balanced default on GPU (each rank's memory is known)
    and the even split on CPU."""
    model = ModelConfig.from_pretrained(model_path)
    given = parse_layer_partition(explicit) if explicit else None
    sharded = read_sharded_state(model_path) if load_format == "auto" else None
    if sharded is not None:
        return PartitionChoice(sharded.resolve_layout(num_stages, tp_size, given), "the sharded folder's")
    if given is not None:
        return PartitionChoice(
            resolve_layer_partition(model.num_hidden_layers, num_stages, given), "given by --layer-partition"
        )
    if device == "cuda" and settings.device_bytes is None:
        settings = replace(settings, device_bytes=local_gpu_memory(num_stages * tp_size))
    return default_partition(model, num_stages, tp_size, settings)


class LogRelay:
    """Copies the children's stderr (their logs) to ours line by line; while held, lines
    wait, so that an answer streamed to the terminal (`up --prompt`) is not cut by a log
    line (the router logs a request's end just before its last message goes out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[bytes] | None = None
        self._threads: list[threading.Thread] = []

    def follow(self, stream: IO[bytes]) -> None:
        thread = threading.Thread(target=self._copy, args=(stream,), name="log-relay", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _copy(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            with self._lock:
                if self._held is not None:
                    self._held.append(line)
                else:
                    self._write([line])

    @staticmethod
    def _write(lines: list[bytes]) -> None:
        sys.stderr.buffer.write(b"".join(lines))
        sys.stderr.buffer.flush()

    def hold(self) -> None:
        with self._lock:
            self._held = []

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            if held:
                self._write(held)

    def drain(self, timeout_s: float) -> None:
        """Waits for the children's last lines (they have exited)."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Launcher:
    def __init__(self, config: UpConfig, relay_logs: bool = False) -> None:
        self.config = config
        self.procs: list[tuple[str, subprocess.Popen]] = []
        # With --prompt, the children's logs pass through `up`, which holds them while the
        # answer streams; otherwise they write to the terminal directly.
        self.logs = LogRelay() if relay_logs else None
        # How each child was started, to start a stage again the same way.
        self._commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        # Exit times of each stage, for StageRestartPolicy.
        self._failures: dict[str, list[float]] = {}
        # Held while children are started, restarted or stopped: the supervisor thread and
        # stop() never act on the list at once.
        self._procs_lock = threading.Lock()
        self._stopping = False
        self.router_address = f"127.0.0.1:{config.port}"
        self.client_tls = (
            client_tls(config.tls_ca or config.tls.cert_file) if config.tls is not None else None
        )
        self.client_token = read_token(config.auth_token_file, "auth token") if config.auth_token_file else None
        self.stage_token_file: str | None = None

    def client(self) -> GenerationClient:
        return GenerationClient(self.router_address, tls=self.client_tls, token=self.client_token)

    def _security_args(self) -> tuple[list[str], list[str]]:
        """(router's, every stage's) security flags."""
        cfg = self.config
        router: list[str] = []
        stage: list[str] = []
        if cfg.tls is not None:
            router += ["--tls-cert", cfg.tls.cert_file, "--tls-key", cfg.tls.key_file]
        if cfg.auth_token_file:
            router += ["--auth-token-file", cfg.auth_token_file]
        if cfg.stage_token:
            # mkstemp: readable by this user only; removed again by stop().
            self.stage_token_file, _ = write_secret_file()
            router += ["--stage-token-file", self.stage_token_file]
            stage += ["--stage-token-file", self.stage_token_file]
        return router, stage

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self._commands[name] = (args, env)
        self.procs.append((name, self._popen(args, env)))

    def _popen(self, args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "stageserve.cli", *args]
        proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=_die_with_parent,
            stderr=subprocess.PIPE if self.logs is not None else None,
        )
        if self.logs is not None:
            assert proc.stderr is not None
            self.logs.follow(proc.stderr)
        return proc

    def start(self) -> None:
        cfg = self.config
        device = resolve_device(cfg.device, cfg.num_stages * cfg.tp_size)
        rendezvous_port = free_port()
        stage_ports = [free_port() for _ in range(cfg.num_stages)]
        stage_addresses = [f"127.0.0.1:{p}" for p in stage_ports]
        router_security, stage_security = self._security_args()
        self._spawn(
            "router",
            [
                "router", "--model", cfg.model_path, "--stages", ",".join(stage_addresses),
                "--host", cfg.host, "--port", str(cfg.port), "--rendezvous-port", str(rendezvous_port),
                # The stages run on this machine: the store never needs another interface.
                "--rendezvous-host", "127.0.0.1",
                *cfg.router_args, *self._ops_args(0), *router_security,
            ],
        )
        for i, port in enumerate(stage_ports):
            args = [
                "stage", "--model", cfg.model_path, "--stage-index", str(i),
                "--num-stages", str(cfg.num_stages), "--tp", str(cfg.tp_size), "--port", str(port),
                "--host", "127.0.0.1", "--rendezvous", f"127.0.0.1:{rendezvous_port}",
                "--device", device, "--dtype", cfg.dtype, "--load-format", cfg.load_format,
                *self._ops_args(1 + i), *stage_security,
            ]
            if cfg.layer_partition:
                args += ["--layer-partition", cfg.layer_partition]
            if cfg.sequence_parallel:
                args.append("--sequence-parallel")
            args += ["--kernel-backend", cfg.kernel_backend, "--kv-cache-dtype", cfg.kv_cache_dtype]
            if cfg.enforce_eager:
                args.append("--enforce-eager")
            env = None
            if device == "cuda":
                # Stage i owns GPUs [i*tp, (i+1)*tp); inside the stage they are cuda:0..tp-1.
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                gpus = visible.split(",") if visible else [str(g) for g in range(cfg.num_stages * cfg.tp_size)]
                env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * cfg.tp_size : (i + 1) * cfg.tp_size])}
            self._spawn(f"stage{i}", args, env)
        if cfg.openai_port is not None:
            self._start_front()

    def _start_front(self) -> None:
        """The OpenAI front, a gRPC client of the router like any other (compose runs it as
        its own service): it trusts what `up`'s own checks trust."""
        cfg = self.config
        args = ["openai", "--router", self.router_address, "--host", cfg.host, "--port", str(cfg.openai_port),
                "--log-format", cfg.log_format]
        if cfg.served_model_name:
            args += ["--served-model-name", cfg.served_model_name]
        if cfg.tls is not None:
            args += ["--tls-ca", cfg.tls_ca or cfg.tls.cert_file]
        self._spawn("openai", args)

    @property
    def openai_url(self) -> str | None:
        if self.config.openai_port is None:
            return None
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.openai_port}"

    def wait_until_front_serves(self) -> None:
        """The front answers /health with 200 once it runs and the router serves."""
        from stageserve.openai_front.health_probe import front_is_healthy

        deadline = time.monotonic() + 60.0
        while not front_is_healthy(self.openai_url):
            dead = self.dead_child()
            if dead:
                raise RuntimeError(dead)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI front at {self.openai_url} is not healthy after 60 s")
            time.sleep(0.2)

    def _ops_args(self, metrics_offset: int) -> list[str]:
        cfg = self.config
        args = ["--log-format", cfg.log_format]
        if cfg.metrics_port is not None:
            args += ["--metrics-port", str(cfg.metrics_port + metrics_offset)]
        return args

    def restart_exited_stages(self) -> str | None:
        """Starts again every stage process that exited (StageRestartPolicy); returns why
        `up` must stop instead (a router or front that exited, a stage past its failures)."""
        policy = self.config.stage_restart
        with self._procs_lock:
            if self._stopping:
                return None
            for index, (name, proc) in enumerate(self.procs):
                code = proc.poll()
                if code is None:
                    continue
                if not name.startswith("stage"):
                    return f"{name} exited with code {code}"
                now = time.monotonic()
                recent = [t for t in self._failures.get(name, []) if now - t < policy.window_s] + [now]
                self._failures[name] = recent
                if len(recent) >= policy.max_failures:
                    return (f"{name} exited with code {code}, {len(recent)} times within "
                            f"{policy.window_s:g} s; not restarting it")
                # A stage killed hard leaves its rank processes, which exit within half a second
                # of losing it; its process group (its own session) goes first, so no rank of the
                # old stage still holds memory while the new one loads its weights.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                print(f"stageserve: {name} exited with code {code}; starting it again "
                      f"(exit {len(recent)} of {policy.max_failures} allowed within {policy.window_s:g} s)",
                      file=sys.stderr, flush=True)
                self.procs[index] = (name, self._popen(*self._commands[name]))
        return None

    def dead_child(self) -> str | None:
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                return f"{name} exited with code {code}"
        return None

    def wait_until_serving(self, stop: threading.Event) -> bool:
        """True once the router serves; False as soon as `stop` is set (a signal during a
        long model load must not wait for the load, nor for --startup-timeout)."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        with self.client() as client:
            # A short health deadline: each check is also how long a signal may go unnoticed.
            while not client.is_serving(timeout=0.5):
                dead = self.dead_child()
                if dead:
                    raise RuntimeError(dead)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not serving after {self.config.startup_timeout_s:.0f} s")
                if stop.wait(0.3):
                    return False
        return True

    def stop(self, timeout_s: float = 15.0) -> None:
        with self._procs_lock:
            self._stopping = True
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.stage_token_file is not None:
            os.unlink(self.stage_token_file)
            self.stage_token_file = None
        if self.logs is not None:
            self.logs.release()
            self.logs.drain(timeout_s=2.0)


def run_up(config: UpConfig, prompt: str | None, prompt_args: dict) -> int:
    launcher = Launcher(config, relay_logs=prompt is not None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    launcher.start()
    # Why `up` stops on its own (set by the supervisor thread); empty on Ctrl-C / SIGTERM.
    gave_up: list[str] = []

    def supervise() -> None:
        # A thread, so a stage that exits is started again while `--prompt` streams too.
        while not stop.wait(0.5):
            dead = launcher.restart_exited_stages()
            if dead:
                gave_up.append(dead)
                stop.set()

    supervisor = threading.Thread(target=supervise, name="supervisor", daemon=True)
    try:
        if not launcher.wait_until_serving(stop):
            print("stageserve: stopped during start-up", file=sys.stderr, flush=True)
            return 0
        print(f"stageserve is serving on {launcher.router_address}", flush=True)
        if launcher.openai_url is not None:
            launcher.wait_until_front_serves()
            print(f"OpenAI-compatible API on {launcher.openai_url}/v1", flush=True)
        supervisor.start()
        if prompt is not None:
            from stageserve.client import stream_to_stdout

            assert launcher.logs is not None
            launcher.logs.hold()
            try:
                stream_to_stdout(
                    launcher.router_address, prompt, prompt_args, tls=launcher.client_tls, token=launcher.client_token
                )
            finally:
                launcher.logs.release()
        while not stop.wait(0.5):
            pass
        if gave_up:
            print(f"stageserve: {gave_up[0]}; stopping", file=sys.stderr)
            return 1
        return 0
    except RuntimeError as exc:
        print(f"stageserve: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if supervisor.is_alive():
            supervisor.join()
        launcher.stop()
