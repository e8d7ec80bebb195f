"""Malformed and hostile requests against the real system (`stageserve up`, 2 stages), while
good requests run: each bad one gets the right gRPC status and a message that says what
was wrong; the good ones produce exactly what they produce alone; no KV block leaks.

Also clients that misbehave on the stream itself: one that never reads, one that vanishes
mid-stream, one whose deadline passes, one that cancels. Their sequences stop at the next
step and their blocks come back.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from shared.grpc_options import MAX_MESSAGE_BYTES
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from stageserve.client import build_request
from stageserve.demo_model import write_tiny_model
from tests.harness import huge_requests
from tests.harness.processes import ServingSystem, rss_bytes

pytestmark = pytest.mark.timeout(300)

VOCAB = 768
MAX_CONTEXT = 512
GOOD_PROMPTS = [[0, 17, 230, 41], [0, 99, 5, 301, 12, 8, 77], [0, 3], [0, 640, 2, 2, 9, 11, 13, 500, 400, 300]]
GOOD_TOKENS = 16
GENERATE = "/stageserve.v1.Generation/Generate"
OK = grpc.StatusCode.OK
BAD = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Case:
    name: str
    # bytes are sent as they are, bypassing the client's serializer.
    request: gen.GenerateRequest | bytes
    code: grpc.StatusCode
    # Part of the status message (for OK: nothing is checked but a normal finish).
    says: str = ""


def _req(prompt: str | list[int] = (0, 5, 6), **sampling: object) -> gen.GenerateRequest:
    sampling.setdefault("max_new_tokens", 4)
    return build_request(list(prompt) if not isinstance(prompt, str) else prompt, **sampling)


def _with_id(request_id: str) -> gen.GenerateRequest:
    r = _req()
    r.request_id = request_id
    return r


def _empty_token_ids() -> gen.GenerateRequest:
    r = gen.GenerateRequest(sampling=gen.SamplingParams(max_new_tokens=4))
    r.prompt_token_ids.SetInParent()
    return r


_string_field = huge_requests.string_field
_varint = huge_requests.varint


GOOD_BYTES = _req(max_new_tokens=6, ignore_eos=True).SerializeToString()

CASES = [
    # -- input
    Case("no input at all", gen.GenerateRequest(), BAD, "has no input"),
    Case("empty prompt", _req(""), BAD, "prompt is empty"),
    Case("empty prompt_token_ids", _empty_token_ids(), BAD, "prompt_token_ids is empty"),
    Case("token id = vocab size", _req([0, VOCAB]), BAD, f"[0, {VOCAB - 1}]"),
    Case("token id 2^32-1", _req([0, 2**32 - 1, 4]), BAD, "outside the vocabulary"),
    Case("2M-character prompt", _req("a" * 2_000_000), BAD, "at most 1000000"),
    Case("999,999-character prompt (tokenized, then too long)", _req("lorem ipsum " * 83_333 + "abc"), BAD,
         "context limit"),
    Case("10k prompt token ids", _req([0] + [5] * 9_999), BAD, f"context limit is {MAX_CONTEXT}"),
    Case("prompt fills the whole context", _req([0] * MAX_CONTEXT), BAD, "at most 511 tokens"),
    Case("max_new_tokens 2^32-1", _req(max_new_tokens=2**32 - 1), BAD, "max_new_tokens must be in [1, 509]"),
    Case("request_id of 10k characters", _with_id("r" * 10_000), BAD, "request_id must be at most 128"),
    Case("request_id with control characters", _with_id("a\nb\x00"), BAD, "printable"),
    # -- sampling values
    Case("temperature NaN", _req(temperature=math.nan), BAD, "sampling.temperature must be a finite number"),
    Case("temperature -1", _req(temperature=-1.0), BAD, "in [0, 100]"),
    Case("temperature 1e30", _req(temperature=1e30), BAD, "got 1e+30"),
    Case("temperature inf", _req(temperature=math.inf), BAD, "got inf"),
    Case("top_p -0.5", _req(top_p=-0.5), BAD, "sampling.top_p"),
    Case("top_p 1.5", _req(top_p=1.5), BAD, "sampling.top_p"),
    Case("top_p NaN", _req(top_p=math.nan), BAD, "sampling.top_p"),
    Case("min_p 1", _req(min_p=1.0), BAD, "sampling.min_p must be a finite number in [0, 1)"),
    Case("top_k 10^6", _req(top_k=1_000_000), BAD, f"sampling.top_k must be in [0, {VOCAB}]"),
    Case("repetition_penalty -1", _req(repetition_penalty=-1.0), BAD, "sampling.repetition_penalty"),
    Case("repetition_penalty inf", _req(repetition_penalty=math.inf), BAD, "sampling.repetition_penalty"),
    Case("presence_penalty 3", _req(presence_penalty=3.0), BAD, "sampling.presence_penalty"),
    Case("frequency_penalty -inf", _req(frequency_penalty=-math.inf), BAD, "sampling.frequency_penalty"),
    Case("logprobs 1000", _req(logprobs=1000), BAD, "sampling.logprobs must be in [0, 20]"),
    # -- stop conditions
    # Far larger than any valid sampling: refused from its size on the wire, before parsing.
    Case("10k stop strings", _req(stop=[f"s{i}" for i in range(10_000)]), BAD,
         "sampling.stop may hold at most 16 strings of at most 256 characters"),
    Case("100 stop strings", _req(stop=[f"s{i}" for i in range(100)]), BAD, "100 strings; at most 16"),
    Case("empty stop string", _req(stop=["ok", ""]), BAD, "sampling.stop[1] is empty"),
    Case("10k-character stop string", _req(stop=["x" * 10_000]), BAD, "at most 256"),
    Case("stop token id outside the vocabulary", _req(stop_token_ids=[VOCAB + 1]), BAD, "stop_token_ids[0]"),
    Case("10k stop token ids", _req(stop_token_ids=list(range(10_000))), BAD, "sampling.stop_token_ids at most 64 ids"),
    Case("100 stop token ids", _req(stop_token_ids=list(range(100))), BAD, "100 ids; at most 64 are allowed"),
    # -- the wire
    Case("invalid UTF-8 in the prompt", _string_field(1, b"caf\xc3("), BAD, "bad UTF-8"),
    Case("invalid UTF-8 in a stop string",
         _req().SerializeToString() + _string_field(3, _string_field(7, b"\xff\xfe")), BAD, "bad UTF-8"),
    Case("corrupt wire format", b"\xff\xff\xff\xff\x0f", BAD, "not a valid protobuf message"),
    Case("truncated message", GOOD_BYTES[:-3], BAD, "not a valid protobuf message"),
    Case("message over the size limit", _string_field(1, b"a" * (MAX_MESSAGE_BYTES + 1024)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
    # proto3 skips unknown fields (newer clients keep working): served like the plain request.
    Case("unknown fields", GOOD_BYTES + _varint(99 << 3) + b"\x01" + _string_field(100, b"z" * 1000), OK),
    # -- odd but valid: served normally, and they must not break a stage's sampler.
    Case("temperature 1e-30", _req(temperature=1e-30, seed=1), OK),
    Case("top_p 1e-30", _req(temperature=1.0, top_p=1e-30, seed=1), OK),
    Case("min_p 0.9999999", _req(temperature=1.0, min_p=0.9999999, seed=1), OK),
    Case("repetition_penalty 1e-30", _req(repetition_penalty=1e-30), OK),
    Case("seed 2^64-1 at temperature 100", _req(temperature=100.0, top_k=VOCAB, seed=2**64 - 1), OK),
    Case("penalties at their bounds", _req(presence_penalty=2.0, frequency_penalty=-2.0, temperature=0.5), OK),
    Case("prompt of max_context - 1 tokens", _req([0] * (MAX_CONTEXT - 1), max_new_tokens=0), OK),
]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingSystem]:
    model = write_tiny_model(tmp_path_factory.mktemp("model") / "llama", "LlamaForCausalLM", seed=1,
                             max_position_embeddings=MAX_CONTEXT)
    sys_ = ServingSystem(model, 2, 1, "--block-size", "8", "--max-kv-blocks", "512")
    yield sys_
    code = sys_.stop()
    assert code == 0, f"stageserve up exited with {code}; log:\n{sys_.log()}"


class Api(gen_grpc.GenerationStub):
    """The typed stub, plus raw calls that send bytes as they are."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.channel = channel
        self.raw_generate = channel.unary_stream(
            GENERATE, request_serializer=None, response_deserializer=gen.GenerateResponse.FromString
        )


