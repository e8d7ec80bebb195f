"""Qwen3, Qwen3-MoE and Mixtral against transformers (float32, CPU, gloo).

Tiny random checkpoints are written with transformers' own classes and `save_pretrained`
(which stores every expert under its own key, as Hub checkpoints do). Checked: the MoE block
alone against transformers' module at tp=1 and tp=2 (one all-reduce, or the caller's
reduce-scatter), whole models through the paged KV cache (models/test_model_core.py's
scenario) at several (pp, tp) layouts and with sequence parallelism, what each rank reads,
and the config keys refused at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from shared.config import ConfigError, ModelConfig, StageLayout
from stage_worker.distributed import TensorParallelGroup, get_tp_group, set_tp_group
from stage_worker.layers.fused_moe import fused_topk, sort_by_expert
from stage_worker.layers.sequence_parallel import reduce_scatter_tokens
from stage_worker.loader import load_weights, reference_checkpoint_shapes
from stage_worker.models.registry import build_model
from stage_worker.models.sparse_moe import SparseMoeBlock

from tests.harness.tp import run_tp
from tests.unit.test_model_core import COMMON, NUM_LAYERS, _assert_matches_hf, _save, run_scenario

pytestmark = pytest.mark.timeout(600)

NUM_EXPERTS = 8
TOP_K = 2


def _qwen3_config(**overrides):
    from transformers import Qwen3Config

    # head_dim 24 != hidden / heads (16): Qwen3's head_dim is its own.
    return Qwen3Config(**{**COMMON, "head_dim": 24, "tie_word_embeddings": True, **overrides})


def _qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    base = dict(
        COMMON, head_dim=24, moe_intermediate_size=32, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        # Layer 0 dense (intermediate_size 128), the others sparse, as the issue asks.
        mlp_only_layers=[0], norm_topk_prob=True,
    )
    return Qwen3MoeConfig(**{**base, **overrides})


def _mixtral_config(**overrides):
    from transformers import MixtralConfig

    base = dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    return MixtralConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("moe_ckpt")
    return {
        "qwen3": _save(_qwen3_config(), root, "qwen3"),
        # Sharded into several files: the loader picks per-expert keys out of an index.
        "qwen3_moe": _save(_qwen3_moe_config(), root, "qwen3_moe", max_shard_size="100KB"),
        "mixtral": _save(_mixtral_config(), root, "mixtral"),
    }


# ---------------------------------------------------------------- the MoE block alone


def _block_case(root: Path, kind: str, norm_topk_prob: bool) -> tuple[ModelConfig, torch.nn.Module]:
    """A ModelConfig (config.json only) and transformers' sparse block with random weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if kind == "qwen3_moe":
        hf_config = _qwen3_moe_config(norm_topk_prob=norm_topk_prob)
        hf_config.architectures = ["Qwen3MoeForCausalLM"]
        block_cls = Qwen3MoeSparseMoeBlock
    else:
        hf_config = _mixtral_config()
        hf_config.architectures = ["MixtralForCausalLM"]
        block_cls = MixtralSparseMoeBlock
    folder = root / f"{kind}-{norm_topk_prob}"
    hf_config.save_pretrained(str(folder))
    torch.manual_seed(3)
    block = block_cls(hf_config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return ModelConfig.from_pretrained(folder), block


def _load_block(ours: SparseMoeBlock, hf_block: torch.nn.Module) -> None:
    """Per-expert tensors, as a checkpoint holds them, through our weight loaders."""
    gate_up, down = hf_block.experts.gate_up_proj, hf_block.experts.down_proj  # [E, 2I, H], [E, H, I]
    inter = down.shape[-1]
    with torch.no_grad():
        ours.gate.weight.weight_loader(ours.gate.weight, hf_block.gate.weight.detach())
        for e in range(gate_up.shape[0]):
            w13, w2 = ours.experts.w13_weight, ours.experts.w2_weight
            w13.weight_loader(w13, gate_up[e, :inter].detach(), (e, "w1"))
            w13.weight_loader(w13, gate_up[e, inter:].detach(), (e, "w3"))
            w2.weight_loader(w2, down[e].detach(), (e, "w2"))


def run_block(root: str, kind: str, norm_topk_prob: bool, num_tokens: int, reduce_results: bool = True) -> dict:
    """Our block's output (reduced, or this rank's reduce-scattered shard) and transformers'."""
    config, hf_block = _block_case(Path(root) / f"rank{get_tp_group().rank}", kind, norm_topk_prob)
    ours = SparseMoeBlock(
        config, torch.float32, torch.device("cpu"), reduce_results=reduce_results,
        routing_weights_in_model_dtype=kind == "qwen3_moe",
    )
    _load_block(ours, hf_block)
    x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(num_tokens))
    with torch.no_grad():
        ref = hf_block(x[None])[0]  # [num_tokens, hidden]
        out = ours(x)
        if not reduce_results:
            out = reduce_scatter_tokens(out, num_tokens)
    return {"ours": out, "ref": ref}


