"""The built-in demo tokenizer and tiny checkpoints load and run in transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shared.config import SUPPORTED_ARCHITECTURES, ConfigError
import stageserve.demo_model as demo_model
from stageserve.demo_model import build_tokenizer, ensure_demo_model, write_tiny_model

MULTI_BYTE_TEXT = "Le café était fermé. 東京は日本の首都です。 Привет 🙂🚀 👩‍💻 naïve 123 xyzzy"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def test_tokenizer_files_and_determinism(tokenizer_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    assert 400 <= vocab <= 1000


def test_tokenizer_round_trips_multi_byte_text(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    enc = tok.encode(MULTI_BYTE_TEXT)
    assert tok.decode(enc.ids, skip_special_tokens=True) == MULTI_BYTE_TEXT
    # Byte-level BPE: some tokens are partial UTF-8 sequences; decoding them alone must not
    # be what makes the round trip work, so check that such tokens actually occur.
    partial = [i for i in enc.ids if "\ufffd" in tok.decode([i])]
    assert partial, "expected tokens that hold part of a multi-byte character"
    # Merges happened: far fewer tokens than bytes.
    assert len(enc.ids) < 0.7 * len(MULTI_BYTE_TEXT.encode("utf-8"))


def test_auto_tokenizer_prepends_bos(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok(MULTI_BYTE_TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == MULTI_BYTE_TEXT
    # The raw tokenizers file and transformers agree on ids.
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.encode(MULTI_BYTE_TEXT).ids == ids


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_tiny_model_loads_and_generates(architecture: str, tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m", architecture, num_layers=2, seed=3)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name

    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert config.architectures == [architecture]
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    # No token the tokenizer can produce may fall outside the embedding.
    assert config.vocab_size == len(tok)
    tied = architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    assert config.tie_word_embeddings == tied
    if architecture == "MistralForCausalLM":
        assert config.sliding_window is None

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # Norms and biases are not left at transformers' 1 / 0 init.
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert not torch.equal(norm, torch.ones_like(norm))
        if architecture == "Qwen2ForCausalLM":
            bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
            assert bias.abs().max() > 0
    assert ("lm_head.weight" in keys) == (not tied)
    assert ("model.layers.0.self_attn.k_proj.bias" in keys) == (architecture == "Qwen2ForCausalLM")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = tok("Hello world, 東京", return_tensors="pt")["input_ids"]
    assert input_ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        logits = model(input_ids).logits[0, -1]
    assert out.shape == (1, input_ids.shape[1] + 6)
    assert torch.equal(out[0, : input_ids.shape[1]], input_ids[0])
    # Wide init: a clear greedy margin, not a near tie.
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) > 1e-3
    assert float(logits.std()) > 0.1


def test_tiny_model_is_seeded(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a = write_tiny_model(tmp_path / "a", num_layers=1, seed=5)
    b = write_tiny_model(tmp_path / "b", num_layers=1, seed=5)
    c = write_tiny_model(tmp_path / "c", num_layers=1, seed=6)

    def tensors(p: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(p / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])
    # The caller's RNG stream is not disturbed.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)


def test_tiny_model_options(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    path = write_tiny_model(
        tmp_path / "m", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
        intermediate_size=48, tie_word_embeddings=True, rope_scaling=rope, dtype="bfloat16",
    )
    raw = json.loads((path / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "llama3"
    assert raw["rope_parameters"]["factor"] == 8.0
    assert raw["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (16, 32)
    with pytest.raises(ConfigError, match="not supported"):
        write_tiny_model(tmp_path / "x", "GPT2LMHeadModel")


def test_ensure_demo_model_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGESERVE_CACHE", str(tmp_path / "cache"))
    first = ensure_demo_model()
    assert first == tmp_path / "cache" / "demo-llama"
    assert json.loads((first / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    second = ensure_demo_model()
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamp
    # No temporary folders are left behind.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["demo-llama"]

    # An explicit cache root wins over the environment.
    other = ensure_demo_model(tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere" / "demo-llama"
    assert (other / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_ensure_demo_model_loses_a_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = demo_model.write_tiny_model

    def write_while_another_process_finishes_first(out_dir: Path, *args, **kwargs) -> Path:
        real_write(out_dir, *args, **kwargs)
        shutil.copytree(out_dir, tmp_path / "demo-llama")
        return out_dir

    monkeypatch.setattr(demo_model, "write_tiny_model", write_while_another_process_finishes_first)
    path = ensure_demo_model(tmp_path)
    assert path == tmp_path / "demo-llama" and (path / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo-llama"]
