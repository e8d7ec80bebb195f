"""Security, end to end on CPU with real processes: TLS on the public API, bearer tokens,
the stage token `stageserve up` gives its children, and mTLS between router and stages.
Certificates come from the `openssl` command (a throwaway CA per test module)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_options import channel_options
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from stageserve.client import GenerationClient, RetryPolicy
from stageserve.demo_model import write_tiny_model
from shared.security import (
    ClientTls, SecurityConfigError, TokenCheck, bearer_metadata, open_channel, read_tokens,
)
from tests.harness.processes import REPO, Process, free_port

pytestmark = pytest.mark.timeout(240)

NO_RETRY = RetryPolicy(max_attempts=1)
API_TOKEN = "api-token-0123456789"
SMALL = ["--kv-cache-bytes", str(8 << 20), "--max-num-batched-tokens", "256"]


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the `openssl` command is needed to make the test certificates")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "other-ca.pem")


def _wait_serving(client: GenerationClient, procs: list[Process], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.is_serving():
        dead = [p.log(4000) for p in procs if p.proc.poll() is not None]
        assert not dead, dead
        assert time.monotonic() < deadline, "not SERVING in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sec-model") / "model", "LlamaForCausalLM", seed=3)


@dataclass
class Secured:
    address: str
    certs: Certs
    token_file: Path


@pytest.fixture(scope="module")
def secured(certs: Certs, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """`stageserve up` with TLS and a bearer token; the stage token is up's default."""
    d = tmp_path_factory.mktemp("secured")
    token_file = d / "tokens"
    token_file.write_text(f"old-token-to-rotate\n{API_TOKEN}\n")
    port = free_port()
    up = Process("up", [
        "up", "--model", str(model), "--pp", "1", "--device", "cpu", "--port", str(port), *SMALL,
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca),
        "--auth-token-file", str(token_file),
        # The stage test below finds a stage as an operator would: through GetModelInfo.
        "--expose-stage-addresses",
    ], d)
    address = f"127.0.0.1:{port}"
    try:
        with GenerationClient(address, NO_RETRY, tls=ClientTls(str(certs.ca))) as client:
            _wait_serving(client, [up])
        yield Secured(address, certs, token_file)
    finally:
        up.stop()


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def test_tls_client_with_token_generates_and_any_listed_token_works(secured: Secured) -> None:
    tls = ClientTls(str(secured.certs.ca))
    for token in (API_TOKEN, "old-token-to-rotate"):
        with GenerationClient(secured.address, NO_RETRY, tls=tls, token=token) as client:
            result = client.generate("hello", max_new_tokens=5, ignore_eos=True, timeout=60)
            assert len(result.token_ids) == 5 and result.finish_reason == "length"
            assert client.tokenize("hello")


