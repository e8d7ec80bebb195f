"""Loads a stage's weights from a Hugging Face safetensors checkpoint.

Only files holding tensors this stage owns are opened, and of each owned tensor only this
rank's TP slice is read: parameters' weight_loaders index a lazy safetensors slice object,
so the bytes of other ranks' shards and of other stages' layers never leave the disk.

A folder written by `stageserve save-sharded` (it has the sharded-state metadata file) is
read differently: the rank reads its own files whole and copies each tensor into the
parameter of the same name, with no slicing.

`load_format="dummy"` opens no file at all (the folder needs only config.json): each
checkpoint tensor is replaced by a deterministic pseudo-random one (see DummyTensor) that
the same weight loaders slice, so benchmarks can run an 8B- or 70B-shaped model without
its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from shared.config import ConfigError, ModelConfig
from shared.quantization import SUPPORTED_QUANTIZATION
from shared.sharded_state import ShardedState, read_rank_files, read_sharded_state

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# "auto": the folder's checkpoint (HF safetensors or the sharded state); "dummy": random weights.
LOAD_FORMATS = ("auto", "dummy")

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# Checkpoint keys outside the decoder layers, by the stage that owns them (the embedding may
# also be the last stage's head, with tied embeddings).
_FIRST_STAGE_PREFIXES = ("model.embed_tokens.",)
_LAST_STAGE_PREFIXES = ("model.norm.", "lm_head.")
# Tensors some checkpoints carry that no model needs (transformers skips them as well):
# rotary tables older Llama checkpoints saved.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# safetensors dtypes a parameter in a float model dtype may be loaded from (widened or
# narrowed like any float checkpoint); anything else (float8, packed int4 in int32, uint8)
# is a quantized value that a plain cast would turn into wrong weights.
_PLAIN_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_FP8_DTYPES = {torch.float8_e4m3fn: "F8_E4M3"}

# Dummy weights are uniform in [-DUMMY_RANGE, DUMMY_RANGE] (vLLM's dummy loader uses the same
# range): small enough that activations stay finite in bf16 through 80 layers. Norm weights
# get 1 + the same noise, so each norm keeps the scale it was made to restore.
DUMMY_RANGE = 1e-3
# Elements hashed at once: bounds the int64 temporaries of the hash (8 bytes each, a few alive).
_DUMMY_CHUNK_ELEMENTS = 1 << 24
_MASK32 = 0xFFFFFFFF
# Below 2**31, so a 32-bit value times it stays below 2**63: no int64 overflow anywhere.
_HASH_MULTIPLIER = 0x45D9F3B


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
        f"no safetensors weights in {model_dir}: expected {INDEX_FILE} or {SINGLE_FILE} "
        "(to serve random weights from config.json alone: stageserve up/stage --load-format dummy)"
    )


def load_weights(
    model: nn.Module, model_dir: str | Path, load_format: str = "auto", seed: int = 0
) -> LoadReport:
    """Loads every parameter `model` owns (see model.checkpoint_targets) from `model_dir`,
    or with load_format="dummy" fills them with the dummy weights of `seed` (no file read)."""
    started = time.perf_counter()
    if load_format == "dummy":
        return _load_dummy(model, seed, started)
    if load_format != "auto":
        raise ConfigError(f"unknown load format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    model_dir = Path(model_dir)
    sharded = read_sharded_state(model_dir)
    if sharded is not None:
        return _load_sharded(model, sharded, started)
    targets = model.checkpoint_targets()
    weight_map = checkpoint_weight_map(model_dir)
    # Before anything is read: a tensor nothing claims is a format we would misread, and a
    # missing one a format we do not know.
    unclaimed = unclaimed_checkpoint_keys(model, weight_map)
    if unclaimed:
        raise ConfigError(
            f"checkpoint {model_dir} holds {len(unclaimed)} tensor(s) that no parameter of this "
            f"{model.config.architecture} claims, e.g. " + ", ".join(unclaimed[:5])
            + _describe_quantization(model.config)
        )
    missing = [key for key in targets if key not in weight_map]
    if missing:
        raise ConfigError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s) this stage needs, e.g. "
            + ", ".join(missing[:5]) + _describe_quantization(model.config)
        )
    # Keys of other stages (and extras such as rotary inv_freq) are dropped here, before any
    # file is opened.
    by_file: dict[str, list[str]] = defaultdict(list)
    for key in targets:
        by_file[weight_map[key]].append(key)
    params = dict(model.named_parameters())
    # Every built parameter has a checkpoint key, so the missing-key check above covers them.
    assert {name for name, _ in targets.values()} == set(params)
    # Stored dtypes come from the file headers: all checked before any value is read.
    for file_name in sorted(by_file):
        with safe_open(str(model_dir / file_name), framework="pt", device="cpu") as f:
            for key in by_file[file_name]:
                _check_stored_dtype(key, f.get_slice(key).get_dtype(), params[targets[key][0]])
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


def unclaimed_checkpoint_keys(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """The checkpoint keys this stage answers for that none of its parameters claims.

    A stage answers for the keys of its own decoder layers and of the ends it holds; the
    last stage also for any key that belongs to no layer and no end. Together the stages
    cover every key once, so a stray tensor (a `*_scale`, `qweight`, `g_idx`, ...) is named
    by exactly one stage, before any weight is read.
    """
    targets = model.checkpoint_targets()
    layout, config = model.layout, model.config
    unclaimed = []
    for key in keys:
        if key in targets or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            # Some tied checkpoints store the head as well; transformers ignores it too.
            continue
        layer = _LAYER_KEY.match(key)
        if layer is not None and int(layer.group(1)) < config.num_hidden_layers:
            answers = layout.owns_layer(int(layer.group(1)))
        elif key.startswith(_FIRST_STAGE_PREFIXES):
            answers = layout.is_first
        else:
            answers = layout.is_last
        if answers:
            unclaimed.append(key)
    return sorted(unclaimed)


def _describe_quantization(config: ModelConfig) -> str:
    if config.quantization is None:
        return (
            " (config.json declares no quantization_config: is the checkpoint quantized? "
            "Supported quantization: " + SUPPORTED_QUANTIZATION + ")"
        )
    return f" (config.json declares {config.quantization.describe()})"


def _check_stored_dtype(key: str, stored: str, param: nn.Parameter) -> None:
    """A checkpoint tensor must be stored as what its parameter holds: FP8 values for an FP8
    parameter, a plain float for a float one (scales included)."""
    wanted = _FP8_DTYPES.get(param.dtype)
    if wanted is not None:
        ok, expected = stored == wanted, wanted
    else:
        ok, expected = stored in _PLAIN_FLOAT_DTYPES, " or ".join(_PLAIN_FLOAT_DTYPES)
    if not ok:
        raise ConfigError(
            f"checkpoint tensor {key} is stored as {stored}; this model expects {expected} there "
            "(is the checkpoint quantized differently from what config.json's quantization_config "
            "says?)"
        )


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


# ---- dummy weights ---------------------------------------------------------------------------


def reference_checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> full (unsharded) shape, as transformers saves this model.

    Built on the meta device, so no memory is allocated: transformers, not this project,
    says which tensors the checkpoint of a config would hold. transformers 5 holds some
    tensors fused in its modules (an MoE block's experts as one [num_experts, ...] tensor)
    and splits them back on save (per-expert keys, as Hub checkpoints have them); its own
    save-time conversion gives the keys on disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    hf_config = config.hf_config or AutoConfig.from_pretrained(config.model_path)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(hf_config)
        state = revert_weight_conversion(reference, reference.state_dict())
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of every element of x (int64 in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def _index_ranges(index: Any, shape: tuple[int, ...]) -> tuple[list[range], list[bool]]:
    """A basic index (ints, slices, one Ellipsis) -> the range it selects in each dimension,
    and whether that dimension stays (False for an int index, which drops it)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis for item in items):
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (len(shape) - len(items) + 1) + items[at + 1 :]
    if len(items) > len(shape):
        raise IndexError(f"too many indices ({len(items)}) for a tensor of shape {list(shape)}")
    items = items + (slice(None),) * (len(shape) - len(items))
    ranges: list[range] = []
    keep: list[bool] = []
    for item, size in zip(items, shape):
        if isinstance(item, slice):
            ranges.append(range(*item.indices(size)))
            keep.append(True)
        elif isinstance(item, int) and not isinstance(item, bool):
            i = item + size if item < 0 else item
            if not 0 <= i < size:
                raise IndexError(f"index {item} is out of range for a dimension of size {size}")
            ranges.append(range(i, i + 1))
            keep.append(False)
        else:
            raise TypeError(f"dummy weights support int and slice indices, got {item!r}")
    return ranges, keep


