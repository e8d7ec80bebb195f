"""Block-FP8 checkpoints on a GPU, through `stageserve up`, against transformers run on the
dequantized float32 weights (tests/harness/fp8_checkpoint.py writes both folders).

* The reference path on the GPU (`--kernel-backend reference --enforce-eager`, float32):
  the same greedy tokens and logprobs as transformers, as tightly as on the CPU: the FP8
  values and scales reach the GPU intact.
* The fast path (Triton FP8 GEMM with dynamic per-token-group activation quantization, decode
  CUDA graphs, bf16): FP8 activations carry 3 mantissa bits, so its error against float32 is
  larger than bf16's; it is printed beside transformers-bf16's on the same dequantized model,
  and held to agreeing with float32's tokens wherever float32's top-2 margin is wide and to a
  bounded logprob error (an indexing or scaling bug gives errors of order 1 and wrong tokens
  from the first step).

Skipped without CUDA (CPU CI). On a GPU host: `python3 -m pytest -q -s tests/gpu/test_gpu_fp8.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness.processes import ServingSystem
from tests.harness.reference import agreement_with_reference, assert_matches_reference, hf_greedy
from tests.harness.fp8_checkpoint import write_tiny_fp8_pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW_TOKENS = 24
PROMPTS = [[0, 17, 230, 41, 99, 5, 301, 12], [0, 42, 7], [0] + list(range(100, 160))]
# Float32's top-2 margin above which the FP8 path must keep float32's token.
WIDE_MARGIN = 0.5


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_fp8_pair(tmp_path_factory.mktemp("fp8"))


def _serve(model: Path, dtype: str, *extra: str) -> ServingSystem:
    return ServingSystem(model, 1, 1, "--dtype", dtype, "--max-kv-blocks", "1024", "--max-num-seqs", "8",
                         *extra, device="cuda")


def _generate(system: ServingSystem) -> list:
    return [system.client.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=300)
            for p in PROMPTS]


def test_reference_path_on_gpu_equals_transformers(fp8_pair: tuple[Path, Path]) -> None:
    fp8_dir, dequantized = fp8_pair
    system = _serve(fp8_dir, "float32", "--kernel-backend", "reference", "--enforce-eager")
    try:
        results = _generate(system)
    finally:
        system.stop()
    for prompt, got in zip(PROMPTS, results):
        ref = hf_greedy(dequantized, prompt, NEW_TOKENS, dtype=torch.float32, device="cuda:0")
        assert_matches_reference(got, ref, 2e-3)


def test_fast_path_fp8_gemm_against_float32(fp8_pair: tuple[Path, Path]) -> None:
    fp8_dir, dequantized = fp8_pair
    system = _serve(fp8_dir, "bfloat16")
    try:
        assert "decode CUDA graphs" in system.log_path.read_text(errors="replace"), "no decode graphs captured"
        results = _generate(system)
    finally:
        system.stop()
    fast_worst = hf16_worst = 0.0
    for prompt, got in zip(PROMPTS, results):
        ref = hf_greedy(dequantized, prompt, NEW_TOKENS, dtype=torch.float32, device="cuda:0")
        hf16 = hf_greedy(dequantized, prompt, NEW_TOKENS, dtype=torch.bfloat16, device="cuda:0")
        agree, worst = agreement_with_reference(got.token_ids, [lp.logprob for lp in got.logprobs], ref)
        hf16_worst = max(hf16_worst, agreement_with_reference(
            hf16.token_ids, [float(hf16.logprobs[i, t]) for i, t in enumerate(hf16.token_ids)], ref)[1])
        fast_worst = max(fast_worst, worst)
        margins = [float(torch.topk(lp, 2).values.diff().abs()) for lp in ref.logprobs]
        wide = next((i for i, m in enumerate(margins) if m < WIDE_MARGIN), NEW_TOKENS)
        print(f"\nprompt of {len(prompt)}: FP8 fast path agrees with float32 for {agree} of {NEW_TOKENS} "
              f"steps (first margin under {WIDE_MARGIN}: step {wide}), max logprob error {worst:.3f}")
        assert agree >= min(wide, NEW_TOKENS), f"parted from float32 at step {agree} where its margin is wide"
    print(f"\nFP8 fast path max logprob error vs float32 {fast_worst:.3f}; transformers-bf16 on the "
          f"dequantized weights {hf16_worst:.3f}")
    assert fast_worst < 0.25
