"""`--load-format dummy` and the router without a tokenizer, on CPU.

A model folder holding only config.json: the dummy loader must make the same model in any
layout (each TP rank its own slice of one virtual checkpoint), which is checked against
transformers running the full dummy tensors; `stageserve up --load-format dummy` (pp=2,
tp=2) must serve prompt_token_ids end to end with empty text, refuse text prompts, stop
strings and Tokenize with FAILED_PRECONDITION, and carry the load generator's whole run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from shared.config import ConfigError, ModelConfig, StageLayout
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from stage_worker.loader import DUMMY_RANGE, DummyTensor, load_weights, reference_checkpoint_shapes
from stage_worker.models.registry import build_model
from stageserve.demo_model import _hf_config, _token_ids
from tests.harness.processes import REPO, ServingSystem

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 6
# The dummy model's logits are ~1e-2 apart; float32 rounding moves them by ~1e-7.
LOGPROB_TOL = 2e-5
PROMPTS = [[0, 17, 230, 41, 99], [0, 5, 301, 12, 640, 77, 3, 150, 9], [0, 42]]


def write_config_only(folder: Path, architecture: str = "LlamaForCausalLM") -> Path:
    """A model folder with config.json and nothing else: no weights, no tokenizer."""
    vocab_size, special_ids = _token_ids()
    config = _hf_config(
        architecture, vocab_size=vocab_size, special_ids=special_ids, num_layers=4, hidden_size=64,
        num_heads=4, num_kv_heads=2, intermediate_size=128, tie_word_embeddings=None, rope_scaling=None,
        max_position_embeddings=512, dtype="float32", initializer_range=0.02,
    )
    config.architectures = [architecture]  # save_pretrained of a model would set it
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


def dummy_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The whole virtual checkpoint the dummy loader slices from, as full float32 tensors."""
    shapes = reference_checkpoint_shapes(ModelConfig.from_pretrained(model_dir))
    return {
        key: DummyTensor(key, shape, torch.float32, torch.device("cpu"), center=1.0 if "norm" in key else 0.0)[:]
        for key, shape in shapes.items()
    }


def hf_dummy_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dummy_state_dict(model_dir), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[float], float]:
    """Greedy tokens, their logprobs, and the smallest top-2 logprob margin on the way."""
    ids = torch.tensor([prompt])
    tokens, lps, margin = [], [], float("inf")
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            top2 = torch.topk(lp, 2)
            margin = min(margin, float(top2.values[0] - top2.values[1]))
            tokens.append(int(top2.indices[0]))
            lps.append(float(top2.values[0]))
            ids = torch.cat([ids, top2.indices[:1].view(1, 1)], dim=1)
    return tokens, lps, margin


# ---- the loader, in process ---------------------------------------------------------------------


def test_dummy_tensor_slices_are_slices_of_one_tensor() -> None:
    a = DummyTensor("model.layers.0.mlp.up_proj.weight", (10, 7, 3), torch.float32, torch.device("cpu"), seed=5)
    full = a[:]
    assert full.shape == (10, 7, 3) and a.get_shape() == [10, 7, 3]
    assert torch.equal(a[2:6], full[2:6])
    assert torch.equal(a[:, 1:5], full[:, 1:5])
    assert torch.equal(a[3, ::2, -1], full[3, ::2, -1])
    assert torch.equal(a[..., 1], full[..., 1])
    # Same name and seed: the same values (another instance, as in another process); else others.
    assert torch.equal(DummyTensor(a.key, a.shape, torch.float32, "cpu", seed=5)[:], full)
    assert not torch.equal(DummyTensor(a.key, a.shape, torch.float32, "cpu", seed=6)[:], full)
    assert not torch.equal(DummyTensor("other", a.shape, torch.float32, "cpu", seed=5)[:], full)
    assert full.abs().max() <= DUMMY_RANGE and full.std() > DUMMY_RANGE / 3
    assert full.unique().numel() == full.numel()
    norm = DummyTensor("model.norm.weight", (64,), torch.bfloat16, "cpu", center=1.0)[:]
    assert norm.dtype == torch.bfloat16 and (norm.float() - 1).abs().max() <= 2 * DUMMY_RANGE


