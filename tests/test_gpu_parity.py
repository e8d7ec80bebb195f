"""The CPU parity checks again on GPUs: bf16, NCCL between TP ranks and between stages.

Skipped without at least two CUDA devices (CPU CI). Run on a 2-GPU host with
`python3 -m pytest -q tests/test_gpu_parity.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shared.demo_model import write_tiny_model
from tests.e2e_harness import ServingSystem, comparable_prefix, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
    ),
]

NEW_TOKENS = 24
# bf16 keeps ~3 significant digits: logprobs of a 768-way softmax agree to a few 1e-2.
LOGPROB_TOL = 0.1
NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    common = dict(num_layers=6, hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=512,
                  dtype="bfloat16", initializer_range=0.05)
    return {
        "llama": write_tiny_model(root / "llama", "LlamaForCausalLM", seed=3, **common),
        "qwen2": write_tiny_model(root / "qwen2", "Qwen2ForCausalLM", seed=4, **common),
    }


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["pp2", "tp2"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_bf16_nccl_greedy_matches_transformers(models: dict[str, Path], name: str, layout: tuple[int, int]) -> None:
    pp, tp = layout
    system = ServingSystem(models[name], pp, tp, "--dtype", "bfloat16", "--max-num-batched-tokens", "64",
                           "--block-size", "16", "--shuffle-blocks-seed", "3", device="cuda")
    try:
        rng = random.Random(pp * 10 + tp)
        prompts = [[0] + [rng.randrange(3, 700) for _ in range(n)] for n in (7, 30, 90, 150)]
        compared = 0
        for prompt in prompts:
            got = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=300)
            ref = hf_greedy(models[name], prompt, NEW_TOKENS, dtype=torch.bfloat16, device="cuda:0")
            n = comparable_prefix(ref, margin=NEAR_TIE)
            assert got.token_ids[:n] == ref.token_ids[:n], system.log()
            for step in range(n):
                lp = got.logprobs[step]
                assert abs(lp.logprob - float(ref.logprobs[step, lp.token_id])) < LOGPROB_TOL
            compared += n
        print(f"{name} pp={pp} tp={tp}: {compared} greedy tokens compared with transformers (bf16)")
        assert compared >= NEW_TOKENS, "too many near ties to compare anything"
    finally:
        system.stop()