@pytest.mark.parametrize(
    "kind,norm_topk_prob,num_tokens",
    # 3 tokens x top-2 of 8 experts: some experts get no token.
    [("qwen3_moe", True, 37), ("qwen3_moe", False, 3), ("mixtral", True, 37)],
)
def test_moe_block_matches_transformers(tmp_path: Path, kind: str, norm_topk_prob: bool, num_tokens: int) -> None:
    result = run_block(str(tmp_path), kind, norm_topk_prob, num_tokens)
    assert result["ref"].std() > 0.1
    assert (result["ours"] - result["ref"]).abs().max().item() < 1e-5


def test_routing_and_grouping() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.9]])
    weights, ids = fused_topk(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    assert ids.tolist() == [[1, 2], [0, 3]]
    assert torch.allclose(weights, probs.gather(1, ids))
    renormalized, _ = fused_topk(logits, 2, renormalize=True)
    assert torch.allclose(renormalized.sum(-1), torch.ones(2))
    order, counts = sort_by_expert(ids, 4)
    # Pairs are token * top_k + k: expert 0 <- (1, 0), 1 <- (0, 0), 2 <- (0, 1), 3 <- (1, 1).
    assert counts.tolist() == [1, 1, 1, 1] and order.tolist() == [2, 0, 1, 3]


# ---------------------------------------------------------------- whole models, one process


@pytest.mark.parametrize(
    "name,partition",
    [("qwen3", (NUM_LAYERS,)), ("qwen3", (1, 3)), ("qwen3_moe", (NUM_LAYERS,)), ("qwen3_moe", (1, 2, 1)),
     ("mixtral", (NUM_LAYERS,)), ("mixtral", (3, 1))],
)
def test_model_matches_transformers(checkpoints, name: str, partition: tuple[int, ...]) -> None:
    model_dir, hf_model = checkpoints[name]
    _assert_matches_hf(run_scenario(model_dir, partition), hf_model)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "mixtral"])
def test_checkpoint_keys_are_the_files_keys(checkpoints, name: str) -> None:
    """One stage wants exactly the keys save_pretrained wrote (per expert), which are also
    what the dummy loader takes from transformers; a middle stage only its layers'."""
    model_dir, _ = checkpoints[name]
    config = ModelConfig.from_pretrained(model_dir)
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        on_disk = set(json.loads(index.read_text())["weight_map"])
    else:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            on_disk = set(f.keys())
    single = build_model(config, StageLayout(0, 1, 0, NUM_LAYERS), torch.float32, torch.device("meta"))
    assert set(single.checkpoint_parameter_names()) == on_disk
    shapes = reference_checkpoint_shapes(config)
    assert set(single.checkpoint_parameter_names()) <= set(shapes)
    middle = build_model(config, StageLayout(1, 3, 1, 3), torch.float32, torch.device("meta"))
    assert set(middle.checkpoint_parameter_names()) == {
        k for k in on_disk if k.startswith(("model.layers.1.", "model.layers.2."))
    }
    if name != "qwen3":
        expert_keys = [k for k in on_disk if ".experts." in k]
        assert expert_keys and all(".experts.w13_weight" not in k for k in on_disk)


def test_dummy_weights_load_an_moe_stage(checkpoints) -> None:
    model_dir, _ = checkpoints["mixtral"]
    config = ModelConfig.from_pretrained(model_dir)
    model = build_model(config, StageLayout(1, 2, 2, NUM_LAYERS), torch.float32, torch.device("cpu"))
    report = load_weights(model, model_dir, load_format="dummy")
    assert report.tensors == len(model.checkpoint_targets())
    w13 = model.model.layers["2"].mlp.experts.w13_weight
    assert 0 < w13.abs().max() <= 1e-3


