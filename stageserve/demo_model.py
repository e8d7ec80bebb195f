"""The built-in demo model: a byte-level BPE tokenizer and tiny random-weight checkpoints.

``stageserve up`` with no ``--model`` serves :func:`ensure_demo_model`, written locally with
no download; the tests build their tiny checkpoints with :func:`write_tiny_model`. Both
produce ordinary Hugging Face folders (config.json, model.safetensors, tokenizer files,
generation_config.json), so the server and ``transformers`` load them the same way.

The tokenizer is a real byte-level BPE trained on the corpus below, which mixes English
with accented Latin, CJK and emoji, so multi-byte characters and partial-UTF-8 tokens occur
the way they do with production tokenizers. Training is deterministic: the same files
every time.

The weights are random. They are not meant to say anything sensible, only to exercise every
code path: the init is wide (``initializer_range``) so logits have clear top-2 margins, and
norm weights and biases are random too (transformers initialises them to 1 and 0), so a
loader that forgets to load one of them changes the outputs and a parity test sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from shared.config import DTYPES, SUPPORTED_ARCHITECTURES, ConfigError

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Order fixes the ids: <s> = 0, </s> = 1, <pad> = 2.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
TOKENIZER_VOCAB_SIZE = 768
DEMO_MODEL_NAME = "demo-llama"

# A chat template in the shape instruct models ship (transformers' Jinja dialect): the template
# writes the bos itself, so the router tokenizes its output without adding special tokens; an
# assistant turn ends with eos, which is where generation stops. It refuses roles it has no
# turn for, the way real templates do (raise_exception), so that path is exercised too. Its
# turn markers are plain text: the demo vocabulary has no spare special tokens, and adding
# some would change the demo weights' shapes. '\n' is written as an expression because
# transformers renders with trim_blocks (a newline after a block tag is dropped).
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the demo chat template has system, user and assistant turns, not ' + message['role']) }}"
    "{% endif %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A stage worker holds only its own layers,
and the router decides which sequences run in each step. Hidden states travel from one
stage to the next, while the router keeps track of every block of the key-value cache.
When a request arrives, the tokenizer turns its text into token ids; when the last stage
samples a token, the detokenizer turns it back into text and streams it to the client.

Once upon a time there was a small language model that lived on a laptop. It did not
know much, but it answered every question quickly, and it never needed the network.
People asked it about the weather, about trains and rivers, about numbers like 42, 1024
and 3.14159, and it replied with words it had learned from a few short paragraphs.
"Hello, world!" it said. "How are you today? I am fine, thank you for asking."

Le café de la gare était fermé, alors nous avons marché jusqu'à la rivière. Ça, c'est la
vie: déjà vu, naïve façade, crème brûlée, où est l'hôtel? Über den Wolken muss die
Freiheit wohl grenzenlos sein. Mañana será otro día, señor; ¿dónde está la estación?
Ölçü, şarkı, ağaç. Zażółć gęślą jaźń. Ære være Øresund og Århus.

東京は日本の首都です。私は毎朝コーヒーを飲みます。今日はいい天気ですね。
北京是中国的首都。我喜欢学习语言和计算机科学。你好，世界！谢谢你的帮助。
서울은 한국의 수도입니다. 안녕하세요, 만나서 반갑습니다.
Привет, мир! Как дела? Всё хорошо, спасибо. Γειά σου κόσμε. שלום עולם. مرحبا بالعالم.

Emoji travel too: 🙂 😀 🚀 🌍 🎉 ❤️ 👍🏽 👩‍💻 🇫🇷 ✨ — and symbols like € £ ¥ © ® ™ ° ± × ÷ → ∞ ≈ ≠.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))
"""


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process; the result depends only on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: "Hello" and " Hello" stay different, and decode(encode(t)) == t.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (not only the corpus's characters) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Several copies of the paragraphs, one per line, give the trainer real frequencies.
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True) * 3, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Prepend <s> on encode, so HF `tokenizer(text)`, `generate` and the server agree on ids.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer.to_str(pretty=True)