def test_plaintext_and_wrong_ca_clients_cannot_connect(secured: Secured) -> None:
    for tls in (None, ClientTls(str(secured.certs.other_ca))):
        with GenerationClient(secured.address, NO_RETRY, tls=tls, token=API_TOKEN) as client:
            code, _ = _code(lambda: client.model_info(timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert not client.is_serving()


def test_missing_or_wrong_token_is_unauthenticated_but_health_is_open(secured: Secured) -> None:
    tls = ClientTls(str(secured.certs.ca))
    with GenerationClient(secured.address, NO_RETRY, tls=tls) as client:
        for call in (lambda: client.generate("hi", max_new_tokens=2, timeout=10),
                     lambda: client.model_info(), lambda: client.tokenize("hi")):
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing credentials" in details and "Bearer" in details
        # Orchestrators probe readiness without the secret.
        assert client.is_serving()
    for token in ("wrong", API_TOKEN + "x", API_TOKEN[:-1]):
        with GenerationClient(secured.address, NO_RETRY, tls=tls, token=token) as client:
            code, details = _code(lambda: client.generate("hi", max_new_tokens=2, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in details
    with open_channel(secured.address, channel_options(), tls) as channel:
        code, details = _code(lambda: gen_grpc.GenerationStub(channel).GetModelInfo(
            gen.GetModelInfoRequest(), timeout=5, metadata=(("authorization", f"Basic {API_TOKEN}"),)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in details


def test_cli_generate_and_health_speak_tls(secured: Secured) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGESERVE_")}
    base = [sys.executable, "-m", "stageserve.cli"]
    ca = ["--addr", secured.address, "--tls-ca", str(secured.certs.ca)]
    out = subprocess.run([*base, "generate", "hi", *ca, "--auth-token-file", str(secured.token_file),
                          "--max-new-tokens", "3", "--ignore-eos", "--timeout", "60"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "[finish: length]" in out.stderr, out.stderr
    out = subprocess.run([*base, "generate", "hi", *ca, "--retries", "0", "--timeout", "20"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    out = subprocess.run([*base, "health", *ca], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SERVING" in out.stdout


def test_stage_rejects_callers_without_the_stage_token(secured: Secured) -> None:
    with GenerationClient(secured.address, NO_RETRY, tls=ClientTls(str(secured.certs.ca)), token=API_TOKEN) as c:
        stage_address = c.model_info().stages[0].address
    with grpc.insecure_channel(stage_address, options=channel_options()) as channel:
        stub = pb_grpc.StageWorkerStub(channel)
        for metadata in (None, bearer_metadata("guess"), bearer_metadata(API_TOKEN)):
            code, details = _code(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=5, metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "stage" in details
        # A second router could otherwise take the Execute stream or resize the cache.
        code, _ = _code(lambda: list(stub.Execute(iter(()), timeout=5)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_between_router_and_stage(certs: Certs, model: Path, tmp_path: Path) -> None:
    """The stage accepts only certificates its CA signed; the router presents one and serves."""
    port, stage_port, rendezvous = free_port(), free_port(), free_port()
    stage_address = f"127.0.0.1:{stage_port}"
    stage = Process("stage", [
        "stage", "--model", str(model), "--stage-index", "0", "--num-stages", "1", "--host", "127.0.0.1",
        "--port", str(stage_port), "--rendezvous", f"127.0.0.1:{rendezvous}", "--device", "cpu",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca),
    ], tmp_path)
    router = Process("router", [
        "router", "--model", str(model), "--stages", stage_address, "--host", "127.0.0.1", "--port", str(port),
        "--rendezvous-port", str(rendezvous), *SMALL, "--stage-tls-ca", str(certs.ca),
        "--stage-tls-cert", str(certs.client_cert), "--stage-tls-key", str(certs.client_key),
    ], tmp_path)
    try:
        with GenerationClient(f"127.0.0.1:{port}", NO_RETRY) as client:
            _wait_serving(client, [stage, router])
            assert len(client.generate("hi", max_new_tokens=3, ignore_eos=True, timeout=60).token_ids) == 3
        no_cert = ClientTls(str(certs.ca))
        with_cert = ClientTls(str(certs.ca), str(certs.client_cert), str(certs.client_key))
        for tls, ok in ((None, False), (no_cert, False), (with_cert, True)):
            with open_channel(stage_address, channel_options(), tls) as channel:
                call = lambda: pb_grpc.StageWorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)  # noqa: E731
                if ok:
                    assert call().state == pb.STAGE_STATE_SERVING
                else:
                    assert _code(call)[0] == grpc.StatusCode.UNAVAILABLE
        probe = subprocess.run(
            [sys.executable, "-m", "stageserve.cli", "health", "--addr", stage_address, "--tls-ca", str(certs.ca),
             "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        router.terminate()
        stage.terminate()
        router.stop()
        stage.stop()


# ---- the pieces, without processes ---------------------------------------------------------


def test_token_files_and_checks(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        read_tokens(str(empty))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        read_tokens(str(tmp_path / "absent"))
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    with pytest.raises(SecurityConfigError, match="spaces"):
        read_tokens(str(spaced))
    check = TokenCheck(("a1", "b2"), ("grpc.health.v1.Health",), "hint")
    assert check.refusal((("authorization", "bearer b2"),)) is None
    assert check.refusal((("authorization", "Bearer a1"),)) is None
    assert "not valid" in (check.refusal((("authorization", "Bearer a"),)) or "")
    assert "missing" in (check.refusal(()) or "")
    assert check.is_open("/grpc.health.v1.Health/Check")
    assert not check.is_open("/grpc.health.v1.HealthX/Check")
    with pytest.raises(SecurityConfigError, match="both"):
        ClientTls(cert_file="c.pem")


def test_stage_refuses_to_start_with_an_empty_token_file(model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "stage", "--model", str(model), "--stage-index", "0",
         "--num-stages", "1", "--port", str(free_port()), "--rendezvous", "127.0.0.1:1", "--device", "cpu",
         "--stage-token-file", str(empty)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "stage token file" in out.stderr and "is empty" in out.stderr
