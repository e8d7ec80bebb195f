"""The memory plan: per-rank bytes from the config alone equal what the serving model
builds (on the meta device, no weights); the balanced partition is the best one (checked
by brute force); `stageserve plan` works from a config.json alone, and the figures in
docs/memory.md are what it prints today."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from shared.config import ConfigError, ModelConfig, ParallelConfig
from stageserve.cli import main
from stageserve.launcher import choose_up_partition
from stage_worker.memory_plan import (
    MemorySettings,
    balanced_partition,
    default_partition,
    plan_partition,
    rank_bytes,
)
from shared.partition import even_layer_partition
from shared.sizes import format_size, parse_size
from stage_worker.distributed import TensorParallelGroup, get_tp_group, set_tp_group
from stage_worker.kv_cache import bytes_per_block
from stage_worker.models.registry import build_model
from tests.harness.processes import REPO

CONFIGS = REPO / "docs" / "model-configs"
GiB = 2**30


def _write_config(folder: Path, **overrides) -> Path:
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 12, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    base.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(base))
    return folder


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelConfig]:
    root = tmp_path_factory.mktemp("configs")
    folders = {
        # Every bias Llama can have, untied; vocab not a multiple of the padding.
        "llama-bias": _write_config(root / "llama-bias", attention_bias=True, mlp_bias=True),
        # qkv bias and tied embeddings.
        "qwen2-tied": _write_config(
            root / "qwen2-tied", architectures=["Qwen2ForCausalLM"], model_type="qwen2",
            tie_word_embeddings=True, use_sliding_window=False,
        ),
        "llama-3-8b": CONFIGS / "llama-3-8b",
        "llama-3-70b": CONFIGS / "llama-3-70b",
        # Experts on most layers, dense MLPs on two (mlp_only_layers): layers of two sizes.
        "qwen3-moe-mixed": _write_config(
            root / "qwen3-moe-mixed", architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
            head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            mlp_only_layers=[0, 5], norm_topk_prob=True,
        ),
        "mixtral": _write_config(
            root / "mixtral", architectures=["MixtralForCausalLM"], model_type="mixtral",
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        ),
        "qwen3-30b-a3b": CONFIGS / "qwen3-30b-a3b",
        "qwen3-235b-a22b": CONFIGS / "qwen3-235b-a22b",
    }
    return {name: ModelConfig.from_pretrained(folder) for name, folder in folders.items()}


@pytest.fixture
def restore_tp_group():
    previous = get_tp_group()
    yield
    set_tp_group(previous)


@pytest.mark.usefixtures("restore_tp_group")
@pytest.mark.parametrize(
    "name,partition,tp",
    [
        ("llama-bias", (12,), 1), ("llama-bias", (3, 5, 4), 2), ("llama-bias", (6, 6), 4),
        ("qwen2-tied", (12,), 2), ("qwen2-tied", (7, 5), 1), ("qwen2-tied", (2, 4, 6), 4),
        ("llama-3-8b", (8, 8, 8, 8), 2), ("llama-3-70b", (10,) * 8, 8),
        ("qwen3-moe-mixed", (12,), 1), ("qwen3-moe-mixed", (1, 5, 6), 2), ("qwen3-moe-mixed", (6, 6), 4),
        ("mixtral", (5, 7), 2), ("qwen3-30b-a3b", (20, 28), 2), ("qwen3-235b-a22b", (30, 30, 34), 4),
    ],
)
def test_stage_bytes_equal_the_model_built_on_meta(configs, name: str, partition: tuple[int, ...], tp: int) -> None:
    config = configs[name]
    settings = MemorySettings(dtype=torch.bfloat16, block_size=16)
    plan = plan_partition(config, len(partition), tp, partition, settings)
    parallel = ParallelConfig(num_stages=len(partition), tp_size=tp, layer_partition=partition)
    for stage in plan.stages:
        layout = parallel.stage_layout(stage.stage_index)
        assert (stage.first_layer, stage.last_layer) == (layout.first_layer, layout.last_layer)
        # The last rank holds the vocabulary's padding: it must weigh the same as rank 0.
        for rank in {0, tp - 1}:
            set_tp_group(TensorParallelGroup(None, rank, tp, "gloo"))
            model = build_model(config, layout, torch.bfloat16, torch.device("meta"))
            assert stage.weight_bytes == model.parameter_bytes(), (stage.stage_index, rank)
            assert stage.block_bytes == bytes_per_block(
                config, model.num_local_kv_heads, layout.num_layers, 16, torch.bfloat16
            )


def test_tied_embeddings_are_held_twice_across_stages(configs) -> None:
    config = configs["qwen2-tied"]
    settings = MemorySettings(dtype=torch.float32)
    rb = rank_bytes(config, 1, settings)
    assert rb.embedding == rb.lm_head > 0
    one = plan_partition(config, 1, 1, (12,), settings).stages[0]
    assert one.weight_bytes == rb.embedding + 12 * rb.decoder_layer + rb.final_norm
    first, last = plan_partition(config, 2, 1, (6, 6), settings).stages
    assert first.weight_bytes == rb.embedding + 6 * rb.decoder_layer
    assert last.weight_bytes == rb.lm_head + 6 * rb.decoder_layer + rb.final_norm


def _all_partitions(num_layers: int, pp: int):
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        bounds = (0, *cuts, num_layers)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("name", ["llama-bias", "qwen2-tied", "qwen3-moe-mixed"])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_balanced_partition_is_the_best_by_brute_force(configs, name: str, pp: int) -> None:
    config = configs[name]
    base = MemorySettings(dtype=torch.float32, max_num_batched_tokens=64, max_num_seqs=8)
    rb = rank_bytes(config, 1, base)
    # From barely fitting to plenty: at the tight end the embedding and lm_head stages
    # must give up layers, at the loose end the even split wins.
    smallest = (config.num_hidden_layers // pp + 1) * max(rb.layer_bytes) + rb.embedding + rb.lm_head + rb.activation
    improved = 0
    for factor in (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 6.0, 20.0):
        settings = MemorySettings(
            dtype=torch.float32, max_num_batched_tokens=64, max_num_seqs=8,
            device_bytes=int(smallest * factor), gpu_memory_utilization=1.0,
        )
        best = max(
            plan_partition(config, pp, 1, p, settings).pool_blocks  # type: ignore[type-var]
            for p in _all_partitions(config.num_hidden_layers, pp)
        )
        try:
            chosen = balanced_partition(config, pp, 1, settings)
        except ConfigError as exc:
            assert best == 0, f"refused although a partition gives {best} blocks: {exc}"
            continue
        pool = plan_partition(config, pp, 1, chosen, settings).pool_blocks
        even = plan_partition(config, pp, 1, even_layer_partition(config.num_hidden_layers, pp), settings).pool_blocks
        assert pool == best, (factor, chosen)
        assert pool >= even  # type: ignore[operator]
        improved += pool > even  # type: ignore[operator]
    if pp > 2:
        # (At pp=2 both stages carry one vocabulary matrix: the even split is always best.)
        assert improved > 0, "no memory size where balancing beats the even split: the check is too weak"


def test_llama3_shapes_balanced_vs_even(configs) -> None:
    """The figures docs/memory.md explains: at 80 GiB per GPU the even split is already the
    best for both shapes; with tighter memory the embedding and lm_head stages give up layers."""
    for name, pp, tight in (("llama-3-70b", 8, 24), ("llama-3-8b", 4, 8)):
        config = configs[name]
        even = even_layer_partition(config.num_hidden_layers, pp)
        roomy = MemorySettings(dtype=torch.bfloat16, device_bytes=80 * GiB)
        assert balanced_partition(config, pp, 1, roomy) == even
        settings = MemorySettings(dtype=torch.bfloat16, device_bytes=tight * GiB)
        chosen = balanced_partition(config, pp, 1, settings)
        assert chosen[0] < even[0] and chosen[-1] < even[-1]
        assert (plan_partition(config, pp, 1, chosen, settings).pool_blocks
                > plan_partition(config, pp, 1, even, settings).pool_blocks)


def test_default_partition_needs_a_shared_device_budget(configs) -> None:
    config = configs["llama-3-70b"]
    tight = MemorySettings(dtype=torch.bfloat16, device_bytes=24 * GiB)
    choice = default_partition(config, 8, 1, tight)
    assert choice.partition == balanced_partition(config, 8, 1, tight) != (10,) * 8
    assert "memory-balanced" in choice.reason
    unknown = default_partition(config, 8, 1, MemorySettings(dtype=torch.bfloat16))
    assert unknown.partition == (10,) * 8 and "unknown" in unknown.reason
    # A fixed KV budget: blocks depend only on the layer count, so the even split is best.
    fixed = MemorySettings(dtype=torch.bfloat16, device_bytes=24 * GiB, kv_cache_bytes=GiB)
    assert default_partition(config, 8, 1, fixed).partition == (10,) * 8


def test_up_gives_every_stage_one_partition(configs) -> None:
    folder = CONFIGS / "llama-3-70b"
    cpu = choose_up_partition(str(folder), 8, 1, "cpu", None, MemorySettings(dtype=torch.float32))
    assert cpu.partition == (10,) * 8
    gpu = choose_up_partition(
        str(folder), 8, 1, "cuda", None, MemorySettings(dtype=torch.bfloat16, device_bytes=24 * GiB)
    )
    assert gpu.partition == (9, 11, 11, 10, 10, 10, 10, 9)
    given = choose_up_partition(
        str(folder), 8, 1, "cuda", "10,10,10,10,10,10,10,10", MemorySettings(dtype=torch.bfloat16, device_bytes=GiB)
    )
    assert given.partition == (10,) * 8 and "given" in given.reason
    with pytest.raises(ConfigError, match="8 entries summing to the model's 80 layers"):
        choose_up_partition(str(folder), 8, 1, "cpu", "10,10", MemorySettings(dtype=torch.float32))


def test_a_model_that_does_not_fit_is_refused_clearly(configs) -> None:
    settings = MemorySettings(dtype=torch.bfloat16, device_bytes=16 * GiB)
    with pytest.raises(ConfigError, match=r"does not fit in 14\.40 GiB per rank at pp=4, tp=1.*more stages"):
        balanced_partition(configs["llama-3-70b"], 4, 1, settings)
    with pytest.raises(ConfigError, match="33 pipeline stages need at least 33 layers; the model has 32"):
        balanced_partition(configs["llama-3-8b"], 33, 1, settings)
    with pytest.raises(ConfigError, match="must be divisible by the tensor-parallel size"):
        rank_bytes(configs["llama-3-8b"], 3, settings)


def test_sizes() -> None:
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("4g") == 4 * GiB
    assert parse_size("1.5KiB") == 1536
    assert parse_size("123") == 123
    for bad in ("", "GiB", "80 GiBs", "-1GB", "1e9"):
        with pytest.raises(ConfigError, match="cannot read"):
            parse_size(bad)
    assert format_size(512) == "512 B"
    assert format_size(3 * GiB // 2) == "1.50 GiB"


def test_plan_command_reads_only_config_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "only-config")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert main(["plan", "--model", str(folder), "--pp", "3", "--tp", "2", "--gpu-memory", "1MiB",
                 "--max-num-batched-tokens", "32", "--layer-partition", "2,2,8"]) == 0
    out = capsys.readouterr().out
    assert "default (memory-balanced for 1.00 MiB per rank)" in out
    assert "given  --layer-partition 2,2,8" in out
    assert re.search(r"pool: \d+ blocks \(\d+ tokens\), limited by stage \d", out)
    assert main(["plan", "--model", str(folder), "--pp", "3", "--gpu-memory", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


def _documented_runs() -> list[tuple[str, str]]:
    """(command, output) for each `$ stageserve plan ...` block of docs/memory.md."""
    text = (REPO / "docs" / "memory.md").read_text()
    runs = []
    for block in re.findall(r"```text\n(\$ stageserve plan .*?)```", text, flags=re.S):
        command, _, output = block.partition("\n")
        runs.append((command[2:], output))
    return runs


def test_docs_show_what_plan_prints(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _documented_runs()
    shown = {tuple(shlex.split(c)[3:8:2]) for c, _ in runs}
    assert {("docs/model-configs/llama-3-70b", "8"), ("docs/model-configs/llama-3-8b", "4")} <= {s[:2] for s in shown}
    monkeypatch.chdir(REPO)
    for command, output in runs:
        assert main(shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == output, f"docs/memory.md is stale for: {command}"


def test_moe_layers_are_counted_by_kind(configs) -> None:
    """An MoE layer weighs its experts; dense layers of the same model weigh their MLP."""
    config = configs["qwen3-moe-mixed"]
    rb = rank_bytes(config, 2, MemorySettings(dtype=torch.float32))
    assert rb.layer_bytes[0] == rb.layer_bytes[5] == rb.decoder_layer
    assert all(rb.layer_bytes[i] == rb.moe_layer for i in config.moe_layers)
    assert config.moe_layers == (1, 2, 3, 4, 6, 7, 8, 9, 10, 11)
    big = configs["qwen3-235b-a22b"]
    assert (big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size) == (128, 8, 1536)
    rb = rank_bytes(big, 2, MemorySettings(dtype=torch.bfloat16))
    assert rb.moe_layer > 30 * rb.decoder_layer
    # 235B parameters in bf16, spread over pp x tp = 8 ranks, plus the padded vocabulary.
    plan = plan_partition(big, 4, 2, (24, 24, 23, 23), MemorySettings(dtype=torch.bfloat16))
    total = 2 * sum(st.weight_bytes for st in plan.stages)
    assert 235.0e9 * 2 < total < 235.2e9 * 2


def test_plan_refuses_an_moe_model_that_does_not_fit(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = ["plan", "--model", "docs/model-configs/qwen3-235b-a22b", "--pp", "4", "--gpu-memory", "80GiB"]
    assert main([*args, "--tp", "1"]) == 2
    assert "does not fit in 72.00 GiB per rank at pp=4, tp=1" in capsys.readouterr().err
    assert main([*args, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "94 layers (94 MoE: 128 experts, top 8)" in out and "MoE layer 2.32 GiB" in out
    assert re.search(r"pool: \d+ blocks", out)