def build_tokenizer(out_dir: Path, chat_template: str | None = DEMO_CHAT_TEMPLATE) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir;
    ``chat_template=None`` leaves the tokenizer without one (a base model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        # Says the same as the TemplateProcessing in tokenizer.json; transformers rebuilds
        # its post-processor from these flags when they are present.
        "add_bos_token": True,
        # Byte-level BPE needs no unknown token. Saying so explicitly also stops classes with
        # their own default (Qwen2Tokenizer adds "<|endoftext|>") from growing the vocab past
        # the model's embedding.
        "unk_token": None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    if chat_template is not None:
        # transformers reads it from here (and from chat_template.jinja, which it writes).
        config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _token_ids() -> tuple[int, dict[str, int]]:
    data = json.loads(_tokenizer_json())
    vocab = data["model"]["vocab"]
    ids = {tok["content"]: tok["id"] for tok in data["added_tokens"]}
    size = max([*vocab.values(), *ids.values()]) + 1
    return size, ids


def _hf_config(
    architecture: str,
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool | None,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    dtype: str,
    initializer_range: float,
) -> Any:
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN],
        dtype=dtype,
    )
    # transformers 5 keeps rope_theta inside rope_parameters; rope_scaling adds the
    # type-specific keys (rope_type, factor, ...).
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope.update(rope_scaling)
        if "type" in rope and "rope_type" not in rope_scaling:
            rope["rope_type"] = rope.pop("type")
    common["rope_parameters"] = rope
    if architecture == "LlamaForCausalLM":
        return LlamaConfig(**common, tie_word_embeddings=bool(tie_word_embeddings))
    if architecture == "MistralForCausalLM":
        # No sliding window: the serving code implements full causal attention.
        return MistralConfig(**common, tie_word_embeddings=bool(tie_word_embeddings), sliding_window=None)
    if architecture == "Qwen3ForCausalLM":
        # Like the small Qwen3 models: tied embeddings; head_dim larger than hidden / heads.
        return Qwen3Config(
            **common,
            head_dim=2 * hidden_size // num_heads,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
            use_sliding_window=False,
        )
    if architecture == "Qwen3MoeForCausalLM":
        # 8 experts, top 2, renormalised like the released models; layer 0 dense, so both
        # kinds of feed-forward run.
        return Qwen3MoeConfig(
            **common,
            head_dim=2 * hidden_size // num_heads,
            tie_word_embeddings=bool(tie_word_embeddings),
            use_sliding_window=False,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=intermediate_size // 4,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
    if architecture == "MixtralForCausalLM":
        return MixtralConfig(
            **common,
            tie_word_embeddings=bool(tie_word_embeddings),
            sliding_window=None,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    assert architecture == "Qwen2ForCausalLM"
    return Qwen2Config(
        **common,
        tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
        use_sliding_window=False,
    )


def write_tiny_model(
    out_dir: Path,
    architecture: str = "LlamaForCausalLM",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool | None = None,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    initializer_range: float = 0.2,
    chat_template: str | None = DEMO_CHAT_TEMPLATE,
) -> Path:
    """Write a random-weight HF checkpoint with the demo tokenizer to out_dir; return out_dir.

    ``tie_word_embeddings=None`` means the architecture's usual choice: tied for Qwen2 and
    Qwen3, untied for Llama, Mistral, Qwen3-MoE and Mixtral. The MoE architectures get small
    expert counts (Qwen3-MoE: 8 experts, top 2, experts of intermediate_size / 4, layer 0
    dense; Mixtral: 4 experts, top 2). ``rope_scaling`` is merged into transformers'
    ``rope_parameters`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``). The same
    arguments give the same weights (the global torch RNG is left untouched).
    ``chat_template=None`` writes a tokenizer without a chat template.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    vocab_size, special_ids = _token_ids()
    config = _hf_config(
        architecture,
        vocab_size=vocab_size,
        special_ids=special_ids,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomise_norms_and_biases(model, initializer_range)
    model = model.to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN],
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tokenizer(out_dir, chat_template)
    return out_dir


@torch.no_grad()
def _randomise_norms_and_biases(model: torch.nn.Module, std: float) -> None:
    """Norm weights near 1 and biases near 0, but not exactly (see the module docstring)."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, std)
        elif "norm" in name and name.endswith(".weight"):
            param.copy_(1.0 + 0.1 * torch.randn_like(param))


def default_cache_dir() -> Path:
    """Root of stageserve's cache: $STAGESERVE_CACHE, else ~/.cache/stageserve."""
    env = os.environ.get("STAGESERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stageserve"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo checkpoint folder ``<cache_dir>/demo-llama``, writing it on first use.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`). The model is written
    to a temporary folder next to the target and renamed into place, so a crash never
    leaves a half-written model, and processes racing to create it (router and stages
    started together) all end up using one complete copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        _add_chat_template(target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}-", dir=root))
    try:
        write_tiny_model(
            tmp,
            "LlamaForCausalLM",
            num_layers=4,
            hidden_size=128,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
            max_position_embeddings=2048,
            dtype="float32",
            seed=0,
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else renamed theirs into place first; theirs is complete, use it.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _add_chat_template(model_dir: Path) -> None:
    """A demo model written before the chat template existed gets it (weights unchanged).
    Each file is replaced atomically, so router and stages racing here read whole files."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "chat_template" in config:
        return
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer_config-", dir=model_dir)
    os.close(fd)
    _write_json(Path(tmp), config)
    os.replace(tmp, config_path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
