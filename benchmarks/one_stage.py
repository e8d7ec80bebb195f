"""The whole model as one stage on one GPU, in this process: no router, no rank processes, no
process group. What the step benchmarks (and the GPU memory-profile test) build their runner with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.config import ModelConfig, ParallelConfig  # noqa: E402
from stage_worker.distributed import RankPlacement, declare_tp_placement  # noqa: E402
from stage_worker.model_runner import ModelRunner  # noqa: E402


def one_stage_runner(
    model_path: str, dtype: torch.dtype = torch.bfloat16, kv_cache_dtype: str = "auto"
) -> ModelRunner:
    """A loaded runner of every layer of `model_path` on cuda:0, with random weights (as
    `--load-format dummy`) and a KV cache of kv_cache_dtype ("auto" or "fp8") once allocated."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    config = ModelConfig.from_pretrained(model_path)
    parallel = ParallelConfig(num_stages=1, tp_size=1, layer_partition=(config.num_hidden_layers,))
    placement = RankPlacement(parallel, 0, 0)
    declare_tp_placement(placement, device)
    runner = ModelRunner(
        config, parallel.stage_layout(0), placement, dtype, device, load_format="dummy", kv_cache_dtype=kv_cache_dtype
    )
    runner.load()
    return runner
