"""Operations, end to end on CPU: the router and two stages started one by one as compose
starts them (`stageserve router`, `stageserve stage`), then probed the way an orchestrator
and a client would: health (readiness vs liveness, the `stageserve health` probe command),
server reflection, the Prometheus endpoints, structured request logs, and the Python sync
and asyncio clients (streaming, deadlines, retries of UNAVAILABLE before the first token).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from stageserve.async_client import AsyncGenerationClient
from stageserve.client import LIVENESS_SERVICE, GenerationClient, RetryPolicy
from stageserve.demo_model import write_tiny_model
from tests.harness.metrics_lint import lint
from tests.harness.processes import REPO, Process, child_pids, command_of, free_port, stop_all, stop_process

pytestmark = pytest.mark.timeout(300)

GENERATION = "stageserve.v1.Generation"
NO_RETRY = RetryPolicy(max_attempts=1)
# Enough tokens that a sub-second deadline always strikes mid-stream on the tiny model.
LONG = dict(max_new_tokens=480, ignore_eos=True)


class Cluster:
    """Router and stages started separately, like compose does; stage 1 only on demand."""

    NUM_STAGES = 2

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model = model
        self.log_dir = log_dir
        self.port, self.rendezvous = free_port(), free_port()
        self.metrics_port = free_port()
        self.stage_ports = [free_port() for _ in range(self.NUM_STAGES)]
        self.stage_metrics_ports = [free_port() for _ in range(self.NUM_STAGES)]
        self.address = f"127.0.0.1:{self.port}"
        self.stage_addresses = [f"127.0.0.1:{p}" for p in self.stage_ports]
        self.procs: dict[str, Process] = {}
        self.procs["router"] = Process("router", [
            "router", "--model", str(model), "--stages", ",".join(self.stage_addresses),
            "--host", "127.0.0.1", "--port", str(self.port), "--rendezvous-port", str(self.rendezvous),
            "--metrics-port", str(self.metrics_port), "--log-format", "json",
            "--kv-cache-bytes", str(8 << 20), "--max-num-batched-tokens", "256",
        ], log_dir)
        self.client = GenerationClient(self.address, NO_RETRY)

    def start_stage(self, index: int) -> None:
        name = f"stage{index}"
        if name in self.procs:
            return
        self.procs[name] = Process(name, [
            "stage", "--model", str(self.model), "--stage-index", str(index),
            "--num-stages", str(self.NUM_STAGES), "--tp", "1", "--host", "127.0.0.1",
            "--port", str(self.stage_ports[index]), "--rendezvous", f"127.0.0.1:{self.rendezvous}",
            "--device", "cpu", "--metrics-port", str(self.stage_metrics_ports[index]),
        ], self.log_dir)

    def wait_until(self, address: str, service: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with GenerationClient(address, NO_RETRY) as client:
            while not client.is_serving(service):
                dead = [f"{n} exited {p.proc.returncode}:\n{p.log()[-3000:]}"
                        for n, p in self.procs.items() if p.proc.poll() is not None]
                assert not dead, dead
                assert time.monotonic() < deadline, f"{address} not SERVING {service!r} in {timeout} s"
                time.sleep(0.2)

    def serving(self) -> Cluster:
        for i in range(self.NUM_STAGES):
            self.start_stage(i)
        self.wait_until(self.address, "")
        return self

    def stop(self) -> None:
        self.client.close()
        stop_all(list(self.procs.values()))


def probe(address: str, *extra: str) -> int:
    """`stageserve health`, the probe compose runs; its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "health", "--addr", address, *extra],
        cwd=REPO, capture_output=True, timeout=60,
    ).returncode


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = scrape_text(port)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def metric(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples carrying `labels` (others summed over, as PromQL's sum by)."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ops")
    model = write_tiny_model(root / "model", "LlamaForCausalLM", seed=7)
    c = Cluster(model, root)
    c.start_stage(0)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def system(cluster: Cluster) -> Cluster:
    return cluster.serving()


def _wait_pool_full(client: GenerationClient, timeout: float = 20.0) -> gen.ModelInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = client.model_info()
        if info.free_kv_blocks == info.num_kv_blocks or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


# ---- health ------------------------------------------------------------------------------


def test_router_not_serving_while_a_stage_is_down_then_serving(cluster: Cluster) -> None:
    if "stage1" in cluster.procs:
        pytest.skip("needs the cluster before stage 1 starts (run this test first)")
    cluster.wait_until(cluster.address, LIVENESS_SERVICE, timeout=120)
    cluster.wait_until(cluster.stage_addresses[0], LIVENESS_SERVICE, timeout=120)
    # Liveness yes, readiness no: the router runs, but stage 1 is missing.
    assert probe(cluster.address, "--liveness") == 0
    # grpc_health_probe's exit codes: 4 is an answer other than SERVING.
    assert probe(cluster.address) == 4
    assert probe(cluster.address, "--service", GENERATION) == 4
    assert not cluster.client.is_serving()
    with pytest.raises(grpc.RpcError) as err:
        cluster.client.generate("hi", max_new_tokens=2, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not serving" in err.value.details()
    # Stage 0 is alive but not ready: the router has not allocated its cache.
    assert probe(cluster.stage_addresses[0], "--liveness") == 0
    assert probe(cluster.stage_addresses[0]) == 4
    # A stage's readiness only follows the router's InitCache, so nothing here may wait for
    # stages to be healthy before the router runs (the compose ordering).
    cluster.start_stage(1)
    cluster.wait_until(cluster.address, "", timeout=180)
    assert probe(cluster.address) == 0
    assert probe(cluster.address, "--service", GENERATION) == 0
    for address in cluster.stage_addresses:
        assert probe(address) == 0
        assert probe(address, "--liveness") == 0
    assert cluster.client.generate("hi", max_new_tokens=2, timeout=60).finish_reason == "length"


def test_health_answers_at_once_while_a_long_request_runs(system: Cluster) -> None:
    done = threading.Event()

    def long_request() -> None:
        try:
            system.client.generate("a long one", timeout=120, **LONG)
        finally:
            done.set()

    threading.Thread(target=long_request, daemon=True).start()
    checks = 0
    with grpc.insecure_channel(system.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not done.is_set() and checks < 20:
            # A 1 s deadline: health must never queue behind generation work.
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            checks += 1
            time.sleep(0.05)
    assert checks > 0
    assert done.wait(120)


# ---- reflection --------------------------------------------------------------------------


def test_reflection_lists_services_and_calls_the_api_without_protos(system: Cluster) -> None:
    with grpc.insecure_channel(system.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {GENERATION, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        # A pool built only from what the server describes, as grpcurl does.
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName(GENERATION)
        assert {m.name for m in service.methods} >= {"Generate", "GetModelInfo", "Tokenize"}
        generate = service.methods_by_name["Generate"]
        assert generate.server_streaming and not generate.client_streaming
        request_cls = message_factory.GetMessageClass(generate.input_type)
        response_cls = message_factory.GetMessageClass(generate.output_type)
        request = request_cls(prompt="reflected", sampling={"max_new_tokens": 3})
        call = channel.unary_stream(
            f"/{GENERATION}/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        messages = list(call(request, timeout=60))
    assert sum(len(m.token_ids) for m in messages) == 3
    assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH


# ---- metrics and logs --------------------------------------------------------------------


def test_metrics_move_after_a_request_and_the_log_names_it(system: Cluster) -> None:
    before = scrape(system.metrics_port)
    stages_before = [scrape(p) for p in system.stage_metrics_ports]
    result = system.client.generate("count me", max_new_tokens=6, request_id="ops-metrics-1", timeout=60)
    assert result.finish_reason == "length" and len(result.token_ids) == 6
    with pytest.raises(grpc.RpcError) as err:
        system.client.generate("bad", max_new_tokens=2, temperature=-1.0, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(system.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("stageserve_requests_total", outcome="length") == 1
    assert moved("stageserve_requests_total", outcome="invalid_argument") == 1
    assert moved("stageserve_generation_tokens_total") == 6
    assert moved("stageserve_prompt_tokens_total") == result.prompt_tokens
    assert moved("stageserve_time_to_first_token_seconds_count") == 1
    assert moved("stageserve_time_per_output_token_seconds_count") == 5
    assert moved("stageserve_e2e_request_latency_seconds_count") == 1
    assert moved("stageserve_e2e_request_latency_seconds_sum") > 0
    assert moved("stageserve_steps_total") >= 6
    for stage in ("0", "1"):
        assert moved("stageserve_router_stage_step_seconds_count", stage=stage) >= 6
        assert moved("stageserve_stage_result_latency_seconds_count", stage=stage) >= 6
        # The phases add up to the step time, as each stage measured it (the last stage also
        # fills the reply with its sampled tokens).
        phases = ("prepare", "launch", "wait") + (("reply",) if stage == "1" else ())
        for phase in phases:
            assert moved("stageserve_router_stage_step_phase_seconds_count", stage=stage, phase=phase) >= 6
        phase_sum = sum(moved("stageserve_router_stage_step_phase_seconds_sum", stage=stage, phase=p) for p in phases)
        step_sum = moved("stageserve_router_stage_step_seconds_sum", stage=stage)
        assert 0.95 * step_sum <= phase_sum <= step_sum * 1.0001
        # Labelled by what the step computed: the prompt's prefill, then one-token decodes.
        assert moved("stageserve_router_stage_step_seconds_count", stage=stage, kind="prefill") >= 1
        assert moved("stageserve_router_stage_step_seconds_count", stage=stage, kind="decode") >= 5
        assert moved("stageserve_stage_result_latency_seconds_count", stage=stage, kind="decode") >= 5
    # Per request: queue, prefill and decode time; prompt and answer lengths; tokens per step.
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert moved(f"stageserve_{name}_count") == 1, name
    assert moved("stageserve_request_generation_tokens_sum") == 6
    assert moved("stageserve_request_prompt_tokens_sum") == result.prompt_tokens
    assert moved("stageserve_step_tokens_count") == moved("stageserve_steps_total")
    assert moved("stageserve_step_tokens_sum") >= result.prompt_tokens + 5
    assert metric(after, "stageserve_router_serving") == 1
    assert metric(after, "stageserve_kv_blocks") > 0
    assert metric(after, "stageserve_prefix_cache_queries_total") > 0
    for name in ("stageserve_queue_length", "stageserve_num_requests_waiting", "stageserve_num_requests_running",
                 "stageserve_kv_cache_usage_ratio", "stageserve_prefix_cache_hit_rate"):
        assert (name, (("model_name", "model"),)) in after, name
    assert "process_resident_memory_bytes" in {name for name, _ in after}
    for index, port in enumerate(system.stage_metrics_ports):
        stage_after, label = scrape(port), str(index)
        ok = metric(stage_after, "stageserve_stage_steps_total", stage=label, status="ok")
        assert ok - metric(stages_before[index], "stageserve_stage_steps_total", stage=label, status="ok") >= 6
        assert metric(stage_after, "stageserve_stage_step_wall_seconds_count", stage=label) >= ok
        assert metric(stage_after, "stageserve_stage_state", stage=label, stageserve_stage_state="SERVING") == 1
        assert metric(stage_after, "stageserve_stage_kv_blocks", stage=label) == metric(
            after, "stageserve_kv_blocks")
    # promtool's naming rules on every endpoint; the model's name on every stageserve series;
    # the version and configuration as an info metric; nothing but 404 off /metrics.
    for port, component in ((system.metrics_port, "router"), *((p, "stage") for p in system.stage_metrics_ports)):
        text = scrape_text(port)
        assert lint(text) == [], (component, lint(text))
        samples = scrape(port)
        ours = [labels for name, labels in samples if name.startswith("stageserve_")]
        assert ours and all(("model_name", "model") in labels for labels in ours), component
        assert metric(samples, "stageserve_build_info", component=component) == 1
        assert [lbls for name, lbls in samples if name == "stageserve_build_info" and ("version", "") in lbls] == []
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert err.value.code == 404
    # One JSON line per finished request, carrying the client's request id.
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in system.procs["router"].log().splitlines() if line.startswith("{")]
        mine = [r for r in lines if r.get("request_id") == "ops-metrics-1"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(mine) == 1, lines[-5:]
    assert mine[0]["event"] == "request_finished" and mine[0]["outcome"] == "length"
    assert mine[0]["generated_tokens"] == 6 and mine[0]["component"] == "router"


# ---- clients -----------------------------------------------------------------------------


def test_sync_client_streams_and_honours_a_deadline(system: Cluster) -> None:
    messages = list(system.client.stream("stream me", max_new_tokens=5, timeout=60))
    # A message per token, or several tokens in one when they queued up for a slow reader.
    assert sum(len(m.token_ids) for m in messages) == 5 and all(m.token_ids for m in messages)
    assert [m.finish_reason for m in messages[:-1]] == [0] * (len(messages) - 1)
    assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
    cancelled_before = metric(scrape(system.metrics_port), "stageserve_requests_total", outcome="cancelled")
    received = 0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in system.client.stream("too long for the deadline", timeout=0.5, **LONG):
            received += 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    assert received < LONG["max_new_tokens"]
    # The router noticed the deadline: it cancelled the request and freed its blocks.
    info = _wait_pool_full(system.client)
    assert info.free_kv_blocks == info.num_kv_blocks
    cancelled = metric(scrape(system.metrics_port), "stageserve_requests_total", outcome="cancelled")
    assert cancelled - cancelled_before == 1


def test_sync_client_leaving_the_loop_cancels_the_request(system: Cluster) -> None:
    for i, _ in enumerate(system.client.stream("stop early", timeout=60, **LONG)):
        if i == 2:
            break
    info = _wait_pool_full(system.client)
    assert info.free_kv_blocks == info.num_kv_blocks


def test_async_client_streams_and_honours_a_deadline(system: Cluster) -> None:
    async def run() -> tuple[list[gen.GenerateResponse], grpc.StatusCode, str, list[int]]:
        async with AsyncGenerationClient(system.address, NO_RETRY) as client:
            assert await client.is_serving()
            assert await client.is_serving(LIVENESS_SERVICE)
            messages = [m async for m in client.stream("async", max_new_tokens=4, timeout=60)]
            # Several streams on one loop at once.
            results = await asyncio.gather(*(client.generate(f"p{i}", max_new_tokens=3, timeout=60)
                                             for i in range(4)))
            try:
                async for _ in client.stream("async too long", timeout=0.5, **LONG):
                    pass
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            info = await client.model_info()
            return messages, code, info.model_name, [len(r.token_ids) for r in results]

    messages, code, model_name, lengths = asyncio.run(run())
    # A message carries one token or, for a stream that reads behind the model, several.
    assert sum(len(m.token_ids) for m in messages) == 4 and messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert lengths == [3, 3, 3, 3]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert model_name == "model"
    info = _wait_pool_full(system.client)
    assert info.free_kv_blocks == info.num_kv_blocks


def test_generate_command_streams_through_the_client(system: Cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "generate", "Hello", "--addr", system.address,
         "--max-new-tokens", "4", "--timeout", "60"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # stdout is the answer alone; how it ended goes to stderr.
    assert "[finish" not in out.stdout and out.stdout.endswith("\n")
    assert out.stderr.strip().endswith("[finish: length]")


def test_generate_and_health_commands_fail_with_a_message_and_their_exit_code(system: Cluster) -> None:
    # Out of range for the request's unsigned fields: a usage error, caught before sending.
    for flag, value in (("--top-k", "-5"), ("--seed", "-1"), ("--max-new-tokens", str(2**32))):
        out = _run_cli("generate", "x", "--addr", system.address, flag, value)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"argument {flag}: must be in [0, " in out.stderr, out.stderr
    # In range for the proto, refused by the router: its message, exit 2 as well.
    out = _run_cli("generate", "x", "--addr", system.address, "--top-k", "5000", "--retries", "0")
    assert out.returncode == 2 and "INVALID_ARGUMENT: sampling.top_k must be in" in out.stderr, out.stderr
    # Unreachable (2) is not NOT_SERVING (4, above); each says which.
    out = _run_cli("health", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert out.returncode == 2 and out.stdout.strip() == "UNREACHABLE", out
    out = _run_cli("health", "--addr", system.address)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"


def test_generate_exits_130_on_ctrl_c(system: Cluster) -> None:
    gen_cli = subprocess.Popen(
        [sys.executable, "-m", "stageserve.cli", "generate", "a long answer", "--addr", system.address,
         "--max-new-tokens", "480", "--ignore-eos", "--timeout", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert gen_cli.stdout is not None
    gen_cli.stdout.read(1)  # streaming has begun
    gen_cli.send_signal(signal.SIGINT)
    _, err = gen_cli.communicate(timeout=60)
    assert gen_cli.returncode == 130 and "Traceback" not in err, err


# ---- ports, addresses and start-up -----------------------------------------------------


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stageserve.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_a_server_on_a_taken_port_exits_with_a_clear_message(system: Cluster) -> None:
    # Each port of the running cluster, taken by a second router or stage (grpc's default
    # SO_REUSEPORT used to let them share the port and split its connections).
    router = ["router", "--model", str(system.model), "--stages", ",".join(system.stage_addresses),
              "--host", "127.0.0.1"]
    stage = ["stage", "--model", str(system.model), "--stage-index", "0", "--num-stages", "2", "--tp", "1",
             "--host", "127.0.0.1", "--rendezvous", f"127.0.0.1:{free_port()}", "--device", "cpu",
             "--port"]
    free = [str(free_port()) for _ in range(4)]
    cases = {
        "router port": (router + ["--port", str(system.port), "--rendezvous-port", free[0]],
                        f"cannot listen on 127.0.0.1:{system.port}"),
        "rendezvous port": (router + ["--port", free[1], "--rendezvous-port", str(system.rendezvous)],
                            f"cannot listen for the rendezvous store on 127.0.0.1:{system.rendezvous}"),
        "router metrics port": (router + ["--port", free[2], "--rendezvous-port", free[3],
                                          "--metrics-port", str(system.metrics_port)],
                                f"cannot serve metrics on 127.0.0.1:{system.metrics_port}"),
        "stage port": (stage + [str(system.stage_ports[0])], f"cannot listen on 127.0.0.1:{system.stage_ports[0]}"),
        "stage metrics port": (stage + [str(free_port()), "--metrics-port", str(system.stage_metrics_ports[1])],
                               f"cannot serve metrics on 127.0.0.1:{system.stage_metrics_ports[1]}"),
    }
    with futures.ThreadPoolExecutor(len(cases)) as pool:
        runs = {name: pool.submit(_run_cli, *args) for name, (args, _) in cases.items()}
    for name, (_, says) in cases.items():
        out = runs[name].result()
        assert out.returncode == 1, f"{name}: exit {out.returncode}\n{out.stderr[-2000:]}"
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"stageserve: {says}") and "in use" in last, f"{name}: {last}"
    # The cluster still serves, through its own router alone.
    assert system.client.generate("still mine", max_new_tokens=2, timeout=60).finish_reason == "length"


def _listening(pid: int, port: int) -> set[str]:
    """The local addresses `pid` listens on at `port` (its /proc/net tables: tcp, tcp6)."""
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                addresses.add(host)
    return addresses


def test_the_rendezvous_store_listens_on_the_router_host_only(system: Cluster) -> None:
    # The router runs with --host 127.0.0.1: its store (no authentication) must not be
    # reachable from other hosts. 0100007F is 127.0.0.1 as /proc/net/tcp writes it.
    assert _listening(system.procs["router"].proc.pid, system.rendezvous) == {"0100007F"}


def test_model_info_does_not_reveal_the_stage_addresses(system: Cluster) -> None:
    info = system.client.model_info()
    assert len(info.stages) == 2
    for index, stage in enumerate(info.stages):
        assert stage.address == "", "the internal topology is the operator's (--expose-stage-addresses)"
        assert stage.stage_index == index and stage.kv_blocks > 0
    # The operator still finds them in the router's log.
    assert all(a in system.procs["router"].log() for a in system.stage_addresses)


def test_up_stops_at_once_on_a_signal_during_start_up(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=3)
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "stageserve.cli", "up", "--model", str(model), "--pp", "2", "--device", "cpu",
         "--port", str(free_port()), "--no-stage-token"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        # Once its children run, and long before a pipeline of two CPU stages can serve.
        deadline = time.monotonic() + 60
        while len(child_pids(up.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = child_pids(up.pid)
        assert len(children) == 3, (tmp_path / "up.log").read_text()
        start = time.monotonic()
        code = stop_process(up)
        took = time.monotonic() - start
    finally:
        stop_process(up)
        log.close()
    out = (tmp_path / "up.log").read_text()
    print(f"\n`up` exited {code} {took:.1f} s after SIGTERM during start-up")
    assert code == 0 and "stopped during start-up" in out and "is serving" not in out, out[-3000:]
    assert not [pid for pid in children if command_of(pid)], "a child outlived `up`"
    # `up` cannot poll a port it does not know.
    refused = _run_cli("up", "--port", "0", "--model", str(model), "--device", "cpu")
    assert refused.returncode == 2 and "--port 0 is not supported" in refused.stderr


def test_up_with_a_prompt_prints_the_answer_whole_and_stops_cleanly(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=5)
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        # stdout and stderr into one file, as a terminal shows them.
        up = subprocess.Popen(
            [sys.executable, "-m", "stageserve.cli", "up", "--model", str(model), "--device", "cpu", "--port",
             str(free_port()), "--prompt", "hi", "--max-new-tokens", "24", "--ignore-eos"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while "[finish:" not in log_path.read_text(errors="replace"):
                assert up.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.2)
            code = stop_process(up, 60, signal.SIGINT)
        finally:
            stop_process(up)
    lines = log_path.read_text(errors="replace").splitlines()
    serving = next(i for i, line in enumerate(lines) if line.startswith("stageserve is serving on"))
    # The answer, then how it ended: no log line in between (the children's logs wait).
    assert lines[serving + 2] == "[finish: length]", lines[serving:]
    assert code == 0
    # A rank ends with os._exit: nothing of it may look leaked (tqdm's lock was one).
    assert "leaked" not in "\n".join(lines), lines[-10:]


# ---- retries (a scripted server: the real gRPC stack, failures on demand) ----------------


class ScriptedGeneration(gen_grpc.GenerationServicer):
    """Answers UNAVAILABLE on the first `fail_first` attempts; with `fail_after_first`, every
    attempt sends one token and then fails with UNAVAILABLE."""

    def __init__(self, fail_first: int = 0, fail_after_first: bool = False) -> None:
        self.attempts = 0
        self.fail_first = fail_first
        self.fail_after_first = fail_after_first

    def Generate(self, request: gen.GenerateRequest, context: grpc.ServicerContext) -> Iterator[gen.GenerateResponse]:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not serving: the pipeline is starting")
        yield gen.GenerateResponse(token_ids=[7], text="a")
        if self.fail_after_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "unavailable: a stage failed")
        yield gen.GenerateResponse(token_ids=[8], text="b", finish_reason=gen.FINISH_REASON_LENGTH)


@pytest.fixture
def scripted() -> Iterator[Callable[[ScriptedGeneration], str]]:
    """Starts a scripted server; returns its address."""
    servers: list[grpc.Server] = []

    def start(servicer: ScriptedGeneration) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gen_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2)


def test_unavailable_before_the_first_token_is_retried(scripted: Callable[[ScriptedGeneration], str]) -> None:
    servicer = ScriptedGeneration(fail_first=2)
    with GenerationClient(scripted(servicer), FAST_RETRY) as client:
        result = client.generate("x", timeout=30)
    assert servicer.attempts == 3
    assert result.token_ids == [7, 8] and result.finish_reason == "length"

    servicer = ScriptedGeneration(fail_first=2)

    async def run_async(address: str) -> list[int]:
        async with AsyncGenerationClient(address, FAST_RETRY) as client:
            return (await client.generate("x", timeout=30)).token_ids

    assert asyncio.run(run_async(scripted(servicer))) == [7, 8]
    assert servicer.attempts == 3


def test_unavailable_after_the_first_token_is_not_retried(scripted: Callable[[ScriptedGeneration], str]) -> None:
    servicer = ScriptedGeneration(fail_after_first=True)
    received = []
    with GenerationClient(scripted(servicer), FAST_RETRY) as client:
        with pytest.raises(grpc.RpcError) as err:
            for msg in client.stream("x", timeout=30):
                received.extend(msg.token_ids)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Replaying would duplicate the token the client already has.
    assert servicer.attempts == 1 and received == [7]


def test_retries_stop_at_the_attempt_limit_and_at_the_deadline(scripted: Callable[[ScriptedGeneration], str]) -> None:
    servicer = ScriptedGeneration(fail_first=100)
    address = scripted(servicer)
    with GenerationClient(address, FAST_RETRY) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("x", timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.attempts == 5
    with GenerationClient(address, NO_RETRY) as client:
        with pytest.raises(grpc.RpcError):
            client.generate("x", timeout=30)
    assert servicer.attempts == 6
    # Long backoffs: the deadline, not the policy, ends the call.
    slow = RetryPolicy(max_attempts=5, initial_backoff_s=30.0, max_backoff_s=30.0)
    started = time.monotonic()
    with GenerationClient(address, slow) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("x", timeout=1.0)
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - started < 10


def test_retry_policy_rejects_what_grpc_cannot_do() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="backoffs"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
    assert "retryPolicy" not in NO_RETRY.service_config()
    config = json.loads(FAST_RETRY.service_config())["methodConfig"][0]
    assert config["name"] == [{"service": GENERATION}]
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


# ---- metrics naming rules -----------------------------------------------------------------


def test_the_metrics_lint_finds_what_promtool_finds() -> None:
    bad = ("# HELP x_kv_blocks_total Blocks.\n# TYPE x_kv_blocks_total gauge\nx_kv_blocks_total 3\n"
           "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n"
           "# HELP x_lat_milliseconds L.\n# TYPE x_lat_milliseconds gauge\nx_lat_milliseconds 1\n")
    assert lint(bad) == ["x_kv_blocks_total: gauge with the counter suffix _total",
                         "x_requests: counter without the _total suffix",
                         "x_lat_milliseconds: use base units (seconds, bytes)"]
