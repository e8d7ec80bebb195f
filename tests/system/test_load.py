"""Load on the real system (`stageserve up`, 2 stages, CPU tiny model): 1,000 concurrent
streaming requests from one asyncio client all complete with the tokens each prompt gets
alone; the KV pool is full again afterwards; router and stage memory is measured before and
after (printed, with a generous bound). Backpressure: past --max-queue-len new requests get
RESOURCE_EXHAUSTED at once, while the admitted ones are still running.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from shared.grpc_options import channel_options
from shared.proto import generation_pb2 as gen
from shared.proto import generation_pb2_grpc as gen_grpc
from stageserve.client import build_request
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import ServingSystem

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

NUM_REQUESTS = 1000
NEW_TOKENS = 4
VOCAB = 768
# Growth allowed per process across the load. Generous: the point is "bounded", and a
# leak of per-request state for 1,000 requests of this size would not show below this.
RSS_GROWTH_BOUND = 300 * 2**20


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out: set[tuple[int, ...]] = set()
    while len(out) < n:
        out.add((0, *(rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 8)))))
    return [list(p) for p in sorted(out)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "llama", "LlamaForCausalLM", seed=3)


# ---- process memory, from /proc ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields after the last ")" do not.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def serving_processes(system: ServingSystem) -> dict[str, int]:
    """Role -> pid: the router, each stage's gRPC process and each stage's rank processes."""
    tree = _children()
    roles: dict[str, int] = {}
    for pid in tree.get(system.proc.pid, []):
        cmd = _cmdline(pid)
        if "router" in cmd:
            roles["router"] = pid
        elif "stage" in cmd:
            stage = f"stage{cmd[cmd.index('--stage-index') + 1]}"
            roles[stage] = pid
            # Its children: the TP ranks, and multiprocessing's resource tracker.
            for i, child in enumerate(sorted(tree.get(pid, []))):
                kind = "tracker" if any("resource_tracker" in part for part in _cmdline(child)) else "rank"
                roles[f"{stage}-{kind}{i}"] = child
    assert "router" in roles and "stage0" in roles, f"cannot find the serving processes: {roles}"
    return roles


# ---- the asyncio client --------------------------------------------------------------------------


async def _generate(stub: gen_grpc.GenerationStub, prompt: list[int], **sampling: object) -> tuple[grpc.StatusCode, str, list[int], list[gen.GenerateResponse]]:
    responses: list[gen.GenerateResponse] = []
    try:
        async for msg in stub.Generate(build_request(prompt, **sampling), timeout=300):
            responses.append(msg)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", [], responses
    return grpc.StatusCode.OK, "", [t for r in responses for t in r.token_ids], responses


async def _alone(address: str, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Each prompt's tokens run alone, and how many of them a different batch cannot flip
    (up to the first near tie of the top two logprobs)."""
    out = []
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        for prompt in prompts:
            code, details, tokens, responses = await _generate(
                stub, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2
            )
            assert code == grpc.StatusCode.OK, details
            lps = [lp for r in responses for lp in r.logprobs]
            ties = [i for i, lp in enumerate(lps) if lp.top[0].logprob - lp.top[1].logprob < 1e-3]
            out.append((tokens, ties[0] + 1 if ties else len(tokens)))
    return out