@pytest.fixture(scope="module")
def stub(system: ServingSystem) -> Iterator[Api]:
    # No size limit here, so the server (not this client) is the one that refuses the oversized case.
    channel = grpc.insecure_channel(
        system.address, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )
    yield Api(channel)
    channel.close()


def _run(stub: Api, request: gen.GenerateRequest | bytes,
         timeout: float = 60) -> tuple[grpc.StatusCode, str, list[gen.GenerateResponse]]:
    if isinstance(request, bytes):
        call = stub.raw_generate(request, timeout=timeout)
    else:
        call = stub.Generate(request, timeout=timeout)
    responses: list[gen.GenerateResponse] = []
    try:
        for msg in call:
            responses.append(msg)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", responses
    return OK, "", responses


def _tokens(responses: list[gen.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def _good(prompt: list[int]) -> gen.GenerateRequest:
    return build_request(prompt, max_new_tokens=GOOD_TOKENS, ignore_eos=True, logprobs=2)


def _comparable(responses: list[gen.GenerateResponse]) -> int:
    """Tokens up to the first near tie of the top two: a different batch may flip a tie."""
    logprobs = [lp for r in responses for lp in r.logprobs]
    for i, lp in enumerate(logprobs):
        if lp.top[0].logprob - lp.top[1].logprob < 1e-3:
            return i + 1
    return len(logprobs)


def wait_pool_full(stub: Api, timeout: float = 20.0) -> gen.ModelInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=10)
        if info.free_kv_blocks == info.num_kv_blocks or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


@pytest.fixture(scope="module")
def alone(stub: Api) -> dict[tuple[int, ...], list[gen.GenerateResponse]]:
    """Each good prompt's answer when it runs alone."""
    out = {}
    for prompt in GOOD_PROMPTS:
        code, details, responses = _run(stub, _good(prompt))
        assert code == OK, details
        out[tuple(prompt)] = responses
    return out


class GoodTraffic:
    """Good requests in a loop on a few threads, recording every answer."""

    def __init__(self, stub: Api, threads: int = 3) -> None:
        self.stub = stub
        self.stop = threading.Event()
        self.results: list[tuple[list[int], grpc.StatusCode, str, list[gen.GenerateResponse]]] = []
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _loop(self, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            prompt = GOOD_PROMPTS[i % len(GOOD_PROMPTS)]
            self.results.append((prompt, *_run(self.stub, _good(prompt))))
            i += 1

    def finish(self, alone: dict) -> int:
        self.stop.set()
        for t in self._threads:
            t.join(120)
        for prompt, code, details, responses in self.results:
            assert code == OK, f"a good request failed: {code} {details}"
            ref = alone[tuple(prompt)]
            n = _comparable(ref)
            assert _tokens(responses)[:n] == _tokens(ref)[:n], f"prompt {prompt} changed under load"
            assert len(_tokens(responses)) == GOOD_TOKENS
        return len(self.results)


def test_bad_requests_get_the_right_status_and_hurt_no_one(
    system: ServingSystem, stub: Api, alone: dict
) -> None:
    traffic = GoodTraffic(stub)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda case: _run(stub, case.request), CASES))
        # The same again, all at once with the first round's stragglers.
        outcomes2 = list(pool.map(lambda case: _run(stub, case.request), CASES))
    good_count = traffic.finish(alone)
    print(f"\n{len(CASES)} bad/odd cases x2 with {good_count} good requests alongside")
    for case, (code, details, responses) in zip(CASES, outcomes):
        print(f"  {case.name:55s} {code.name:20s} {details[:100]}")
    for case, (code, details, responses), (code2, _, _) in zip(CASES, outcomes, outcomes2):
        assert (code, code2) == (case.code, case.code), f"{case.name}: got {code.name} ({details})"
        if code == OK:
            assert responses[-1].finish_reason in (gen.FINISH_REASON_LENGTH, gen.FINISH_REASON_EOS), case.name
            assert not responses[-1].error_message, case.name
        else:
            assert case.says in details, f"{case.name}: {details!r} does not say {case.says!r}"
    # Unknown fields: exactly the answer to the request without them.
    plain = _run(stub, GOOD_BYTES)
    unknown = outcomes[[c.name for c in CASES].index("unknown fields")]
    assert _tokens(unknown[2]) == _tokens(plain[2]) and len(_tokens(plain[2])) == 6
    info = wait_pool_full(stub)
    assert info.free_kv_blocks == info.num_kv_blocks, "KV blocks leaked"


