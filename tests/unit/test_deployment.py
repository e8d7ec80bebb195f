"""The deployment files: docker-compose.yml (through `docker-compose config` when a compose
binary is installed, and structurally with PyYAML always), the Kubernetes manifests, and
the Dockerfile. Every command they run is parsed by the real `stageserve` argument parser,
so a renamed flag breaks this test rather than a deployment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stageserve.cli import build_parser
from stageserve.client import LIVENESS_SERVICE
from tests.harness.processes import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
STAGES = ("stage0", "stage1")
_DEFAULT = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def with_defaults(value: object, env: dict[str, str] | None = None) -> object:
    """Compose's `${VAR:-default}` interpolation, enough for this file (no compose needed)."""
    env = env or {}
    if isinstance(value, str):
        return _DEFAULT.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [with_defaults(v, env) for v in value]
    if isinstance(value, dict):
        return {k: with_defaults(v, env) for k, v in value.items()}
    return value


def flag(command: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def parses(command: list[str]) -> None:
    assert command[0] == "stageserve", command
    try:
        build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`stageserve` rejects this command (argparse's message is above): {command}")


def check_compose(config: dict) -> None:
    """What docs/deployment.md promises about the compose layout, on a resolved config."""
    services = config["services"]
    assert set(STAGES) | {"router"} <= set(services)
    router = services["router"]
    parses(router["command"])
    # Only the router's API and the OpenAI front are published; the stages' control ports stay
    # on the internal network.
    assert router.get("ports")
    for name, service in services.items():
        if name not in ("router", "openai"):
            assert not service.get("ports"), f"{name} publishes ports"
    # The front is a client of the router's public API: on the public network only.
    front = services["openai"]
    parses(front["command"])
    assert flag(front["command"], "--router") == f"router:{flag(router['command'], '--port')}"
    assert front["networks"] == ["public"] and front["ports"]
    assert f"127.0.0.1:{flag(front['command'], '--port')}/health" in " ".join(front["healthcheck"]["test"])
    networks = config["networks"]
    assert networks["pipeline"]["internal"] is True
    assert set(router["networks"]) == {"pipeline", "public"}
    # The router waits for no stage: stages become healthy only after the router's InitCache.
    assert not set(router.get("depends_on", {})) & set(STAGES)
    assert "stageserve" in router["healthcheck"]["test"] and "health" in router["healthcheck"]["test"]
    stage_addresses = flag(router["command"], "--stages").split(",")
    assert stage_addresses == [f"{s}:{flag(services[s]['command'], '--port')}" for s in STAGES]
    rendezvous = f"router:{flag(router['command'], '--rendezvous-port')}"
    seen_gpus: set[str] = set()
    for index, name in enumerate(STAGES):
        stage = services[name]
        command = stage["command"]
        parses(command)
        assert flag(command, "--stage-index") == str(index)
        assert flag(command, "--num-stages") == str(len(STAGES))
        assert flag(command, "--rendezvous") == rendezvous
        assert set(stage["networks"]) == {"pipeline"}
        assert stage["ipc"] == "host"
        assert stage["restart"] in ("unless-stopped", "always", "on-failure")
        assert stage["depends_on"]["router"]["condition"] == "service_started"
        devices = stage["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        ids = [str(d) for d in devices[0]["device_ids"]]
        assert len(ids) == int(flag(command, "--tp")), "each stage reserves exactly its TP GPUs"
        assert not seen_gpus & set(ids), "two stages reserve the same GPU"
        seen_gpus |= set(ids)
        test = stage["healthcheck"]["test"]
        assert test[0] == "CMD" and test[-1].endswith(":" + flag(command, "--port"))
        parses(test[1:])
        assert any(v.endswith(":/model:ro") for v in stage["volumes"])
    for name in ("router", *STAGES):
        check = services[name]["healthcheck"]
        assert check["start_period"] and check["interval"] and check["retries"]
        assert services[name]["restart"] == "unless-stopped"
    smoke = services["smoke"]
    assert smoke["depends_on"]["router"]["condition"] == "service_healthy"
    parses(smoke["command"])


def test_compose_file_structure() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    config = with_defaults(raw)
    check_compose(config)
    # Defaults for model, layout and ports come from environment variables.
    text = COMPOSE_FILE.read_text()
    for var in ("STAGESERVE_MODEL_DIR", "STAGESERVE_TP", "STAGESERVE_LAYER_PARTITION", "STAGESERVE_PORT",
                "STAGESERVE_METRICS_PORT", "STAGESERVE_START_PERIOD", "STAGESERVE_IMAGE"):
        assert "${" + var + ":-" in text, var
    overridden = with_defaults(raw, {"STAGESERVE_TP": "1", "STAGESERVE_PORT": "6000"})
    assert flag(overridden["services"]["stage0"]["command"], "--tp") == "1"
    assert overridden["services"]["router"]["ports"][0].startswith("6000:")


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_config_validates_with_a_compose_binary(tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("no compose binary (apt-get install docker-compose); the structure test still runs")
    env = {**os.environ, "STAGESERVE_MODEL_DIR": str(tmp_path), "STAGESERVE_TP": "2"}
    out = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "--profile", "smoke", "config"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    # Compose resolved every variable and merge key; the same promises hold on its output.
    check_compose(resolved)
    volume = resolved["services"]["stage0"]["volumes"][0]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    assert source == str(tmp_path)


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_use_native_grpc_probes_and_agree_with_each_other() -> None:
    docs = _k8s_docs()
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        if doc["kind"] != "Kustomization":
            by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # servicemonitor.yaml needs the Prometheus Operator's CRDs, so it is applied on its own.
    optional = {"kustomization.yaml", "servicemonitor.yaml"}
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name not in optional)
    config = by_kind["ConfigMap"]["stageserve-config"]["data"]
    services = by_kind["Service"]
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"stageserve-router", "stageserve-openai", *(f"stageserve-{s}" for s in STAGES)}
    front = deployments.pop("stageserve-openai")["spec"]["template"]["spec"]["containers"][0]
    parses(front["args"])
    front_port = int(flag(front["args"], "--port"))
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {p["containerPort"] for p in front["ports"]} == {front_port}
    router_host = flag(front["args"], "--router").split(":")[0]
    assert router_host in services and "stageserve-openai" in services
    for name, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        # $(VAR) references resolve from the ConfigMap, as Kubernetes expands them.
        args = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in container["args"]]
        parses(args)
        ports = {p["containerPort"] for p in container["ports"]}
        port = int(flag(args, "--port"))
        assert port in ports and int(flag(args, "--metrics-port")) in ports
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc_probe = container[probe]["grpc"]
            assert grpc_probe["port"] == port, (name, probe)
        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert container["readinessProbe"]["grpc"].get("service", "") == ""
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["template"]["metadata"]["labels"] == selector
    router_args = deployments["stageserve-router"]["spec"]["template"]["spec"]["containers"][0]["args"]
    stage_addresses = flag(router_args, "--stages").split(",")
    for index, stage in enumerate(STAGES):
        host, port = stage_addresses[index].split(":")
        service = services[host]
        # The router must reach a stage before the stage is ready.
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        pod = deployments[f"stageserve-{stage}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert service["spec"]["selector"] == deployments[f"stageserve-{stage}"]["spec"]["selector"]["matchLabels"]
        assert flag(container["args"], "--stage-index") == str(index)
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(config["TP"])
        rendezvous_host, rendezvous_port = flag(container["args"], "--rendezvous").split(":")
        assert services[rendezvous_host]["spec"]["publishNotReadyAddresses"] is True
        assert rendezvous_port == flag(router_args, "--rendezvous-port")
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    assert int(config["NUM_STAGES"]) == len(STAGES)
    _check_network_policies(by_kind["NetworkPolicy"], deployments, int(flag(router_args, "--rendezvous-port")))
    monitor = by_kind["ServiceMonitor"]["stageserve"]
    assert all(_selects(monitor["spec"]["selector"], s["metadata"]["labels"]) for s in services.values())
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions In/NotIn) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        inside = labels.get(e["key"]) in e["values"]
        if (e["operator"] == "In") != inside:
            return False
    return True


def _check_network_policies(policies: dict, deployments: dict, rendezvous_port: int) -> None:
    """Only the router reaches a stage's control port, only the stages the rendezvous port."""
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}

    def allowed(source: str, target: str, port: int) -> bool:
        for policy in policies.values():
            if not _selects(policy["spec"]["podSelector"], pods[target]):
                continue
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule.get("ports", [])}
                peers = rule.get("from")
                if (not ports or port in ports) and (
                    peers is None or any("podSelector" in p and _selects(p["podSelector"], pods[source]) for p in peers)
                ):
                    return True
        return False

    stages = [name for name in pods if name != "stageserve-router"]
    for stage in stages:
        assert allowed("stageserve-router", stage, 50061)
        assert allowed(stages[0], stage, 12345)  # NCCL between stages, any port
        assert allowed(stage, "stageserve-router", rendezvous_port)
        assert allowed(stage, "stageserve-router", 50051)
    # Any other pod (no stageserve labels): the router's API only.
    pods["client"] = {"app": "client"}
    assert allowed("client", "stageserve-router", 50051)
    assert not allowed("client", "stageserve-router", rendezvous_port)
    assert not any(allowed("client", stage, 50061) for stage in stages)