def _arange(r: range, device: torch.device) -> torch.Tensor:
    return torch.arange(r.start, r.stop, r.step, dtype=torch.int64, device=device)


class DummyTensor:
    """A checkpoint tensor that exists nowhere: indexing it makes exactly the indexed
    elements, on `device`, in `dtype`, like a safetensors slice reads them from disk.

    Element i (row-major index into the full tensor) is a hash of (i, key, seed) mapped to
    [center - DUMMY_RANGE, center + DUMMY_RANGE]. Every element depends only on its place in
    the full tensor, so each TP rank makes just its own shard, ranks holding replicated
    parameters (norms, shared kv heads) make equal values, any layout computes the same
    model, and reruns agree. Integer hashing and one float32 multiply-add give the same
    values on CPU and GPU.
    """

    def __init__(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        seed: int = 0, center: float = 0.0, half_range: float = DUMMY_RANGE,
    ) -> None:
        self.key = key
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.center = center
        self.half_range = half_range
        # hashlib, not hash(): Python's string hash changes from process to process.
        digest = int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")
        self._key_lo, self._key_hi = digest & _MASK32, digest >> 32

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def _values(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Row-major indices into the full tensor (int64) -> their values, same shape."""
        h = _mix32((flat_index & _MASK32) ^ self._key_lo)
        # The high word keeps elements 2**32 apart distinct (tensors past 4G elements).
        h = _mix32(h ^ (((flat_index >> 32) + self._key_hi) & _MASK32))
        unit = h.to(torch.float32) * (1.0 / 2**32)  # [0, 1]
        return (unit * (2 * self.half_range) + (self.center - self.half_range)).to(self.dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if not self.shape:
            return self._values(torch.zeros((), dtype=torch.int64, device=self.device))
        ranges, keep = _index_ranges(index, self.shape)
        strides = [1] * len(self.shape)
        for d in range(len(self.shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * self.shape[d + 1]
        out = torch.empty([len(r) for r in ranges], dtype=self.dtype, device=self.device)
        if out.numel() > 0:
            # Offsets of the selected elements within one index of dim 0: [len(r1), len(r2), ...].
            inner = torch.zeros((), dtype=torch.int64, device=self.device)
            for r, stride in zip(ranges[1:], strides[1:]):
                inner = inner.unsqueeze(-1) + _arange(r, self.device) * stride
            rows_per_chunk = max(1, _DUMMY_CHUNK_ELEMENTS // max(1, inner.numel()))
            first = ranges[0]
            for start in range(0, len(first), rows_per_chunk):
                rows = _arange(first[start : start + rows_per_chunk], self.device)
                # [rows, 1, ...] + [len(r1), ...] -> [rows, len(r1), ...]
                flat = rows.view(-1, *([1] * inner.dim())) * strides[0] + inner
                out[start : start + rows.numel()] = self._values(flat)
        return out[tuple(slice(None) if k else 0 for k in keep)]


def _norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of normalization modules (RMSNorm, LayerNorm, ...): their dummy centre is 1."""
    names = set()
    for module_name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            for name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def _load_dummy(model: nn.Module, seed: int, started: float) -> LoadReport:
    """Fills every parameter through its weight_loader from DummyTensors of the checkpoint
    the model's config describes: the same slicing as a real load, on the parameter's device."""
    targets = model.checkpoint_targets()
    shapes = reference_checkpoint_shapes(model.config)
    params = dict(model.named_parameters())
    for key, (param_name, _) in targets.items():
        block = getattr(params[param_name], "block_shape", None)
        weight_key = key.removesuffix("_scale_inv")
        if block is not None and weight_key in shapes:
            # Quantized checkpoints hold the scales beside each weight, one per block.
            out, inp = shapes[weight_key]
            shapes[key] = (-(-out // block[0]), -(-inp // block[1]))
    missing = [key for key in targets if key not in shapes]
    if missing:
        raise ConfigError(
            f"dummy weights: transformers' {model.config.architecture} has no tensor named "
            + ", ".join(missing[:5])
        )
    norms = _norm_parameter_names(model)
    with torch.no_grad():
        for key, (param_name, shard_id) in targets.items():
            param = params[param_name]
            center, half_range = (1.0 if param_name in norms else 0.0), DUMMY_RANGE
            if param.dtype in _FP8_DTYPES:
                # FP8 values span float8's fine range around 1; their block scales, near
                # DUMMY_RANGE, bring the real weight to the plain dummy's magnitude.
                half_range = 1.0
            elif hasattr(param, "block_shape"):
                center, half_range = DUMMY_RANGE, DUMMY_RANGE / 4
            fake = DummyTensor(key, shapes[key], param.dtype, param.device, seed, center, half_range)
            if shard_id is None:
                param.weight_loader(param, fake)
            else:
                param.weight_loader(param, fake, shard_id)
    return LoadReport(bytes_read=0, seconds=time.perf_counter() - started, tensors=len(targets))