async def _all_at_once(address: str, prompts: list[list[int]]) -> tuple[list, float]:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        start = time.monotonic()
        results = await asyncio.gather(
            *(_generate(stub, p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts)
        )
        return results, time.monotonic() - start


def _model_info(address: str) -> gen.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return gen_grpc.GenerationStub(channel).GetModelInfo(gen.GetModelInfoRequest(), timeout=10)


def _wait_pool_full(address: str, timeout: float = 30.0) -> gen.ModelInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = _model_info(address)
        if info.free_kv_blocks == info.num_kv_blocks or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_a_thousand_concurrent_streams(model: Path) -> None:
    system = ServingSystem(
        model, 2, 1, "--block-size", "8", "--max-num-seqs", "256", "--max-queue-len", str(NUM_REQUESTS),
        # Fewer blocks than 256 running sequences want: admission waits for blocks, and growing
        # sequences preempt each other, all under load.
        "--max-kv-blocks", "300",
    )
    try:
        prompts = _prompts(NUM_REQUESTS, seed=0)
        start = time.monotonic()
        alone = asyncio.run(_alone(system.address, prompts))
        alone_s = time.monotonic() - start
        procs = serving_processes(system)
        before = {role: _rss(pid) for role, pid in procs.items()}

        results, load_s = asyncio.run(_all_at_once(system.address, prompts))
        info = _wait_pool_full(system.address)
        after = {role: _rss(pid) for role, pid in procs.items()}
        # A second round: memory that keeps growing with every round is a leak.
        again, again_s = asyncio.run(_all_at_once(system.address, prompts))
        info_again = _wait_pool_full(system.address)
        after2 = {role: _rss(pid) for role, pid in procs.items()}

        print(f"\none at a time: {NUM_REQUESTS} requests in {alone_s:.1f} s")
        for name, res, secs, inf in (("round 1", results, load_s, info), ("round 2", again, again_s, info_again)):
            statuses = Counter(code.name for code, *_ in res)
            wrong = [i for i, ((code, _, tokens, _), (ref, n)) in enumerate(zip(res, alone))
                     if code != grpc.StatusCode.OK or len(tokens) != NEW_TOKENS or tokens[:n] != ref[:n]]
            print(f"{name}: {NUM_REQUESTS} concurrent streams x {NEW_TOKENS} tokens in {secs:.1f} s "
                  f"({NUM_REQUESTS * NEW_TOKENS / secs:.0f} tokens/s); statuses {dict(statuses)}; "
                  f"wrong outputs {len(wrong)}; KV blocks free {inf.free_kv_blocks}/{inf.num_kv_blocks}")
            assert statuses == {"OK": NUM_REQUESTS}, next(r[1] for r in res if r[0] != grpc.StatusCode.OK)
            assert not wrong, f"{len(wrong)} outputs differ from the prompt's output alone, e.g. {prompts[wrong[0]]}"
            assert inf.free_kv_blocks == inf.num_kv_blocks, "KV blocks leaked"
        for role in procs:
            print(f"  {role:15s} RSS {before[role] / 2**20:7.1f} MiB -> {after[role] / 2**20:7.1f} MiB "
                  f"-> {after2[role] / 2**20:7.1f} MiB")
        for role in procs:
            assert after2[role] - before[role] < RSS_GROWTH_BOUND, f"{role} grew from {before[role]} to {after2[role]} bytes"
    finally:
        system.stop()


async def _backpressure(address: str, admitted: int, extra: int) -> tuple[list, list, float]:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = gen_grpc.GenerationStub(channel)
        long = [stub.Generate(build_request([0, 40 + i, 41], max_new_tokens=400, ignore_eos=True), timeout=120)
                for i in range(admitted)]
        for call in long:
            await call.read()  # each holds its place in the router once its first token came
        start = time.monotonic()
        refused = await asyncio.gather(*(_generate(stub, [0, 7, i], max_new_tokens=4) for i in range(extra)))
        refused_s = time.monotonic() - start
        still_running = [not call.done() for call in long]
        for call in long:
            call.cancel()
        return refused, still_running, refused_s


def test_past_the_queue_limit_requests_are_refused_at_once(model: Path) -> None:
    system = ServingSystem(model, 1, 1, "--block-size", "8", "--max-queue-len", "8", "--max-num-seqs", "8")
    try:
        refused, still_running, refused_s = asyncio.run(_backpressure(system.address, admitted=8, extra=30))
        print(f"\n30 requests past --max-queue-len 8: all refused in {refused_s * 1000:.0f} ms")
        for code, details, _, _ in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue-len" in details and "retry later" in details
        # Refused while every admitted request was still generating: nobody waited for room.
        assert all(still_running)
        assert _wait_pool_full(system.address).free_kv_blocks == _model_info(system.address).num_kv_blocks
        # Room again once they are gone.
        code, details, tokens, _ = asyncio.run(_single(system.address))
        assert code == grpc.StatusCode.OK and len(tokens) == 4, details
    finally:
        system.stop()


async def _single(address: str) -> tuple[grpc.StatusCode, str, list[int], list[gen.GenerateResponse]]:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        return await _generate(gen_grpc.GenerationStub(channel), [0, 7, 8], max_new_tokens=4, ignore_eos=True)