# ---------------------------------------------------------------- tensor parallel (one spawn)


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("moe_tp")
    dirs = {name: d for name, (d, _) in checkpoints.items()}
    return run_tp(2, _tp_worker, dirs, str(root))


def _tp_worker(dirs: dict[str, str], root: str) -> dict:
    out = {
        "block_qwen3_moe": run_block(root, "qwen3_moe", True, 37),
        "block_mixtral": run_block(root, "mixtral", True, 37),
        # Sequence parallelism: no all-reduce inside, the caller reduce-scatters 7 tokens (padded to 8).
        "block_sp": run_block(root, "qwen3_moe", False, 7, reduce_results=False),
        "qwen3_pp": run_scenario(dirs["qwen3"], (1, 3)),
        "qwen3_moe_pp": run_scenario(dirs["qwen3_moe"], (2, 2)),
        "mixtral": run_scenario(dirs["mixtral"], (NUM_LAYERS,)),
        "qwen3_moe_sp": run_scenario(dirs["qwen3_moe"], (NUM_LAYERS,), sequence_parallel=True),
    }
    config = ModelConfig.from_pretrained(dirs["qwen3_moe"])
    middle = build_model(config, StageLayout(1, 3, 1, 3), torch.float32, torch.device("cpu"))
    out["middle_bytes"] = load_weights(middle, dirs["qwen3_moe"]).bytes_read
    dist.barrier()
    return out


@pytest.mark.parametrize("key", ["block_qwen3_moe", "block_mixtral"])
def test_tp2_moe_block_matches_transformers(tp_results: list[dict], key: str) -> None:
    for result in tp_results:
        assert (result[key]["ours"] - result[key]["ref"]).abs().max().item() < 1e-5


def test_tp2_moe_block_reduce_scattered(tp_results: list[dict]) -> None:
    # 7 tokens padded to 8: rank 0 holds tokens 0-3, rank 1 tokens 4-6 and a zero row.
    ref = tp_results[0]["block_sp"]["ref"]
    shards = [r["block_sp"]["ours"] for r in tp_results]
    assert [s.shape[0] for s in shards] == [4, 4]
    assert (torch.cat(shards)[:7] - ref).abs().max().item() < 1e-5
    assert torch.count_nonzero(shards[1][3]) == 0


@pytest.mark.parametrize(
    "key,name", [("qwen3_pp", "qwen3"), ("qwen3_moe_pp", "qwen3_moe"), ("mixtral", "mixtral"), ("qwen3_moe_sp", "qwen3_moe")]
)
def test_tp2_model_matches_transformers(checkpoints, tp_results: list[dict], key: str, name: str) -> None:
    for result in tp_results:
        _assert_matches_hf(result[key], checkpoints[name][1])


