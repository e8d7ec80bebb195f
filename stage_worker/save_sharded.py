"""`stageserve save-sharded`: write one safetensors set per stage x TP rank, holding exactly
the tensors that rank's model holds, so stages started on the folder load without slicing.

It builds each rank's part of the model with the stage worker's own layers and loader (the
same slicing the server does), which is why it lives here and not in shared/; the format
itself (metadata, reading) is in shared/sharded_state.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.config import DTYPES, ConfigError, ModelConfig, ParallelConfig
from shared.sizes import format_size
from shared.sharded_state import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHT_INDEXES,
    WEIGHT_SUFFIXES,
    RankShard,
    ShardedState,
    read_sharded_state,
)
from stage_worker.distributed import TensorParallelGroup, get_tp_group, set_tp_group
from stage_worker.loader import load_weights
from stage_worker.models.registry import build_model


@dataclass(frozen=True)
class SaveShardedConfig:
    model_path: str
    out_dir: str
    parallel: ParallelConfig
    # "auto": the checkpoint's dtype.
    dtype: str = "auto"
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        if self.max_shard_bytes < 1:
            raise ConfigError("the shard size limit must be at least 1 byte")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; choose auto or one of {sorted(DTYPES)}")


def _split_at_limit(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most `limit` tensor bytes; a bigger tensor gets a file alone."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def _copy_side_files(src: Path, out: Path) -> list[str]:
    """Config, tokenizer and generation files: everything top-level except weights."""
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in WEIGHT_INDEXES or path.suffix in WEIGHT_SUFFIXES:
            continue
        if path.name == METADATA_FILE:
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def save_sharded(config: SaveShardedConfig, progress: bool = False) -> ShardedState:
    """Writes the sharded state of `config.model_path` for `config.parallel` to `config.out_dir`."""
    from tqdm import tqdm

    src, out = Path(config.model_path), Path(config.out_dir)
    if read_sharded_state(src) is not None:
        raise ConfigError(f"{src} is already a sharded state; save-sharded reads a Hugging Face folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty; give a new or empty folder")
    model = ModelConfig.from_pretrained(src)
    parallel = config.parallel
    if sum(parallel.layer_partition) != model.num_hidden_layers:
        raise ConfigError(
            f"layer partition {list(parallel.layer_partition)} covers {sum(parallel.layer_partition)} "
            f"layers; the model has {model.num_hidden_layers}"
        )
    dtype_name = model.checkpoint_dtype if config.dtype == "auto" else config.dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"the checkpoint's dtype {dtype_name!r} is not one of {sorted(DTYPES)}; pass --dtype")
    dtype = DTYPES[dtype_name]
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    previous = get_tp_group()
    bar = tqdm(total=parallel.world_size, desc="writing shards", unit="rank", disable=not progress)
    try:
        with bar:
            for stage in range(parallel.num_stages):
                layout = parallel.stage_layout(stage)
                for rank in range(parallel.tp_size):
                    # Building and loading need only the rank's TP position; no collective runs.
                    set_tp_group(TensorParallelGroup(None, rank, parallel.tp_size, "gloo"))
                    stage_model = build_model(model, layout, dtype, torch.device("cpu"))
                    load_weights(stage_model, src)
                    # named_parameters lists a tied matrix once: one stage holding both ends
                    # stores it once, like its model holds it once.
                    tensors = {n: p.detach().contiguous() for n, p in stage_model.named_parameters()}
                    shards.append(_write_rank(out, stage, rank, tensors, config.max_shard_bytes))
                    del stage_model, tensors
                    bar.update(1)
    finally:
        set_tp_group(previous)
    _copy_side_files(src, out)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "pp": parallel.num_stages,
        "tp": parallel.tp_size,
        "layer_partition": list(parallel.layer_partition),
        "dtype": dtype_name,
        "source": str(src.resolve()),
        "architecture": model.architecture,
        "num_hidden_layers": model.num_hidden_layers,
        "shards": [
            {"stage": s.stage_index, "tp_rank": s.tp_rank, "files": list(s.files),
             "tensors": s.num_tensors, "bytes": s.num_bytes}
            for s in shards
        ],
    }
    # Written last and renamed into place: a folder whose writing was cut short has no
    # metadata and is not mistaken for a complete sharded state.
    tmp = out / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / METADATA_FILE)
    state = read_sharded_state(out)
    assert state is not None
    return state


def _write_rank(out: Path, stage: int, rank: int, tensors: dict[str, torch.Tensor], limit: int) -> RankShard:
    from safetensors.torch import save_file

    groups = _split_at_limit(tensors, limit)
    files = []
    for i, group in enumerate(groups, start=1):
        name = f"stage{stage:02d}-tp{rank:02d}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        files.append(name)
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return RankShard(stage, rank, tuple(files), len(tensors), num_bytes)


def summarize(state: ShardedState) -> str:
    total = sum(s.num_bytes for s in state.shards)
    files = sum(len(s.files) for s in state.shards)
    return (
        f"wrote {state.folder}: {state.describe()}, {state.dtype}, {files} files, "
        f"{format_size(total)} of tensors ({format_size(total // len(state.shards))} per rank on average)"
    )
