"""The CPU parity checks again on GPUs, over NCCL (between TP ranks and between stages).

* float32: the serving path must equal transformers (float32, same GPU) as tightly as on CPU.
* bfloat16: rounding differs by design (TP sums partial matmuls in bf16), so the bar is
  transformers' own bf16 error: measured against the float32 reference, our logprob error
  may not exceed a small multiple of transformers-bf16's error.

Skipped without two CUDA devices (CPU CI). On a 2-GPU host:
`python3 -m pytest -q -s tests/gpu/test_gpu_parity.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from stageserve.demo_model import write_tiny_model
from tests.harness.processes import ServingSystem
from tests.harness.reference import agreement_with_reference, assert_matches_reference, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
    ),
]

NEW_TOKENS = 16
FP32_TOL = 2e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    common = dict(num_layers=6, hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=512,
                  initializer_range=0.1)
    return {
        "llama": write_tiny_model(root / "llama", "LlamaForCausalLM", seed=3, **common),
        "qwen2": write_tiny_model(root / "qwen2", "Qwen2ForCausalLM", seed=4, **common),
    }


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 700) for _ in range(n)] for n in (7, 40, 150)]


def _serve(model: Path, pp: int, tp: int, dtype: str) -> ServingSystem:
    return ServingSystem(model, pp, tp, "--dtype", dtype, "--max-num-batched-tokens", "64",
                         "--block-size", "16", "--shuffle-blocks-seed", "3", "--max-kv-blocks", "4096",
                         device="cuda")


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["pp2", "tp2"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_float32_over_nccl_equals_transformers(models: dict[str, Path], name: str, layout: tuple[int, int]) -> None:
    pp, tp = layout
    system = _serve(models[name], pp, tp, "float32")
    try:
        compared, max_diff = 0, 0.0
        for prompt in _prompts(pp * 10 + tp):
            got = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=300)
            ref = hf_greedy(models[name], prompt, NEW_TOKENS, dtype=torch.float32, device="cuda:0")
            n, diff = assert_matches_reference(got, ref, FP32_TOL)
            compared, max_diff = compared + n, max(max_diff, diff)
        print(f"\n{name} pp={pp} tp={tp} float32: {compared} greedy tokens equal, max logprob diff {max_diff:.2e}")
        assert compared >= NEW_TOKENS
    finally:
        system.stop()


@pytest.mark.parametrize("name,layout", [("llama", (1, 2)), ("qwen2", (2, 1))], ids=["llama-tp2", "qwen2-pp2"])
def test_bfloat16_error_is_transformers_bf16_error(models: dict[str, Path], name: str, layout: tuple[int, int]) -> None:
    pp, tp = layout
    system = _serve(models[name], pp, tp, "bfloat16")
    try:
        ours_agree = hf_agree = 0
        ours_worst = hf_worst = 0.0
        for prompt in _prompts(7):
            got = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=300)
            ref = hf_greedy(models[name], prompt, NEW_TOKENS, dtype=torch.float32, device="cuda:0")
            hf16 = hf_greedy(models[name], prompt, NEW_TOKENS, dtype=torch.bfloat16, device="cuda:0")
            a, w = agreement_with_reference(got.token_ids, [lp.logprob for lp in got.logprobs], ref)
            ours_agree, ours_worst = ours_agree + a, max(ours_worst, w)
            hf_lps = [float(hf16.logprobs[i, t]) for i, t in enumerate(hf16.token_ids)]
            a, w = agreement_with_reference(hf16.token_ids, hf_lps, ref)
            hf_agree, hf_worst = hf_agree + a, max(hf_worst, w)
        print(f"\n{name} pp={pp} tp={tp} bfloat16 vs float32 reference: stageserve agrees for {ours_agree} "
              f"steps (max logprob error {ours_worst:.3f}); transformers-bf16 for {hf_agree} "
              f"(max error {hf_worst:.3f})")
        assert ours_worst <= 3 * hf_worst + 0.05
        assert ours_agree >= hf_agree // 2
    finally:
        system.stop()
