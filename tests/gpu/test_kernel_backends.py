"""The Triton kernel backend wired through a real serving system, on CPU.

`--kernel-backend triton` with TRITON_INTERPRET=1 runs the GPU kernels in Triton's
interpreter inside the stage's rank processes: the device form of the attention metadata
(input_batch.py), the kernel calls of Attention._forward_triton, chunked prefill, prefix
caching and concurrent decode batches all go the path the GPU takes, and the greedy tokens
and logprobs must equal transformers'. (CUDA graphs need a GPU: tests/gpu/test_gpu_fast_path.py.)
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from stageserve.demo_model import write_tiny_model
from tests.harness.processes import ServingSystem
from tests.harness.reference import assert_matches_reference, hf_greedy

pytest.importorskip("triton", reason="triton is in the test extra")

NEW_TOKENS = 6
TOL = 2e-3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("backends") / "llama", "LlamaForCausalLM", num_layers=2,
                            hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=21)


@pytest.mark.timeout(600)
def test_triton_kernels_in_the_interpreter_equal_transformers(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = random.Random(2)
    shared_prefix = [0] + [rng.randrange(3, 300) for _ in range(20)]
    prompts = [shared_prefix + [rng.randrange(3, 300) for _ in range(n)] for n in (3, 15, 30)]
    # pp=2: both the first stage (token ids in) and a later stage (hidden states in) run it.
    system = ServingSystem(model, 2, 1, "--kernel-backend", "triton", "--max-num-batched-tokens", "24",
                           "--block-size", "8", "--shuffle-blocks-seed", "1")
    try:
        # The first request fills the prefix cache; the others continue from it.
        first = system.client.generate(prompts[0], max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1,
                                       timeout=300)
        with ThreadPoolExecutor(2) as pool:
            rest = list(pool.map(lambda p: system.client.generate(
                p, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=300), prompts[1:]))
    finally:
        system.stop()
    compared = 0
    for prompt, got in zip(prompts, [first, *rest]):
        n, _ = assert_matches_reference(got, ref=hf_greedy(model, prompt, NEW_TOKENS, dtype=torch.float32), tol=TOL)
        compared += n
    assert compared >= NEW_TOKENS
    assert rest[0].cached_prompt_tokens > 0 or rest[1].cached_prompt_tokens > 0
