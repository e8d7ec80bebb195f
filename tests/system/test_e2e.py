"""End to end on CPU: `stageserve up` (router + stage processes + TP rank processes, gloo),
driven through the public gRPC API, compared with transformers.

Each layout starts one system (module-scoped per parameter) and runs every check on it.
The router runs with a small step budget (chunked prefill), a small block size and a
shuffled free list (non-contiguous block tables), so those paths run in every check.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import grpc
import pytest
import torch

from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from stageserve.client import build_request
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import ServingSystem
from tests.harness.reference import comparable_prefix, forget_hf_model, hf_generate, hf_greedy

pytestmark = pytest.mark.timeout(600)

LAYOUTS = [(1, 1), (3, 1), (2, 2)]
# (model, pp, tp, sequence_parallel). Each system costs CI's two cores 30-40 s, so the set
# covers each kind of stage and split once rather than every product of them: Llama in one
# process, as a three-stage pipeline (a middle stage) and at pp=2 x tp=2, and with sequence
# parallelism at tp=2 in one stage (embedding and head on the same ranks); Qwen2 (qkv bias,
# tied embeddings split across stages) at the full pipeline with TP and sequence parallelism;
# a Qwen3-MoE (experts on layers 1-3, layer 0 dense) likewise: pipeline, experts split over
# TP ranks, the MoE block's reduce-scatter. pp=2 x tp=1 and tp=2 alone run in process in
# tests/unit/test_model_core.py and tests/unit/test_moe_models.py; the FP8 checkpoint runs (1, 1) and
# (2, 2) through `up` in tests/system/test_quantization.py.
SYSTEMS = [("llama", pp, tp, False) for pp, tp in LAYOUTS] + [
    ("llama", 1, 2, True),
    ("qwen2", 2, 2, True),
    ("qwen3_moe", 2, 2, True),
]
NEW_TOKENS = 16
LOGPROB_TOL = 2e-3
EOS_PROMPT = [0, 17, 230, 41, 99, 5, 301, 12]


def _set_eos_from_greedy(model_dir: Path) -> int:
    """Makes the token greedy decoding produces 5th for EOS_PROMPT the model's eos (in
    config.json and generation_config.json), so the eos path is exercised for real."""
    ref = hf_greedy(model_dir, EOS_PROMPT, 8)
    candidates = [t for i, t in enumerate(ref.token_ids[4:], start=4) if t not in ref.token_ids[:i]]
    eos = candidates[0]
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        data = json.loads(path.read_text())
        data["eos_token_id"] = eos
        path.write_text(json.dumps(data, indent=2))
    forget_hf_model(model_dir)
    return eos


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    llama = write_tiny_model(
        root / "llama",
        "LlamaForCausalLM",
        rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
        },
        seed=1,
    )
    qwen2 = write_tiny_model(root / "qwen2", "Qwen2ForCausalLM", seed=2)
    qwen3_moe = write_tiny_model(root / "qwen3_moe", "Qwen3MoeForCausalLM", seed=3)
    dirs = {"llama": llama, "qwen2": qwen2, "qwen3_moe": qwen3_moe}
    for d in dirs.values():
        _set_eos_from_greedy(d)
    return dirs


@pytest.fixture(scope="module", params=SYSTEMS, ids=lambda p: f"{p[0]}-pp{p[1]}-tp{p[2]}" + ("-sp" if p[3] else ""))
def system(request: pytest.FixtureRequest, model_dirs: dict[str, Path]):
    name, pp, tp, sequence_parallel = request.param
    sys_ = ServingSystem(
        model_dirs[name], pp, tp,
        "--max-num-batched-tokens", "32", "--block-size", "8", "--kv-cache-bytes", str(8 * 2**20),
        "--shuffle-blocks-seed", "7", *(["--sequence-parallel"] if sequence_parallel else []),
    )
    sys_.model_dir = model_dirs[name]
    sys_.layout = (pp, tp)
    yield sys_
    code = sys_.stop()
    assert code == 0, f"stageserve up exited with {code}; log:\n{sys_.log()}"


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[0] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in (5, 19, 37, 70)]
    # Two prompts sharing 40 tokens: the second continues the first's cached prefix.
    shared = [0] + [rng.randrange(3, vocab) for _ in range(39)]
    prompts += [shared + [rng.randrange(3, vocab) for _ in range(5)], shared + [rng.randrange(3, vocab) for _ in range(9)]]
    return prompts


def _run_concurrently(fn, args_list: list) -> list:
    results: list = [None] * len(args_list)
    errors: list = []

    def run(i: int, args) -> None:
        try:
            results[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return results


def test_greedy_matches_transformers(system: ServingSystem) -> None:
    info = system.client.model_info()
    prompts = _prompts(info.vocab_size, seed=sum(system.layout))

    def gen(prompt):
        return system.client.generate(
            prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3, timeout=240
        )

    # Four prompts of different lengths at once, then the two sharing a prefix.
    results = _run_concurrently(gen, [(p,) for p in prompts[:4]])
    results += [gen(prompts[4]), gen(prompts[5])]
    assert results[5].cached_prompt_tokens >= 32, "the shared prefix was not served from the cache"
    for prompt, got in zip(prompts, results):
        ref = hf_greedy(system.model_dir, prompt, NEW_TOKENS)
        n = comparable_prefix(ref)
        assert got.finish_reason == "length"
        assert len(got.token_ids) == NEW_TOKENS
        assert got.token_ids[:n] == ref.token_ids[:n]
        for step in range(n):
            lp = got.logprobs[step]
            assert abs(lp.logprob - float(ref.logprobs[step, lp.token_id])) < LOGPROB_TOL
            assert len(lp.top) == 3
            for alt in lp.top:
                assert abs(alt.logprob - float(ref.logprobs[step, alt.token_id])) < LOGPROB_TOL
            assert [a.token_id for a in lp.top] == torch.topk(ref.logprobs[step], 3).indices.tolist() or n == step + 1


def test_eos_stop_and_streaming(system: ServingSystem) -> None:
    client = system.client
    expected = hf_generate(system.model_dir, EOS_PROMPT, 12)
    got = client.generate(EOS_PROMPT, max_new_tokens=12, timeout=120)
    assert got.finish_reason == "eos"
    assert got.token_ids == expected
    assert len(got.token_ids) == 5

    # max_new_tokens ends generation; streamed deltas add up to the decoded text.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(system.model_dir))
    msgs = list(client.stream("The quick brown fox", max_new_tokens=12, ignore_eos=True, timeout=120))
    ids = [t for m in msgs for t in m.token_ids]
    assert len(ids) == 12 and msgs[-1].finish_reason == 1  # FINISH_REASON_LENGTH
    assert "".join(m.text for m in msgs) == tok.decode(ids, skip_special_tokens=True)

    # A stop string taken from the middle of that text (spanning tokens) cuts it there.
    full = "".join(m.text for m in msgs)
    clean = [i for i in range(1, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    if clean:
        start = clean[len(clean) // 2]
        stop = full[start : start + 3]
        cut = client.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True, stop=[stop], timeout=120)
        assert cut.finish_reason == "stop" and cut.stop_reason == stop
        assert cut.text == full[: full.index(stop)]

    # A stop token id ends generation with that token included.
    stop_token = ids[3]
    first = ids.index(stop_token)
    stopped = client.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True,
                              stop_token_ids=[stop_token], timeout=120)
    assert stopped.finish_reason == "stop" and stopped.token_ids == ids[: first + 1]


def test_seeded_sampling_is_reproducible_across_batches(system: ServingSystem) -> None:
    client = system.client
    params = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True, timeout=120)
    alone = client.generate([0, 50, 60, 70], **params).token_ids
    again = client.generate([0, 50, 60, 70], **params).token_ids
    assert alone == again
    mixed = _run_concurrently(
        lambda p, s: client.generate(p, **{**params, "seed": s}).token_ids,
        [([0, 9, 8, 7, 6, 5], 1), ([0, 50, 60, 70], 1234), ([0, 3, 4], 99)],
    )
    assert mixed[1] == alone
    other_seed = client.generate([0, 50, 60, 70], **{**params, "seed": 4321}).token_ids
    assert other_seed != alone


def test_bad_requests_and_cancel_leave_the_pool_full(system: ServingSystem) -> None:
    client = system.client
    info = client.model_info()
    with pytest.raises(grpc.RpcError) as err:
        client.generate([info.vocab_size + 5], max_new_tokens=2, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.generate([0, 5], max_new_tokens=info.max_context, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A client that cancels mid-stream: its blocks come back.
    call = client.stub.Generate(build_request([0, 11, 12], max_new_tokens=200, ignore_eos=True), timeout=60)
    next(iter(call))
    call.cancel()
    # Every request is over: the pool is back to full.
    for _ in range(100):
        info = client.model_info()
        if info.free_kv_blocks == info.num_kv_blocks:
            break
        threading.Event().wait(0.1)
    assert info.free_kv_blocks == info.num_kv_blocks


def test_each_stage_holds_only_its_parameters(system: ServingSystem) -> None:
    from safetensors import safe_open

    info = system.client.model_info()
    with safe_open(str(system.model_dir / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    tied = "lm_head.weight" not in shapes
    pp, tp = system.layout
    for stage in info.stages:
        channel = grpc.insecure_channel(stage.address)
        stage_info = pb_grpc.StageWorkerStub(channel).GetInfo(pb.GetInfoRequest(include_parameter_names=True), timeout=10)
        channel.close()
        own = {
            k for k in shapes
            if k.startswith("model.layers.")
            and stage.first_layer <= int(k.split(".")[2]) < stage.last_layer
        }
        if stage.stage_index == 0:
            own.add("model.embed_tokens.weight")
        if stage.stage_index == pp - 1:
            own.add("model.norm.weight")
            own.add("model.embed_tokens.weight" if tied else "lm_head.weight")
        assert set(stage_info.parameter_names) == own
        own_bytes = sum(4 * torch.Size(shapes[k]).numel() for k in own)
        if tp == 1:
            assert stage_info.parameter_bytes == own_bytes
        for rank in stage_info.ranks:
            # Each rank reads its slice of the stage's tensors (norms are replicated, so a bit more than 1/tp).
            assert rank.bytes_read <= own_bytes / tp * 1.25 + 4096
            assert rank.bytes_read >= own_bytes / tp * 0.75