def test_dockerfile_installs_the_package_on_a_cuda_pytorch_base() -> None:
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and "cuda" in base.group(1) and "pytorch" in base.group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    copied = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    for source in copied:
        assert (REPO / source).exists(), source
    assert {"shared", "stageserve", "router", "stage_worker", "pyproject.toml"} <= {s.rstrip("/") for s in copied}
    assert "pip install" in text and "torch.version.cuda" in text
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & {s.rstrip("/") for s in copied}, "the .dockerignore drops a copied path"


def test_up_restarts_an_exited_stage_until_it_fails_too_often(monkeypatch: pytest.MonkeyPatch) -> None:
    import stageserve.launcher as launcher_module
    from stageserve.launcher import Launcher, StageRestartPolicy, UpConfig

    class FakeProc:
        pid = -1  # never a real process group: killpg is replaced below anyway

        def __init__(self) -> None:
            self.code: int | None = None

        def poll(self) -> int | None:
            return self.code

    started: list[list[str]] = []
    killed: list[int] = []
    monkeypatch.setattr(Launcher, "_popen", staticmethod(lambda args, env: started.append(args) or FakeProc()))
    monkeypatch.setattr(launcher_module.os, "killpg", lambda pgid, sig: killed.append(pgid))
    window = 0.3
    launcher = Launcher(UpConfig(
        model_path="m", num_stages=2, tp_size=1, device="cpu", dtype="float32", host="127.0.0.1", port=1,
        layer_partition=None, router_args=(), startup_timeout_s=1.0, stage_token=False,
        stage_restart=StageRestartPolicy(max_failures=3, window_s=window),
    ))
    for name in ("router", "stage0", "stage1"):
        launcher._spawn(name, [name])
    procs = dict(launcher.procs)
    assert launcher.restart_exited_stages() is None and len(started) == 3

    def exit_stage(name: str, code: int) -> str | None:
        dict(launcher.procs)[name].code = code
        return launcher.restart_exited_stages()

    # Exits spaced wider than the window are each restarted, with the same command.
    for _ in range(3):
        assert exit_stage("stage1", -9) is None
        assert started[-1] == ["stage1"] and dict(launcher.procs)["stage1"].poll() is None
        time.sleep(window + 0.05)
    assert len(killed) == 3  # the old process group (orphaned ranks) each time
    # Three exits within the window: `up` stops with the stage's error.
    assert exit_stage("stage0", 1) is None
    assert exit_stage("stage0", 1) is None
    assert exit_stage("stage0", 1) == f"stage0 exited with code 1, 3 times within {window:g} s; not restarting it"
    # The router is never restarted.
    dict(launcher.procs)["stage0"].code = None
    assert exit_stage("router", 0) == "router exited with code 0"
    assert dict(launcher.procs)["stage1"] is not procs["stage1"]
    with pytest.raises(ValueError, match="max_failures must be >= 1"):
        StageRestartPolicy(max_failures=0)
    args = build_parser().parse_args(["up", "--max-stage-failures", "1", "--stage-failure-window", "60"])
    assert (args.max_stage_failures, args.stage_failure_window) == (1, 60.0)