def test_tokenize_refuses_huge_text(stub: Api) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(gen.TokenizeRequest(text="a" * 2_000_000), timeout=30)
    assert err.value.code() == BAD and "at most 1000000" in err.value.details()
    raw = stub.channel.unary_unary(
        "/stageserve.v1.Generation/Tokenize", request_serializer=None,
        response_deserializer=gen.TokenizeResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        raw(_string_field(1, b"\xc3"), timeout=30)
    assert err.value.code() == BAD and "bad UTF-8" in err.value.details()


def test_a_huge_tokenize_does_not_stall_other_calls(stub: Api) -> None:
    # Just under the character limit, of characters that each become tokens: seconds of CPU.
    text = "".join(chr(0x4E00 + (i * 7919) % 20_000) for i in range(999_999))
    start = time.monotonic()
    finished: list[float] = []
    worker = threading.Thread(
        target=lambda: (stub.Tokenize(gen.TokenizeRequest(text=text), timeout=120), finished.append(time.monotonic()))
    )
    worker.start()
    time.sleep(0.5)
    asked = time.monotonic()
    stub.GetModelInfo(gen.GetModelInfoRequest(), timeout=60)
    info_s = time.monotonic() - asked
    worker.join(120)
    tokenize_s = finished[0] - start
    print(f"\nGetModelInfo took {info_s * 1000:.0f} ms during a {tokenize_s:.1f} s Tokenize call")
    # The router's event loop kept serving while the text was being tokenized.
    assert info_s < tokenize_s / 4


# ---- huge requests: refused early, no memory left behind, no stall of other streams -------------

def test_huge_requests_are_refused_early_and_leave_no_memory_behind(system: ServingSystem) -> None:
    router = system.child_pid("router")
    # One of each first: whatever a first call allocates for good (buffers, code paths).
    for kind in huge_requests.KINDS:
        assert not huge_requests.refused(system.address, kind)
    before = rss_bytes(router)
    start = time.monotonic()
    for kind in huge_requests.KINDS:
        assert not huge_requests.refused(system.address, kind, times=3)
    took = time.monotonic() - start
    after = rss_bytes(router)
    print(f"\nrouter RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB after 15 refused requests of 1 to 60 MB "
          f"({took:.1f} s)")
    # Each 60 MB one used to leave ~0.6-1 GB behind (a Python object per element, kept alive
    # by reference cycles).
    assert after - before < 150 * 2**20


QUIET_S = 10.0


def test_huge_requests_do_not_stall_other_streams(system: ServingSystem, stub: Api) -> None:
    gaps: list[float] = []
    done = threading.Event()

    def stream() -> None:
        # Streams one after another until the huge requests are refused; the gaps between
        # messages of one stream (not its time to first token) are what a client sees stall.
        while not done.is_set():
            last = None
            for _ in stub.Generate(_req(max_new_tokens=200, ignore_eos=True), timeout=120):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now

    # Sent from other processes (tests/harness/huge_requests.py says why), started before measuring.
    with ProcessPoolExecutor(8, mp_context=multiprocessing.get_context("spawn")) as senders:
        for started in [senders.submit(time.sleep, 0) for _ in range(8)]:
            started.result()
        streamer = threading.Thread(target=stream)
        streamer.start()
        while len(gaps) < 20:
            time.sleep(0.01)
        # The host's own noise first, over about as long as the longest phase below (other
        # processes share its cores). The bound sits between what the fix leaves on a 2-core
        # host (up to ~0.4 s seen for eight long prompts, whose tokenizer process takes a
        # core) and the stalls before the router refused them from the wire (1.3-4.4 s): 0.8 s, or three times the
        # noise on a busy host.
        time.sleep(QUIET_S)
        quiet = max(gaps)
        longest = {}
        for kind in huge_requests.KINDS:
            first = len(gaps)
            start = time.monotonic()
            # The long prompts eight at once; the others one at a time.
            copies = 8 if kind.startswith("a prompt") else 1
            results = [senders.submit(huge_requests.refused, system.address, kind) for _ in range(copies)]
            assert not [r.result() for r in results if r.result()]
            took = time.monotonic() - start
            # A gap that spans the end of the phase counts too: wait for the stream to go on.
            after = len(gaps)
            while len(gaps) < after + 2:
                time.sleep(0.01)
            longest[f"{kind} x{copies} ({took:.1f} s)"] = max(gaps[first:])
        done.set()
        streamer.join(120)
    bound = max(0.8, 3 * quiet)
    print(f"\nlongest gap of a running stream: {quiet * 1000:.0f} ms in {QUIET_S:.0f} s of normal serving; "
          f"while the router refused:")
    for name, gap in longest.items():
        print(f"  {name:50s} {gap * 1000:6.0f} ms")
    # Before the refusal from the wire: 1.3-4.4 s.
    assert max(longest.values()) < bound, f"a stream stalled (bound {bound * 1000:.0f} ms)"


# ---- clients that misbehave on the stream -------------------------------------------------------


def _long_request(**extra: object) -> gen.GenerateRequest:
    # 480 tokens at 20 top logprobs each: far more than the stream's flow-control window.
    return build_request([0, 11, 12, 13], max_new_tokens=480, ignore_eos=True, logprobs=20, **extra)


def _time_alone(stub: Api) -> float:
    start = time.monotonic()
    code, details, _ = _run(stub, _long_request())
    assert code == OK, details
    return time.monotonic() - start


def test_a_client_that_never_reads_holds_no_blocks(
    system: ServingSystem, stub: Api, alone: dict
) -> None:
    traffic = GoodTraffic(stub, threads=2)
    # Started, never read: the router keeps generating into its buffer, then the sequence
    # ends and frees its blocks while the stream is still open.
    silent = [stub.Generate(_long_request(), timeout=120) for _ in range(3)]
    time.sleep(0.5)
    traffic.finish(alone)
    info = wait_pool_full(stub, timeout=60)
    assert info.free_kv_blocks == info.num_kv_blocks
    assert all(call.is_active() for call in silent)
    # Read at last, it delivers everything the router generated for it meanwhile.
    tokens = [t for msg in silent[0] for t in msg.token_ids]
    assert len(tokens) == 480
    for call in silent[1:]:
        call.cancel()


def test_a_client_that_vanishes_mid_stream_frees_its_blocks(system: ServingSystem, stub: Api) -> None:
    full_time = _time_alone(stub)
    channels = [grpc.insecure_channel(system.address) for _ in range(3)]
    calls = [gen_grpc.GenerationStub(c).Generate(_long_request(), timeout=60) for c in channels]
    for call in calls:
        next(call)
    start = time.monotonic()
    for channel in channels:
        channel.close()
    info = wait_pool_full(stub)
    assert info.free_kv_blocks == info.num_kv_blocks
    # Freed when the clients left, not when their 480 tokens would have been done.
    assert time.monotonic() - start < full_time * 0.75


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_deadline_or_cancel_stops_the_sequence_at_the_next_step(
    system: ServingSystem, stub: Api, how: str
) -> None:
    full_time = _time_alone(stub)
    start = time.monotonic()
    call = stub.Generate(_long_request(), timeout=full_time / 4 if how == "deadline" else 60)
    received = 0
    with pytest.raises(grpc.RpcError) as err:
        for msg in call:
            received += len(msg.token_ids)
            if how == "cancel" and received == 20:
                call.cancel()
    expected = grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline" else grpc.StatusCode.CANCELLED
    assert err.value.code() == expected
    info = wait_pool_full(stub)
    freed_after = time.monotonic() - start
    print(f"\n{how}: {received} tokens received; pool full {freed_after:.2f} s after the start, "
          f"the whole request takes {full_time:.2f} s alone")
    assert info.free_kv_blocks == info.num_kv_blocks
    # Stopped early rather than run to the end: the pool was full long before the request
    # could have finished its 480 tokens.
    assert freed_after < full_time * 0.75
