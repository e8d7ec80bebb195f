"""Quantized checkpoints: block-wise FP8 served right, everything else refused at start-up.

* config.json's quantization_config: AWQ, GPTQ (also as AutoGPTQ's side file), bitsandbytes,
  compressed-tensors, per-tensor or static FP8 are refused with one message naming the
  method and what is supported; by ModelConfig, `plan`, `save-sharded` and `up` (which
  exits non-zero before starting anything).
* A stray tensor (a `*_scale` in a plain checkpoint) and an FP8 tensor where config.json
  declares none are refused by the stage that answers for them before any weight is read.
* The FP8 linear layers hold FP8 values and their block scales and slice them together
  under TP (partial last blocks, fused q/k/v and gate/up members, row- and column-parallel);
  a split through a block is refused at construction, naming the layer and the sizes.
* End to end through `stageserve up` at (pp, tp) in {(1, 1), (2, 2)}: greedy tokens and
  logprobs of the FP8 folder equal transformers' on the dequantized float32 folder (written
  by tests/harness/fp8_checkpoint.py, independently of the serving code), and each stage reports
  the weight bytes of FP8 values plus scales, as `plan` computes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shared.config import ConfigError, ModelConfig
from shared.quantization import QuantizationConfig
from stage_worker.distributed import TensorParallelGroup, get_tp_group, set_tp_group
from stage_worker.layers.block_fp8 import dequantize_block_fp8, quantize_block_fp8
from stage_worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from stage_worker.memory_plan import MemorySettings, plan_partition
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO, ServingSystem, free_port
from tests.harness.reference import assert_matches_reference, hf_greedy
from tests.harness.fp8_checkpoint import dequantize_blocks, quantize_blocks, write_tiny_fp8_pair

pytestmark = pytest.mark.timeout(600)

FP8 = QuantizationConfig("fp8", (128, 128))

REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "'awq'"),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "'gptq'"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "'compressed-tensors'"),
    "fp8-per-tensor": ({"quant_method": "fp8", "activation_scheme": "static"}, "per-tensor"),
    "fp8-static": ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    "fp8-unknown-key": ({"quant_method": "fp8", "weight_block_size": [128, 128], "kv_cache_scheme": "fp8"}, "kv_cache_scheme"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("plain") / "llama", "LlamaForCausalLM", seed=3)


def _with_quantization(tiny: Path, folder: Path, quant: dict) -> Path:
    import shutil

    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_quantization_is_refused_by_the_config(tiny: Path, tmp_path: Path, name: str) -> None:
    quant, named = REFUSED[name]
    folder = _with_quantization(tiny, tmp_path / name, quant)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(folder)
    message = str(info.value)
    assert named in message and "stageserve serves fp8 with weight_block_size" in message


def test_gptq_side_file_is_refused(tiny: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(tiny, folder)
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(ConfigError, match="GPTQ"):
        ModelConfig.from_pretrained(folder)


def test_block_fp8_config_is_read(tiny: Path, tmp_path: Path) -> None:
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
             "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.*"]}
    config = ModelConfig.from_pretrained(_with_quantization(tiny, tmp_path / "fp8", quant))
    assert config.quantization is not None and config.quantization.weight_block_size == (128, 128)
    assert config.quantization.is_quantized("model.layers.0.mlp.down_proj")
    assert not config.quantization.is_quantized("model.layers.1.mlp.down_proj")
    assert not config.quantization.is_quantized("lm_head")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stageserve.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("name,commands", [("awq", ("up", "plan", "save-sharded")), ("gptq", ("up",))])
def test_commands_refuse_before_starting_anything(tiny: Path, tmp_path: Path, name: str, commands: tuple[str, ...]) -> None:
    folder = _with_quantization(tiny, tmp_path / name, REFUSED[name][0])
    argv = {
        "up": ["up", "--model", str(folder), "--pp", "2", "--device", "cpu", "--port", str(free_port())],
        "plan": ["plan", "--model", str(folder), "--pp", "2", "--tp", "1"],
        "save-sharded": ["save-sharded", "--model", str(folder), "--pp", "2", "--tp", "1", "--out", str(tmp_path / "out")],
    }
    for args in (argv[c] for c in commands):
        done = _cli(*args)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        assert f"quantization method '{name}'" in done.stderr and "fp8 with weight_block_size" in done.stderr, done.stderr
        # `up` refused before any stage (or rank) was started: nothing was loaded.
        assert "loading" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


def test_stray_scale_tensor_is_refused_by_its_stage(tiny: Path, tmp_path: Path) -> None:
    """The stage answering for layer 3 (the last of two) names the tensor, before any value
    is read; the other stage does not answer for it. (`up` turns a stage's ConfigError into
    its exit status and message: the AWQ case above goes that way.)"""
    import shutil

    from shared.config import StageLayout
    from stage_worker.loader import load_weights
    from stage_worker.models.registry import build_model

    folder = tmp_path / "stray"
    shutil.copytree(tiny, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.3.mlp.down_proj.weight_scale"] = torch.ones(())
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = ModelConfig.from_pretrained(folder)
    first = build_model(config, StageLayout(0, 2, 0, 2), torch.float32, torch.device("cpu"))
    load_weights(first, folder)
    last = build_model(config, StageLayout(1, 2, 2, 4), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError) as info:
        load_weights(last, folder)
    message = str(info.value)
    assert "model.layers.3.mlp.down_proj.weight_scale" in message and "no parameter" in message
    assert "declares no quantization_config" in message


def test_fp8_values_without_a_declared_quantization_are_refused(tiny: Path, tmp_path: Path) -> None:
    import shutil

    from shared.config import StageLayout
    from stage_worker.loader import load_weights
    from stage_worker.models.registry import build_model

    folder = tmp_path / "undeclared"
    shutil.copytree(tiny, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = ModelConfig.from_pretrained(folder)
    model = build_model(config, StageLayout(0, 2, 0, 2), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)
    with pytest.raises(ConfigError, match=r"up_proj.weight is stored as F8_E4M3"):
        load_weights(model, folder)
    # Refused from the file headers, before any value was copied in.
    assert all(bool((p == 7.0).all()) for p in model.parameters())


# ---- the FP8 linear layers ---------------------------------------------------------------------


class _Rank:
    """Builds layers as TP rank `rank` of `size` (loading needs no collective)."""

    def __init__(self, rank: int, size: int) -> None:
        self.group = TensorParallelGroup(None, rank, size, "gloo")

    def __enter__(self) -> None:
        self.previous = get_tp_group()
        set_tp_group(self.group)

    def __exit__(self, *exc: object) -> None:
        set_tp_group(self.previous)


def _quantized(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    values, scale_inv = quantize_blocks(weight)
    return values, scale_inv, dequantize_blocks(values, scale_inv)


def test_project_quantizer_matches_the_layout() -> None:
    values, scale_inv, dequantized = _quantized(200, 300, 0)
    ours, our_scales = quantize_block_fp8(dequantized, (128, 128))
    assert our_scales.shape == scale_inv.shape == (2, 3)
    assert torch.allclose(our_scales, scale_inv, rtol=1e-6)
    assert torch.equal(dequantize_block_fp8(values, scale_inv, (128, 128), torch.float32), dequantized)


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_layers_slice_values_and_scales_together(tp: int) -> None:
    torch.manual_seed(0)
    hidden, head, heads, kv_heads, inter = 256, 128, 4, 2, 384 if tp == 1 else 512
    q, k, v = (_quantized(n * head, hidden, s) for n, s in ((heads, 1), (kv_heads, 2), (kv_heads, 3)))
    gate, up = _quantized(inter, hidden, 4), _quantized(inter, hidden, 5)
    down = _quantized(hidden, inter, 6)
    x = torch.randn(5, hidden)
    h = torch.randn(5, inter)
    qkv_out, gate_up_out, down_out = [], [], torch.zeros(5, hidden)
    for rank in range(tp):
        with _Rank(rank, tp):
            qkv = QKVParallelLinear(hidden, head, heads, kv_heads, False, torch.float32, torch.device("cpu"),
                                    quant_config=FP8, prefix="l.qkv_proj")
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], False, torch.float32, torch.device("cpu"),
                                                 quant_config=FP8, prefix="l.gate_up_proj")
            row = RowParallelLinear(inter, hidden, False, torch.float32, torch.device("cpu"), reduce_results=False,
                                    quant_config=FP8, prefix="l.down_proj")
        assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale_inv.dtype == torch.float32
        for layer, parts in ((qkv, {"q": q, "k": k, "v": v}), (gate_up, {0: gate, 1: up})):
            for shard_id, (values, scale_inv, _) in parts.items():
                layer.weight_loader(layer.weight, values, shard_id)
                layer.weight_loader(layer.weight_scale_inv, scale_inv, shard_id)
        row.weight_loader(row.weight, down[0])
        row.weight_loader(row.weight_scale_inv, down[1])
        with torch.no_grad():
            local_qkv = qkv(x)  # [5, local q | local k | local v]
            qkv_out.append(local_qkv.split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1))
            gate_up_out.append(gate_up(x).split([inter // tp] * 2, dim=-1))
            down_out += row(h[:, rank * inter // tp : (rank + 1) * inter // tp])
    for i, (_, _, full) in enumerate((q, k, v)):
        assert torch.allclose(torch.cat([part[i] for part in qkv_out], dim=-1), F.linear(x, full), atol=1e-4)
    for i, (_, _, full) in enumerate((gate, up)):
        assert torch.allclose(torch.cat([part[i] for part in gate_up_out], dim=-1), F.linear(x, full), atol=1e-4)
    assert torch.allclose(down_out, F.linear(h, down[2]), atol=1e-3)


def test_partial_last_blocks_at_tp1() -> None:
    values, scale_inv, full = _quantized(200, 300, 7)
    with _Rank(0, 1):
        row = RowParallelLinear(300, 200, False, torch.float32, torch.device("cpu"), quant_config=FP8, prefix="x")
    assert tuple(row.weight_scale_inv.shape) == (2, 3)
    row.weight_loader(row.weight, values)
    row.weight_loader(row.weight_scale_inv, scale_inv)
    x = torch.randn(3, 300)
    with torch.no_grad():
        assert torch.allclose(row(x), F.linear(x, full), atol=1e-4)


def test_split_through_a_block_is_refused_at_construction() -> None:
    with _Rank(0, 2), pytest.raises(ConfigError) as info:
        # 2 kv heads of 64 at tp=2: each rank's k part is 64 rows, half a 128-row block.
        QKVParallelLinear(256, 64, 4, 2, False, torch.float32, torch.device("cpu"), quant_config=FP8,
                          prefix="model.layers.0.self_attn.qkv_proj")
    assert "model.layers.0.self_attn.qkv_proj" in str(info.value) and "[128, 64, 64]" in str(info.value)
    with _Rank(0, 4), pytest.raises(ConfigError, match=r"down_proj: this rank's 192 input columns"):
        RowParallelLinear(768, 256, False, torch.float32, torch.device("cpu"), quant_config=FP8,
                          prefix="model.layers.0.mlp.down_proj")


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_fp8_pair(tmp_path_factory.mktemp("fp8"))


PROMPTS = [[0, 17, 230, 41, 99, 5, 301, 12], [0, 42, 7]]
NEW_TOKENS = 12


@pytest.mark.parametrize("pp,tp", [(1, 1), (2, 2)])
def test_fp8_checkpoint_end_to_end_equals_transformers_on_dequantized_weights(
    fp8_pair: tuple[Path, Path], pp: int, tp: int
) -> None:
    fp8_dir, dequantized_dir = fp8_pair
    refs = [hf_greedy(dequantized_dir, prompt, NEW_TOKENS) for prompt in PROMPTS]
    system = ServingSystem(fp8_dir, pp, tp)
    try:
        for prompt, ref in zip(PROMPTS, refs):
            got = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True, timeout=240)
            steps, _ = assert_matches_reference(got, ref, tol=2e-3)
            assert steps >= NEW_TOKENS // 2
        info = system.client.model_info()
        config = ModelConfig.from_pretrained(fp8_dir)
        plan = plan_partition(config, pp, tp, tuple(s.last_layer - s.first_layer for s in info.stages),
                              MemorySettings(dtype=torch.float32))
        for stage, planned in zip(info.stages, plan.stages):
            # Reported by the stage from its parameters, per rank: FP8 values and their scales.
            assert stage.weight_bytes == planned.weight_bytes
    finally:
        system.stop()


def test_save_sharded_keeps_fp8_values_and_scales(fp8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from shared.config import ParallelConfig
    from stage_worker.loader import load_weights
    from stage_worker.models.registry import build_model
    from stage_worker.save_sharded import SaveShardedConfig, save_sharded

    fp8_dir, _ = fp8_pair
    parallel = ParallelConfig(num_stages=2, tp_size=2, layer_partition=(2, 2))
    save_sharded(SaveShardedConfig(str(fp8_dir), str(tmp_path / "sharded"), parallel))
    config = ModelConfig.from_pretrained(fp8_dir)
    for stage in range(2):
        for rank in range(2):
            with _Rank(rank, 2):
                direct = build_model(config, parallel.stage_layout(stage), torch.float32, torch.device("cpu"))
                sharded = build_model(config, parallel.stage_layout(stage), torch.float32, torch.device("cpu"))
            load_weights(direct, fp8_dir)
            load_weights(sharded, tmp_path / "sharded")
            got = dict(sharded.named_parameters())
            for name, param in direct.named_parameters():
                assert got[name].dtype == param.dtype
                assert torch.equal(got[name].view(torch.uint8) if param.dtype == torch.float8_e4m3fn else got[name],
                                   param.view(torch.uint8) if param.dtype == torch.float8_e4m3fn else param), name
            assert any(p.dtype == torch.float8_e4m3fn for p in got.values())