def test_up_passes_its_router_knobs_through_to_the_router() -> None:
    from stageserve.cli import _router_flag_values

    up = build_parser().parse_args(
        ["up", "--stream-interval", "4", "--no-async-scheduling", "--no-even-micro-batches", "--max-num-seqs", "7",
         "--steps-in-flight-per-seq", "2"]
    )
    router = build_parser().parse_args(["router", "--model", "m", "--stages", "a:1", *_router_flag_values(up)])
    assert (router.stream_interval, router.no_async_scheduling, router.no_even_micro_batches, router.max_num_seqs) == (
        4, True, True, 7,
    )
    assert router.steps_in_flight_per_seq == 2
    assert router.recovery_timeout == 60.0
    up = build_parser().parse_args(["up", "--recovery-timeout", "0"])
    router = build_parser().parse_args(["router", "--model", "m", "--stages", "a:1", *_router_flag_values(up)])
    assert router.recovery_timeout == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--model", "m", "--stages", "a:1", "--recovery-timeout", "-1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--stream-interval", "0"])


def test_help_shows_defaults_and_groups_up_flags() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["up"].format_help()  # noqa: SLF001
    for group in ("serving:", "scheduler:", "memory:", "security:", "--prompt:"):
        assert f"\n{group}" in text, group
    assert "(default: 50051)" in text and "(default: 2048)" in text and "(default: 0.9)" in text
    generate = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # noqa: SLF001
    assert "(default: 127.0.0.1:50051)" in generate