def test_dummy_load_reads_no_file_and_fills_every_parameter(tmp_path: Path) -> None:
    folder = write_config_only(tmp_path / "cfg", "Qwen2ForCausalLM")  # qkv biases, tied embeddings
    config = ModelConfig.from_pretrained(folder)
    model = build_model(config, StageLayout(0, 1, 0, config.num_hidden_layers), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--load-format dummy"):
        load_weights(model, folder)
    with pytest.raises(ConfigError, match="unknown load format 'random'"):
        load_weights(model, folder, load_format="random")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    report = load_weights(model, folder, load_format="dummy")
    assert report.bytes_read == 0 and report.tensors == len(model.checkpoint_targets())
    # Every parameter equals its slot of the full dummy checkpoint (fused q/k/v and gate/up included).
    full = dummy_state_dict(folder)
    params = dict(model.named_parameters())
    layer = "model.layers.1."
    for fused, parts in (("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                         ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"])):
        for kind in ("weight", "bias") if fused.endswith("qkv_proj") else ("weight",):
            expected = torch.cat([full[f"{layer}{part}.{kind}"] for part in parts])
            assert torch.equal(params[f"{layer}{fused}.{kind}"], expected)
    norm = layer + "post_attention_layernorm.weight"
    assert torch.equal(params[norm], full[norm])
    vocab = config.vocab_size
    assert torch.equal(params["model.embed_tokens.weight"][:vocab], full["model.embed_tokens.weight"])
    assert not any(torch.isnan(p).any() for p in model.parameters())


# ---- the whole system ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_only(tmp_path_factory.mktemp("dummy") / "llama-cfg")


@pytest.fixture(scope="module")
def system(config_only: Path):
    system = ServingSystem(config_only, 2, 2, "--load-format", "dummy", "--block-size", "8",
                           "--max-num-batched-tokens", "16")
    yield system
    system.stop()


def test_stages_report_their_parameters_and_read_nothing(system: ServingSystem, config_only: Path) -> None:
    shapes = reference_checkpoint_shapes(ModelConfig.from_pretrained(config_only))
    info = system.client.model_info()
    assert len(info.stages) == 2
    for stage in info.stages:
        with grpc.insecure_channel(stage.address) as channel:
            stage_info = pb_grpc.StageWorkerStub(channel).GetInfo(
                pb.GetInfoRequest(include_parameter_names=True), timeout=10
            )
        own = {k for k in shapes if k.startswith("model.layers.")
               and stage.first_layer <= int(k.split(".")[2]) < stage.last_layer}
        own |= {"model.embed_tokens.weight"} if stage.stage_index == 0 else {"model.norm.weight", "lm_head.weight"}
        assert set(stage_info.parameter_names) == own
        assert [r.tp_rank for r in stage_info.ranks] == [0, 1]
        assert all(r.bytes_read == 0 and r.parameter_bytes > 0 for r in stage_info.ranks)
        assert stage_info.state == pb.STAGE_STATE_SERVING and not stage_info.sharded_state
    assert "has no tokenizer" in system.log_path.read_text(errors="replace")


def test_token_ids_are_served_with_the_dummy_model(system: ServingSystem, config_only: Path) -> None:
    reference = hf_dummy_model(config_only)
    for prompt in PROMPTS:
        tokens, lps, margin = hf_greedy(reference, prompt, NEW_TOKENS)
        assert margin > 1e-5, "a near tie: pick another prompt"
        result = system.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, timeout=120)
        assert result.finish_reason == "length" and result.error_message == ""
        assert result.token_ids == tokens
        assert result.text == ""
        got = [lp.logprob for lp in result.logprobs]
        assert max(abs(a - b) for a, b in zip(got, lps)) < LOGPROB_TOL, (got, lps)


