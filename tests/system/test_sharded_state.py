"""The sharded-state format: `stageserve save-sharded` writes one file set per stage x TP
rank; a rank reads only its own files (counted through instrumented file reads); serving
the folder gives the same greedy output as serving the Hugging Face folder it came from;
another layout is refused with the layout the folder holds. The memory report that
GetModelInfo returns is checked against the plan's arithmetic on the way.

The model is Qwen2-shaped (tied embeddings, qkv bias), so the last stage's copy of the
tied matrix goes through the format too; the partition 1,3 is uneven on purpose.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from shared.config import ConfigError, ModelConfig, ParallelConfig
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from shared.sharded_state import METADATA_FILE, read_sharded_state
from stage_worker import loader
from stage_worker.distributed import TensorParallelGroup, get_tp_group, set_tp_group
from stage_worker.loader import load_weights
from stage_worker.memory_plan import MemorySettings, plan_partition
from stage_worker.models.registry import build_model
from stageserve.cli import main
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import ServingSystem

pytestmark = pytest.mark.timeout(300)

PP, TP, PARTITION = 2, 2, (1, 3)
SHARD_LIMIT = 40_000
SIDE_FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
              "tokenizer_config.json"]
PROMPTS = [[0, 17, 230, 41, 99], [0] + list(range(40, 77)), [0, 5, 6]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    hf = write_tiny_model(root / "hf", "Qwen2ForCausalLM", seed=3)
    out = root / "sharded"
    code = main(["save-sharded", "--model", str(hf), "--pp", str(PP), "--tp", str(TP), "--layer-partition",
                 ",".join(map(str, PARTITION)), "--out", str(out), "--max-shard-size", f"{SHARD_LIMIT}B"])
    assert code == 0
    return hf, out


@pytest.fixture
def rank_of():
    """Sets this process's TP position for building one rank's model; restores it after."""
    previous = get_tp_group()

    def place(rank: int) -> None:
        set_tp_group(TensorParallelGroup(None, rank, TP, "gloo"))

    yield place
    set_tp_group(previous)


def _rank_model(folder: Path, stage: int) -> torch.nn.Module:
    parallel = ParallelConfig(num_stages=PP, tp_size=TP, layer_partition=PARTITION)
    config = ModelConfig.from_pretrained(folder)
    return build_model(config, parallel.stage_layout(stage), torch.float32, torch.device("cpu"))


def test_save_sharded_writes_one_file_set_per_rank(folders) -> None:
    hf, out = folders
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["format"], meta["version"]) == ("stageserve-sharded-state", 1)
    assert (meta["pp"], meta["tp"], meta["layer_partition"], meta["dtype"]) == (PP, TP, list(PARTITION), "float32")
    assert meta["source"] == str(hf.resolve()) and meta["architecture"] == "Qwen2ForCausalLM"
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    assert not (out / "model.safetensors").exists()
    state = read_sharded_state(out)
    assert state is not None and read_sharded_state(hf) is None
    listed = sorted(f for s in state.shards for f in s.files)
    assert listed == sorted(p.name for p in out.glob("*.safetensors"))
    assert {(s.stage_index, s.tp_rank) for s in state.shards} == {(s, r) for s in range(PP) for r in range(TP)}
    from safetensors import safe_open

    for shard in state.shards:
        assert len(shard.files) > 1, "the size limit should split every rank's tensors"
        for name in shard.files:
            with safe_open(str(out / name), "pt") as f:
                sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
            assert nbytes <= SHARD_LIMIT or len(sizes) == 1


def _counting_safe_open(counts: dict[str, int]) -> Any:
    real = loader.safe_open

    class Slice:
        def __init__(self, inner: Any, path: str) -> None:
            self.inner, self.path = inner, path

        def get_shape(self) -> list[int]:
            return self.inner.get_shape()

        def get_dtype(self) -> str:
            return self.inner.get_dtype()

        def __getitem__(self, index: Any) -> torch.Tensor:
            tensor = self.inner[index]
            counts[self.path] += tensor.numel() * tensor.element_size()
            return tensor

    class Opened:
        def __init__(self, path: str, **kwargs: Any) -> None:
            self.path = path
            self.inner = real(path, **kwargs)

        def __enter__(self) -> "Opened":
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_slice(self, key: str) -> Slice:
            return Slice(self.inner.get_slice(key), self.path)

        def get_tensor(self, key: str) -> torch.Tensor:
            tensor = self.inner.get_tensor(key)
            counts[self.path] += tensor.numel() * tensor.element_size()
            return tensor

    return Opened


class _CountingFile:
    """A file object whose reads add the bytes they return to counts[path]."""

    def __init__(self, inner: Any, path: str, counts: dict[str, int]) -> None:
        self._inner, self._path, self._counts = inner, path, counts

    def read(self, *args: Any) -> Any:
        data = self._inner.read(*args)
        self._counts[self._path] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer)
        self._counts[self._path] += n or 0
        return n

    def __enter__(self) -> "_CountingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        if name in ("readline", "readlines", "readall", "__iter__", "__next__", "fileno", "mmap"):
            raise AssertionError(f"file read through {name}, which this test does not count")
        return getattr(self._inner, name)


def _instrument_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and "r" in mode:
            return _CountingFile(f, str(Path(file).resolve()), counts)
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    # Reads the safetensors library does itself (mmap, invisible to Python) are counted
    # where the loader asks for tensors.
    monkeypatch.setattr(loader, "safe_open", _counting_safe_open(counts))
    return counts


def test_each_rank_reads_only_its_own_share(folders, rank_of, monkeypatch: pytest.MonkeyPatch) -> None:
    """(pp, tp) = (2, 2): what each rank reads, from the sharded folder and from the HF one."""
    hf, out = folders
    state = read_sharded_state(out)
    assert state is not None
    for stage in range(PP):
        for rank in range(TP):
            rank_of(rank)
            from_hf = _rank_model(hf, stage)
            from_sharded = _rank_model(out, stage)
            own = from_sharded.parameter_bytes()
            with monkeypatch.context() as m:
                counts = _instrument_reads(m)
                report = load_weights(from_sharded, out)
            files = {str((out / f).resolve()) for f in state.shard(stage, rank).files}
            weight_reads = {p: n for p, n in counts.items() if p.endswith(".safetensors")}
            assert set(weight_reads) == files, f"stage {stage} rank {rank} read other files"
            for path in files:
                assert weight_reads[path] == os.path.getsize(path), "each own file is read once, whole"
            total = sum(counts.values())
            # Its own parameters, plus the safetensors headers and the metadata file.
            assert own <= total <= own + 16 * 1024, (stage, rank, total, own)
            assert report.bytes_read == sum(weight_reads.values())

            with monkeypatch.context() as m:
                counts = _instrument_reads(m)
                load_weights(from_hf, hf)
            hf_total = sum(counts.values())
            # Slices only: never more than the rank's parameters (padding is not read).
            assert 0.5 * own < hf_total <= own, (stage, rank, hf_total, own)
            # The shards hold exactly what slicing the HF checkpoint gives.
            hf_params = dict(from_hf.named_parameters())
            for name, param in from_sharded.named_parameters():
                assert torch.equal(param, hf_params[name]), name


def _serve(folder: Path, *extra: str) -> dict[str, Any]:
    system = ServingSystem(
        folder, PP, TP, *extra, "--max-num-batched-tokens", "32", "--block-size", "8",
        "--kv-cache-bytes", str(2**20),
    )
    try:
        outputs = [
            system.client.generate(p, max_new_tokens=12, ignore_eos=True, logprobs=1, timeout=120) for p in PROMPTS
        ]
        info = system.client.model_info()
        stage_infos = []
        for stage in info.stages:
            with grpc.insecure_channel(stage.address) as channel:
                stage_infos.append(pb_grpc.StageWorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10))
    finally:
        code = system.stop()
    assert code == 0, system.log()
    return {"outputs": outputs, "info": info, "stages": stage_infos}


def test_round_trip_serves_the_same_greedy_output(folders) -> None:
    hf, out = folders
    from_hf = _serve(hf, "--layer-partition", "1,3")
    from_sharded = _serve(out)
    for a, b in zip(from_hf["outputs"], from_sharded["outputs"]):
        assert len(a.token_ids) == 12
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-5

    config = ModelConfig.from_pretrained(hf)
    plan = plan_partition(config, PP, TP, PARTITION, MemorySettings(dtype=torch.float32, block_size=8))
    state = read_sharded_state(out)
    for served, sharded in ((from_hf, False), (from_sharded, True)):
        info = served["info"]
        assert [(s.first_layer, s.last_layer) for s in info.stages] == [(0, 1), (1, 4)]
        # A fixed KV budget: the stage with three layers has the fewest blocks.
        assert [s.limits_pool for s in info.stages] == [False, True]
        assert info.num_kv_blocks == info.stages[1].kv_blocks < info.stages[0].kv_blocks
        for stage, stage_plan, stage_info in zip(info.stages, plan.stages, served["stages"]):
            # The real server agrees with the plan's arithmetic.
            assert stage.weight_bytes == stage_plan.weight_bytes
            assert stage.kv_block_bytes == stage_plan.block_bytes
            assert stage.kv_bytes == info.num_kv_blocks * stage.kv_block_bytes
            assert stage_info.profile.weight_bytes == stage.weight_bytes
            assert stage_info.profile.num_blocks == stage.kv_blocks
            assert stage_info.kv_cache_bytes == TP * stage.kv_bytes
            assert stage_info.sharded_state is sharded
            for rank in stage_info.ranks:
                if sharded:
                    files = state.shard(stage.stage_index, rank.tp_rank).files
                    assert rank.bytes_read == sum(os.path.getsize(out / f) for f in files)
                else:
                    assert rank.bytes_read <= stage.weight_bytes


def test_another_layout_is_refused_with_the_folders_layout(
    folders, rank_of, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = folders
    holds = "holds a sharded state for pp=2, tp=2, layer partition [1, 3]"
    # A stage started alone (compose) with another partition.
    code = main(["stage", "--model", str(out), "--stage-index", "0", "--num-stages", "2", "--tp", "2",
                 "--layer-partition", "2,2", "--port", "1", "--rendezvous", "127.0.0.1:1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert holds in err and "cannot be served with pp=2, tp=2, layer partition [2, 2]" in err
    assert "--pp 2 --tp 2 --layer-partition 1,3" in err
    # `up` with another TP size stops before starting anything.
    with pytest.raises(RuntimeError) as exc:
        ServingSystem(out, 2, 1, startup_timeout=60)
    assert holds in str(exc.value) and "cannot be served with pp=2, tp=1" in str(exc.value)
    # A rank that got that far anyway.
    rank_of(0)
    config = ModelConfig.from_pretrained(out)
    wrong = ParallelConfig(num_stages=2, tp_size=2, layer_partition=(2, 2))
    model = build_model(config, wrong.stage_layout(0), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"layer partition \[1, 3\].*stage 0 of 2 owning layers \[0, 2\)"):
        load_weights(model, out)


def test_bad_folders_are_named(folders, rank_of, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf, out = folders
    assert main(["save-sharded", "--model", str(hf), "--pp", "2", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["save-sharded", "--model", str(out), "--pp", "2", "--out", str(tmp_path / "again")]) == 2
    assert "already a sharded state" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    state = read_sharded_state(broken)
    assert state is not None
    lost = state.shard(1, 1).files[-1]
    (broken / lost).unlink()
    rank_of(1)
    with pytest.raises(ConfigError, match=f"lacks {lost} \\(stage 1, TP rank 1\\)"):
        load_weights(_rank_model(broken, 1), broken)
