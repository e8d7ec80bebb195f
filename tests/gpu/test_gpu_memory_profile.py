"""The KV budget leaves room for the heaviest step the scheduler can build.

A stage of the Llama-3-8B shape (four layers, random weights) on the GPU profiles at a high
memory target, sizes its cache from the result, captures its decode graphs, and then runs,
through the same `launch`/`finish` a served step takes, the largest step the budgets allow:
the whole token budget as one prompt chunk beside max_num_seqs - 1 one-token prompts, every
sequence sampling, then a decode step of every sequence (graph replay). Neither may run out
of memory, and what the steps used beyond the weights and the cache must be within what the
profile reserved.

Skipped without CUDA (CPU CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.one_stage import one_stage_runner
from shared.proto import stage_worker_pb2 as pb
from shared.sampling_params import SamplingParams
from stage_worker.model_runner import ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 16
MAX_TOKENS = 8192
MAX_SEQS = 512
# High enough that an under-reserved step cannot hide in the slack.
UTILIZATION = 0.97


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    config = json.loads((REPO / "docs/model-configs/llama-3-8b/config.json").read_text())
    config["num_hidden_layers"] = 4
    folder = tmp_path_factory.mktemp("llama-8b-4-layers")
    (folder / "config.json").write_text(json.dumps(config))
    runner = one_stage_runner(str(folder))
    return runner


def _heaviest_step(first_block: int) -> pb.StepRequest:
    """One prompt chunk of the rest of the token budget, then one-token prompts, all sampling."""
    long_prompt = MAX_TOKENS - (MAX_SEQS - 1)
    step = pb.StepRequest(step_id=1)
    block = first_block
    for seq_id in range(MAX_SEQS):
        length = long_prompt if seq_id == 0 else 1
        num_blocks = -(-length // BLOCK_SIZE)
        step.new_seqs.add(
            seq_id=seq_id, prompt_token_ids=[(seq_id * 7 + i) % 1000 + 3 for i in range(length)],
            sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=seq_id).to_proto(),
        )
        step.seqs.add(seq_id=seq_id, start_position=0, num_tokens=length,
                      new_block_ids=range(block, block + num_blocks), sample=True)
        block += num_blocks
    return step


def _decode_step(step_id: int, sampled: dict[int, int]) -> pb.StepRequest:
    """Every sequence's sampled token: the prompts' blocks have room for it (7681 % 16 = 1)."""
    step = pb.StepRequest(step_id=step_id)
    long_prompt = MAX_TOKENS - (MAX_SEQS - 1)
    for seq_id in range(MAX_SEQS):
        step.seqs.add(seq_id=seq_id, start_position=long_prompt if seq_id == 0 else 1, num_tokens=1,
                      append_token_id=sampled[seq_id], sample=True)
    return step


def test_heaviest_step_fits_what_the_profile_reserved(runner: ModelRunner) -> None:
    profile = runner.profile(pb.ProfileRequest(
        block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_TOKENS, max_num_seqs=MAX_SEQS,
        gpu_memory_utilization=UTILIZATION,
    ))
    print(f"\nprofile: peak {profile.peak_activation_bytes / 2**20:.0f} MiB, {profile.num_blocks} blocks of "
          f"{profile.block_bytes / 2**20:.2f} MiB")
    assert profile.num_blocks > 2 * MAX_TOKENS // BLOCK_SIZE
    runner.init_cache(pb.InitCacheRequest(num_blocks=profile.num_blocks, block_size=BLOCK_SIZE,
                                          max_num_seqs=MAX_SEQS))
    assert runner.graphs is not None and MAX_SEQS in runner.graphs.sizes
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    first = runner.finish(runner.launch(_heaviest_step(first_block=0)))
    assert not first.error, first.error
    assert len(first.tokens) == MAX_SEQS
    replays = []
    replay = runner.graphs.run
    runner.graphs.run = lambda batch, hidden: (replays.append(batch.num_tokens), replay(batch, hidden))[1]
    second = runner.finish(runner.launch(_decode_step(2, {t.seq_id: t.token_id for t in first.tokens})))
    assert not second.error, second.error
    assert len(second.tokens) == MAX_SEQS
    assert replays == [MAX_SEQS]
    torch.cuda.synchronize()

    used = torch.cuda.max_memory_allocated() - baseline
    print(f"heaviest step + decode step: {used / 2**20:.0f} MiB above weights, cache and graphs")
    # The graphs' pool is already inside `baseline` (captured at init_cache), so the steps
    # alone must stay within the eager part of the reserve, here bounded by the whole reserve.
    assert used <= profile.peak_activation_bytes
    free, _ = torch.cuda.mem_get_info()
    assert free > 0