def test_what_needs_a_tokenizer_is_refused(system: ServingSystem) -> None:
    client = system.client
    for prompt, sampling in (("hello", {}), ([0, 5, 6], {"stop": ["x"]})):
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt, max_new_tokens=2, timeout=30, **sampling)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has no tokenizer" in err.value.details() and "send prompt_token_ids" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.tokenize("hello")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "has no tokenizer" in err.value.details()
    # Still serving token ids afterwards.
    assert len(client.generate([0, 5, 6], max_new_tokens=2, ignore_eos=True, timeout=60).token_ids) == 2


def test_load_generator_reports_everything(system: ServingSystem, config_only: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    concurrency, requests, output_len = 3, 6, 4
    cmd = [
        sys.executable, "benchmarks/load_generator.py", "--addr", system.address, "--concurrency", str(concurrency),
        "--requests", str(requests), "--prompt-len", "6-10", "--output-len", str(output_len),
        "--measure-bandwidth", "--bandwidth-mib", "8", "--hf-baseline", str(config_only), "--json", str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    report = json.loads(out.read_text())
    load = report["load"]
    assert load["failed"] == 0 and load["output_tokens"] == requests * output_len
    assert load["tpot_p50_ms"] > 0 and load["ttft_p99_ms"] >= load["ttft_p50_ms"] > 0
    layout = report["layout"]
    assert (layout["pp"], layout["tp"], layout["dtype"]) == (2, 2, "float32")
    # The roofline is the sum of the stages' (weights + KV at the mean context) over the copy rate.
    roof = report["roofline"]
    assert roof["copy_bytes_per_s"] > 0 and roof["mean_context"] == 8 + output_len / 2
    expected = 0.0
    for stage in layout["stages"]:
        kv = stage["kv_block_bytes"] / layout["block_size"] * concurrency * roof["mean_context"]
        expected += (stage["weight_bytes"] + kv) / roof["copy_bytes_per_s"]
    assert roof["tpot_ms"] == pytest.approx(expected * 1e3)
    assert roof["tok_s"] == pytest.approx(concurrency / expected)
    assert "in series" in roof["note"]
    hf = report["transformers"]
    assert "error" not in hf, hf.get("error")
    assert hf["weights"] == "random (config.json only)" and hf["tokens_made"] == concurrency * output_len
    assert (hf["batch"], hf["prompt_len"], hf["output_len"]) == (concurrency, 8, output_len)
    assert hf["tok_s"] > 0 and hf["ttft_ms"] > 0 and hf["tpot_ms"] > 0
    ratios = report["ratios"]
    assert ratios["tok_s_vs_transformers"] == pytest.approx(load["output_tok_s"] / hf["tok_s"])
    assert ratios["tok_s_vs_roofline"] == pytest.approx(load["output_tok_s"] / roof["tok_s"])
    assert ratios["tpot_p50_vs_roofline"] == pytest.approx(roof["tpot_ms"] / load["tpot_p50_ms"])
    assert report["machine"]["torch"] == torch.__version__ and report["date"] and report["args"]["concurrency"] == 3
    assert "| output_tok_s |" in run.stdout


def test_load_generator_splits_the_streams_over_client_processes(system: ServingSystem, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    requests, output_len = 5, 3
    cmd = [
        sys.executable, "benchmarks/load_generator.py", "--addr", system.address, "--concurrency", "3",
        "--requests", str(requests), "--prompt-len", "4", "--output-len", str(output_len), "--client-processes", "2",
        "--warmup-requests", "0", "--json", str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    load = json.loads(out.read_text())["load"]
    # Every request of every process is counted once, over one wall clock.
    assert load["client_processes"] == 2 and load["failed"] == 0
    assert load["output_tokens"] == requests * output_len and load["wall_s"] > 0
    assert load["output_tok_s"] == pytest.approx(load["output_tokens"] / load["wall_s"])


def test_up_with_a_prompt_needs_a_tokenizer(config_only: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "up", "--model", str(config_only), "--load-format", "dummy",
         "--device", "cpu", "--prompt", "hello"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "--prompt needs a tokenizer" in run.stderr and str(config_only) in run.stderr
    assert "serving" not in run.stdout
