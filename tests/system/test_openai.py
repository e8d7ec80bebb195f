"""The OpenAI-compatible front against a real `stageserve up --openai-port` (the session's chat
system, tests/harness/chat.py), driven by the official `openai` SDK: completions and chat
completions, streamed and not, equal the gRPC API's greedy answers; stop strings, usage,
logprobs; the router's refusals as OpenAI errors (400, 401, 404, 429, 503); a client that
disconnects gives its KV blocks back."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import openai
import pytest

from shared.proto import generation_pb2 as gen
from stageserve.client import build_request
from tests.harness.chat import MAX_QUEUE_LEN, SERVED_MODEL, TOKEN, ChatSystem
from tests.harness.processes import REPO, free_port, stop_process

pytestmark = pytest.mark.timeout(300)

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello, how are you?"}]
NEW_TOKENS = 12
GREEDY = dict(temperature=0, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True})


@pytest.fixture
def sdk(chat_system: ChatSystem) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test as it came.
    client = openai.OpenAI(base_url=f"{chat_system.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    yield client
    client.close()


def _grpc(chat_system: ChatSystem, prompt, **sampling):
    return chat_system.system.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, timeout=60, **sampling)


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _pool_full(chat_system: ChatSystem) -> bool:
    info = chat_system.system.client.model_info()
    return info.free_kv_blocks == info.num_kv_blocks


def _get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_models_health_and_metrics(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == [SERVED_MODEL]
    status, body = _get(f"{chat_system.url}/health", token=None)
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    sdk.completions.create(model=SERVED_MODEL, prompt=PROMPT, **GREEDY)
    status, body = _get(f"{chat_system.url}/metrics", token=None)
    assert status == 200
    assert 'stageserve_openai_requests_total{endpoint="/v1/completions",status="200"}' in body


def test_completions_equal_the_grpc_answer(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    expected = _grpc(chat_system, PROMPT, temperature=0)
    got = sdk.completions.create(model=SERVED_MODEL, prompt=PROMPT, **GREEDY)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (expected.prompt_tokens, NEW_TOKENS)
    assert got.usage.total_tokens == expected.prompt_tokens + NEW_TOKENS

    # Token ids in, and streamed: the same text; usage in a last chunk without choices.
    ids = chat_system.system.client.tokenize(PROMPT)
    chunks = list(sdk.completions.create(model=SERVED_MODEL, prompt=ids, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_completions_equal_the_grpc_answer(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    expected = _grpc(chat_system, MESSAGES, temperature=0)
    got = sdk.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, **GREEDY)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == expected.prompt_tokens and got.usage.completion_tokens == NEW_TOKENS

    stream = sdk.chat.completions.create(
        model=SERVED_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        temperature=0, max_completion_tokens=NEW_TOKENS, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == expected.prompt_tokens + NEW_TOKENS


def test_stop_strings_and_seeded_sampling(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    full = _grpc(chat_system, PROMPT, temperature=0).text
    clean = [i for i in range(1, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    if clean:
        stop = full[clean[len(clean) // 2] :][:3]
        got = sdk.completions.create(model=SERVED_MODEL, prompt=PROMPT, stop=[stop], **GREEDY)
        assert got.choices[0].text == full[: full.index(stop)]
        assert got.choices[0].finish_reason == "stop"
    # Sampling parameters reach the sampler: the same seed twice gives the same answer.
    params = dict(model=SERVED_MODEL, messages=MESSAGES, temperature=0.9, top_p=0.95, seed=7, max_tokens=8,
                  presence_penalty=0.5, frequency_penalty=0.5,
                  extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    first = sdk.chat.completions.create(**params).choices[0].message.content
    assert sdk.chat.completions.create(**params).choices[0].message.content == first
    expected = _grpc(chat_system, MESSAGES, temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.5,
                     frequency_penalty=0.5, top_k=40, min_p=0.01, repetition_penalty=1.1)
    assert expected.text.startswith(first)


def test_logprobs(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    expected = _grpc(chat_system, PROMPT, temperature=0, logprobs=2, logprob_token_text=True)
    got = sdk.completions.create(model=SERVED_MODEL, prompt=PROMPT, logprobs=2, **GREEDY).choices[0].logprobs
    assert got.tokens == [lp.token for lp in expected.logprobs]
    assert got.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-6)
    # Keyed by token text: two alternatives that decode alike (both U+FFFD) share one key.
    assert all(1 <= len(top) <= 2 for top in got.top_logprobs)
    assert [max(top.values()) for top in got.top_logprobs] == pytest.approx(
        [lp.top[0].logprob for lp in expected.logprobs], abs=1e-6
    )
    assert got.text_offset[0] == 0

    expected = _grpc(chat_system, MESSAGES, temperature=0, logprobs=3, logprob_token_text=True)
    chat = sdk.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [lp.token for lp in expected.logprobs]
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-6)
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
    # Streamed: the same entries, spread over the chunks.
    chunks = sdk.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, logprobs=True, stream=True, **GREEDY)
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [lp.token for lp in expected.logprobs]


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda s: s.completions.create(model=SERVED_MODEL, prompt=PROMPT, temperature=500), openai.BadRequestError,
         "sampling.temperature must be a finite number in [0, 100]"),
        (lambda s: s.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "wizard", "content": "hi"}]),
         openai.BadRequestError, "allowed roles"),
        (lambda s: s.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, n=2), openai.BadRequestError,
         "n = 2 is not supported"),
        (lambda s: s.completions.create(model=SERVED_MODEL, prompt=PROMPT, extra_body={"best_guess": 1}),
         openai.BadRequestError, "best_guess: Extra inputs are not permitted"),
        (lambda s: s.completions.create(model="gpt-4", prompt=PROMPT), openai.NotFoundError,
         "this server serves 'tiny-chat'"),
        (lambda s: s.with_options(api_key="wrong").chat.completions.create(model=SERVED_MODEL, messages=MESSAGES),
         openai.AuthenticationError, "the bearer token is not valid"),
    ],
    ids=["router-invalid-argument", "bad-role", "n", "unknown-field", "unknown-model", "bad-token"],
)
def test_errors_in_openai_shape(sdk: openai.OpenAI, call, error: type[openai.APIStatusError], says: str) -> None:
    with pytest.raises(error) as err:
        call(sdk)
    assert says in err.value.body["message"]
    assert err.value.body["type"] and "code" in err.value.body


def test_full_queue_is_429(chat_system: ChatSystem, sdk: openai.OpenAI) -> None:
    stub, metadata = chat_system.system.client.stub, (("authorization", f"Bearer {TOKEN}"),)
    holders = [
        stub.Generate(build_request([0, 5 + i, 6], max_new_tokens=400, ignore_eos=True), metadata=metadata, timeout=60)
        for i in range(MAX_QUEUE_LEN)
    ]
    try:
        for call in holders:
            next(iter(call))  # Each is admitted (and running) before the next request.
        with pytest.raises(openai.RateLimitError) as err:
            sdk.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=2)
        assert "queue" in err.value.body["message"]
    finally:
        for call in holders:
            call.cancel()
    assert _wait_for(lambda: _pool_full(chat_system))


def _open_request(chat_system: ChatSystem, stream: bool) -> tuple[http.client.HTTPConnection, bytes]:
    # No max_tokens: as many as the context leaves (~480), seconds of work to interrupt.
    body = json.dumps({"model": SERVED_MODEL, "messages": MESSAGES, "temperature": 0,
                       "ignore_eos": True, "stream": stream})
    host, port = chat_system.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    return conn, body.encode()


def _disconnects(chat_system: ChatSystem) -> float:
    _, text = _get(f"{chat_system.url}/metrics", token=None)
    line = next(l for l in text.splitlines() if l.startswith("stageserve_openai_client_disconnects_total"))
    return float(line.split()[-1])


def _hang_up(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_client_disconnect_cancels_and_returns_the_blocks(chat_system: ChatSystem, stream: bool) -> None:
    assert _wait_for(lambda: _pool_full(chat_system))
    before = _disconnects(chat_system)
    conn, _ = _open_request(chat_system, stream)
    if stream:
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read(6) == b"data: "
    # The answer is being generated: its blocks are in use.
    assert _wait_for(lambda: not _pool_full(chat_system))
    _hang_up(conn)
    assert _wait_for(lambda: _pool_full(chat_system)), "the blocks of a disconnected client did not come back"
    # ...because the front cancelled the call, not because the answer ended.
    assert _wait_for(lambda: _disconnects(chat_system) == before + 1)


def test_front_without_a_router_is_503(tmp_path) -> None:
    """`stageserve openai` on its own, its router unreachable: /health and requests say 503."""
    port = free_port()
    log = open(tmp_path / "front.log", "wb")
    front = subprocess.Popen(
        [sys.executable, "-m", "stageserve.cli", "openai", "--router", f"127.0.0.1:{free_port()}", "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", "m", "--router-retries", "0"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def health() -> int | None:
            try:
                return _get(f"{url}/health", token=None)[0]
            except OSError:
                return None

        assert _wait_for(lambda: health() is not None, timeout=30), (tmp_path / "front.log").read_text()
        assert health() == 503
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="m", prompt=PROMPT)
        assert err.value.status_code == 503 and err.value.body["type"] == "service_unavailable_error"
    finally:
        # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done.
        assert stop_process(front, 15) in (0, -signal.SIGTERM)
        log.close()