def test_tp2_reads_half_of_every_expert(checkpoints, tp_results: list[dict]) -> None:
    """A middle stage (layers 1, 2: both sparse) at tp=2 reads half of every expert and of the
    attention, and all of the replicated gate and norms."""
    model_dir = Path(checkpoints["qwen3_moe"][0])
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    sharded = replicated = 0
    for key, file in weight_map.items():
        if not key.startswith(("model.layers.1.", "model.layers.2.")):
            continue
        with safe_open(str(model_dir / file), framework="pt") as f:
            numel = torch.Size(f.get_slice(key).get_shape()).numel()
        if key.endswith("norm.weight") or key.endswith("mlp.gate.weight"):
            replicated += numel * 4
        else:
            sharded += numel * 4
    assert [r["middle_bytes"] for r in tp_results] == [sharded // 2 + replicated] * 2


# ---------------------------------------------------------------- config keys


def _config_dir(tmp_path: Path, hf_config, **raw_overrides) -> Path:
    folder = tmp_path / "cfg"
    hf_config.save_pretrained(str(folder))
    data = json.loads((folder / "config.json").read_text())
    data.update(raw_overrides)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_moe_layers_follow_transformers(tmp_path: Path) -> None:
    """decoder_sparse_step and mlp_only_layers pick the same sparse layers as transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_config = _qwen3_moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    hf_config.architectures = ["Qwen3MoeForCausalLM"]
    config = ModelConfig.from_pretrained(_config_dir(tmp_path, hf_config))
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(hf_config)
    sparse = tuple(i for i, layer in enumerate(reference.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock))
    assert config.moe_layers == sparse == (1, 5)
    assert config.qk_norm and config.num_experts == NUM_EXPERTS and config.num_experts_per_tok == TOP_K


@pytest.mark.parametrize(
    "make,raw,match",
    [
        (_qwen3_config, {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        (_qwen3_moe_config, {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        (_qwen3_config, {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        (_qwen3_moe_config, {"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
        (_qwen3_moe_config, {"scoring_func": "sigmoid"}, "scoring_func"),
        (_mixtral_config, {"n_shared_experts": 1}, "n_shared_experts"),
        (_mixtral_config, {"routed_scaling_factor": 2.5}, "routed_scaling_factor"),
        (_qwen3_moe_config, {"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\)"),
        (_mixtral_config, {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unimplemented_keys_are_refused(tmp_path: Path, make, raw: dict, match: str) -> None:
    hf_config = make()
    hf_config.architectures = [
        {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[
            hf_config.model_type
        ]
    ]
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, hf_config, **raw))


def test_training_only_keys_are_accepted(tmp_path: Path) -> None:
    hf_config = _mixtral_config(router_jitter_noise=0.1, output_router_logits=True)
    hf_config.architectures = ["MixtralForCausalLM"]
    config = ModelConfig.from_pretrained(_config_dir(tmp_path, hf_config))
    assert config.norm_topk_prob and config.moe_layers == tuple(range(NUM_LAYERS))


@pytest.mark.usefixtures("fake_tp3")
def test_expert_size_must_divide_by_tp(checkpoints) -> None:
    config = ModelConfig.from_pretrained(checkpoints["mixtral"][0])
    # 48 / 3 = 16 fits; 4 heads / 3 do not, so check the expert layer on its own.
    from stage_worker.layers.fused_moe import FusedMoE

    FusedMoE(4, 2, 64, 48, torch.float32, torch.device("meta"))
    with pytest.raises(ConfigError, match=r"moe_intermediate_size \(32\).*tensor-parallel size \(3\)"):
        FusedMoE(4, 2, 64, 32, torch.float32, torch.device("meta"))
    assert config.moe_intermediate_size == 48


@pytest.fixture
def fake_tp3():
    previous = get_tp_group()
    set_tp_group(TensorParallelGroup(None, 0, 3, "gloo"))
    yield
    set_tp_group(previous)



# ---------------------------------------------------------------- sharded state


def test_sharded_state_round_trip(checkpoints, tmp_path: Path) -> None:
    """save-sharded at (pp, tp) = (2, 2) writes the stacked experts of each rank; loading
    them gives every rank exactly the parameters the HF folder's per-expert keys give."""
    from shared.config import ParallelConfig
    from stageserve.cli import main

    model_dir, _ = checkpoints["qwen3_moe"]
    out = tmp_path / "sharded"
    code = main(["save-sharded", "--model", model_dir, "--pp", "2", "--tp", "2", "--layer-partition", "1,3",
                 "--out", str(out)])
    assert code == 0
    parallel = ParallelConfig(num_stages=2, tp_size=2, layer_partition=(1, 3))
    previous = get_tp_group()
    try:
        for stage in range(2):
            for rank in range(2):
                set_tp_group(TensorParallelGroup(None, rank, 2, "gloo"))
                models = []
                for folder in (model_dir, out):
                    config = ModelConfig.from_pretrained(folder)
                    model = build_model(config, parallel.stage_layout(stage), torch.float32, torch.device("cpu"))
                    load_weights(model, folder)
                    models.append(dict(model.named_parameters()))
                hf_params, sharded_params = models
                assert hf_params.keys() == sharded_params.keys()
                assert all(torch.equal(hf_params[k], sharded_params[k]) for k in hf_params)
                if stage == 1:
                    assert hf_params["model.layers.2.mlp.experts.w13_weight"].shape == (NUM_EXPERTS, 2 * 16, 64)
    finally:
        set_tp_group(previous)
