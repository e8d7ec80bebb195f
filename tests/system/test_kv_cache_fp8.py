"""An FP8 KV cache (`--kv-cache-dtype fp8`) end to end on the CPU, through `stageserve up`.

The kernels' FP8 store and attention are held to the reference in
tests/gpu/test_triton_attention.py; this runs the served path: two stages, each quantizing
its own layers' K/V with a scale per (token, kv head) row, prompts longer than a block,
decode steps reading the FP8 rows back. Greedy tokens and logprobs equal transformers' with
its K/V rounded the same way (tests/harness/fp8_kv_attention.py), a reference that differs
visibly from transformers' unrounded model; the stages report the FP8 cache and its block
bytes as `plan` computes them.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from shared.config import ModelConfig
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from stage_worker.kv_cache import bytes_per_block, check_kv_cache_dtype
from stageserve.demo_model import write_tiny_model
from tests.harness.fp8_kv_attention import FP8_KV_ATTENTION
from tests.harness.processes import ServingSystem
from tests.harness.reference import assert_matches_reference, hf_greedy

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[0, 17, 230, 41, 99, 5, 301, 12, 77, 3, 150, 8, 64, 200, 31, 9, 44, 2, 19], [0, 42, 7]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("kvfp8") / "llama", "LlamaForCausalLM", seed=3)


def test_fp8_kv_cache_end_to_end_equals_transformers_with_rounded_kv(tiny: Path) -> None:
    rounded = [hf_greedy(tiny, p, NEW_TOKENS, attn_implementation=FP8_KV_ATTENTION) for p in PROMPTS]
    exact = [hf_greedy(tiny, p, NEW_TOKENS) for p in PROMPTS]
    system = ServingSystem(tiny, 2, 1, "--kv-cache-dtype", "fp8", "--block-size", "8")
    try:
        for prompt, ref, unrounded in zip(PROMPTS, rounded, exact):
            got = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True, timeout=240)
            # The same rounding: float32 noise, except where it tips a value onto the other
            # side of an e4m3 rounding boundary.
            steps, _ = assert_matches_reference(got, ref, tol=2e-3)
            assert steps >= NEW_TOKENS // 2
            # The rounding is visible: an unquantized cache would miss this reference by more
            # than the tolerance above (the served path quantizes, and in this way).
            assert (ref.logprobs[0] - unrounded.logprobs[0]).abs().max() > 2e-2
        info = system.client.model_info()
        config = ModelConfig.from_pretrained(tiny)
        for stage in info.stages:
            with grpc.insecure_channel(stage.address) as channel:
                stage_info = pb_grpc.StageWorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
            assert stage_info.kv_cache_dtype == "float8_e4m3fn"
            layers = stage_info.last_layer - stage_info.first_layer
            assert stage_info.profile.block_bytes == bytes_per_block(
                config, config.num_key_value_heads, layers, 8, torch.float8_e4m3fn
            )
    finally:
        system.stop()


def test_fp8_kv_cache_refused_on_gpus_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before compute capability 8.9 the kernels cannot convert FP8: refused at start-up."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(Exception, match="compute capability 8.9"):
        check_kv_cache_dtype("fp8", torch.device("cuda", 0))
    check_kv_cache_dtype("auto", torch.device("cuda", 0))
    check_kv_cache_dtype("fp8", torch.device("cpu"))
