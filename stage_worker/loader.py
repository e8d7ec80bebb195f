"""Loads a stage's weights from a Hugging Face safetensors checkpoint.

Only files holding tensors this stage owns are opened, and of each owned tensor only this
rank's TP slice is read: parameters' weight_loaders index a lazy safetensors slice object,
so the bytes of other ranks' shards and of other stages' layers never leave the disk.

A folder written by `stageserve save-sharded` (it has the sharded-state metadata file) is
read differently: the rank reads its own files whole and copies each tensor into the
parameter of the same name, with no slicing.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from shared.config import ConfigError
from shared.sharded_state import ShardedState, read_rank_files, read_sharded_state

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class LoadReport:
    # Bytes of the tensor slices actually read (what the weight loaders indexed).
    bytes_read: int
    seconds: float
    # Checkpoint tensors loaded.
    tensors: int


class _CountingSlice:
    """Wraps a safetensors slice object and counts the bytes each indexing reads."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.bytes_read = 0

    def get_shape(self) -> list[int]:
        return self._inner.get_shape()

    def get_dtype(self) -> str:
        return self._inner.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor = self._inner[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def checkpoint_weight_map(model_dir: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name (reads the index, or one file's header)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise ConfigError(
        f"no safetensors weights in {model_dir}: expected {INDEX_FILE} or {SINGLE_FILE}"
    )


def load_weights(model: nn.Module, model_dir: str | Path) -> LoadReport:
    """Loads every parameter `model` owns (see model.checkpoint_targets) from `model_dir`."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    sharded = read_sharded_state(model_dir)
    if sharded is not None:
        return _load_sharded(model, sharded, started)
    targets = model.checkpoint_targets()
    weight_map = checkpoint_weight_map(model_dir)
    missing = [key for key in targets if key not in weight_map]
    if missing:
        raise ConfigError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s) this stage needs, e.g. "
            + ", ".join(missing[:5])
        )
    # Keys of other stages (and extras such as rotary inv_freq) are dropped here, before any
    # file is opened.
    by_file: dict[str, list[str]] = defaultdict(list)
    for key in targets:
        by_file[weight_map[key]].append(key)
    params = dict(model.named_parameters())
    # Every built parameter has a checkpoint key, so the missing-key check above covers them.
    assert {name for name, _ in targets.values()} == set(params)
    bytes_read = 0
    bar = tqdm(
        total=len(targets), desc="loading weights", unit="tensor", disable=not sys.stderr.isatty()
    )
    with torch.no_grad(), bar:
        for file_name in sorted(by_file):
            with safe_open(str(model_dir / file_name), framework="pt", device="cpu") as f:
                for key in by_file[file_name]:
                    param_name, shard_id = targets[key]
                    param = params[param_name]
                    loaded = _CountingSlice(f.get_slice(key))
                    if shard_id is None:
                        param.weight_loader(param, loaded)
                    else:
                        param.weight_loader(param, loaded, shard_id)
                    bytes_read += loaded.bytes_read
                    bar.update(1)
    return LoadReport(bytes_read=bytes_read, seconds=time.perf_counter() - started, tensors=len(targets))


def _load_sharded(model: nn.Module, state: ShardedState, started: float) -> LoadReport:
    """Copies the rank's own tensors from its sharded-state files into its parameters."""
    state.check_rank(model.layout, model.tp_size)
    stage, rank = model.layout.stage_index, model.tp_rank
    params = dict(model.named_parameters())
    seen: set[str] = set()
    bytes_read = 0
    bar = tqdm(
        total=state.shard(stage, rank).num_tensors, desc="loading weights", unit="tensor",
        disable=not sys.stderr.isatty(),
    )
    with torch.no_grad(), bar:
        for tensors, nbytes in read_rank_files(state, stage, rank):
            bytes_read += nbytes
            for name, tensor in tensors.items():
                param = params.get(name)
                if param is None:
                    raise ConfigError(
                        f"sharded folder {state.folder} holds {name} for stage {stage}, TP rank {rank}, "
                        "which this model does not have; was it written for another model?"
                    )
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ConfigError(
                        f"sharded folder {state.folder}: {name} has shape {list(tensor.shape)}, the "
                        f"model expects {list(param.shape)} for stage {stage}, TP rank {rank}"
                    )
                param.copy_(tensor)
                seen.add(name)
                bar.update(1)
            del tensors
    missing = sorted(set(params) - seen)
    if missing:
        raise ConfigError(
            f"sharded folder {state.folder} lacks {len(missing)} tensor(s) of stage {stage}, "
            f"TP rank {rank}, e.g. " + ", ".join(missing[:5])
        )
    return LoadReport(bytes_read=bytes_read, seconds=time.perf_counter() - started, tensors=len(seen))
