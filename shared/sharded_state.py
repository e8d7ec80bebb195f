"""The sharded-state format: per pipeline stage x TP rank, safetensors files holding exactly
that rank's parameters as the serving model names and shapes them (fused qkv/gate_up,
padded vocabulary shard), plus a metadata file naming the layout.

`save_sharded` writes it from a Hugging Face folder (each rank's slices are cut once, by
the same weight loaders the server uses); a rank served from it reads only its own files,
whole, and copies every tensor into its parameter with no slicing. The layout is fixed
when the folder is written: serving it with another (pp, tp, partition) is refused with
the layout the folder holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.config import ConfigError, StageLayout
from shared.partition import format_partition

METADATA_FILE = "stageserve-sharded.json"
FORMAT_NAME = "stageserve-sharded-state"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
# Files of a model folder that hold weights (ours or another framework's): not copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class RankShard:
    stage_index: int
    tp_rank: int
    files: tuple[str, ...]
    num_tensors: int
    # Tensor bytes in the files (headers not counted).
    num_bytes: int


@dataclass(frozen=True)
class ShardedState:
    """What a sharded folder's metadata file says."""

    folder: Path
    pp: int
    tp: int
    layer_partition: tuple[int, ...]
    dtype: str
    # The Hugging Face folder it was written from.
    source: str
    architecture: str
    shards: tuple[RankShard, ...]

    def describe(self) -> str:
        return f"pp={self.pp}, tp={self.tp}, layer partition {list(self.layer_partition)}"

    def shard(self, stage_index: int, tp_rank: int) -> RankShard:
        for shard in self.shards:
            if shard.stage_index == stage_index and shard.tp_rank == tp_rank:
                return shard
        raise ConfigError(
            f"{self.folder / METADATA_FILE} lists no files for stage {stage_index}, TP rank {tp_rank}"
        )

    def _mismatch(self, started: str) -> ConfigError:
        return ConfigError(
            f"{self.folder} holds a sharded state for {self.describe()} (written by "
            f"`stageserve save-sharded` from {self.source}); it cannot be served with "
            f"{started}. Start every stage with --pp {self.pp} --tp {self.tp} --layer-partition "
            f"{format_partition(self.layer_partition)}, or serve the original folder for another layout"
        )

    def resolve_layout(self, pp: int, tp: int, explicit: tuple[int, ...] | None) -> tuple[int, ...]:
        """The folder's partition when (pp, tp[, explicit partition]) is the folder's layout;
        otherwise the error naming the layout the folder holds."""
        partition = explicit if explicit is not None else (self.layer_partition if pp == self.pp else None)
        if (pp, tp, partition) != (self.pp, self.tp, self.layer_partition):
            given = f", layer partition {list(explicit)}" if explicit is not None else ""
            raise self._mismatch(f"pp={pp}, tp={tp}{given}")
        return self.layer_partition

    def check_rank(self, layout: StageLayout, tp_size: int) -> None:
        """What one rank can check: its own stage's layers and the TP size."""
        first = sum(self.layer_partition[: layout.stage_index])
        ok = (
            layout.num_stages == self.pp
            and tp_size == self.tp
            and layout.first_layer == first
            and layout.last_layer == first + self.layer_partition[layout.stage_index]
        )
        if not ok:
            raise self._mismatch(
                f"stage {layout.stage_index} of {layout.num_stages} owning layers "
                f"[{layout.first_layer}, {layout.last_layer}) at tp={tp_size}"
            )


def read_sharded_state(folder: str | Path) -> ShardedState | None:
    """The folder's sharded-state metadata, or None for a plain Hugging Face folder."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"{path} is format {meta.get('format')!r} version {meta.get('version')!r}; this "
                f"stageserve reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        shards = tuple(
            RankShard(int(s["stage"]), int(s["tp_rank"]), tuple(s["files"]), int(s["tensors"]), int(s["bytes"]))
            for s in meta["shards"]
        )
        return ShardedState(
            folder=folder,
            pp=int(meta["pp"]),
            tp=int(meta["tp"]),
            layer_partition=tuple(int(n) for n in meta["layer_partition"]),
            dtype=str(meta["dtype"]),
            source=str(meta["source"]),
            architecture=str(meta["architecture"]),
            shards=shards,
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a valid sharded-state metadata file: {exc!r}") from None


def read_rank_files(state: ShardedState, stage_index: int, tp_rank: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(tensors, bytes read) for each of the rank's files, read whole with plain file reads.

    The files hold nothing but this rank's parameters, so reading them whole is reading
    exactly the rank's share; one file at a time bounds the extra host memory.
    """
    from safetensors.torch import load

    for name in state.shard(stage_index, tp_rank).files:
        path = state.folder / name
        if not path.is_file():
            raise ConfigError(
                f"sharded folder {state.folder} lacks {name} (stage {stage_index}, TP rank {tp_rank})"
            )
        with open(path, "rb") as f:
            data = f.read()
        yield load(data), len(data)


# ---- writing ---------------------------------------------------------------------------
