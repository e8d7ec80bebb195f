"""The model folder's tokenizer, or none: a folder with only config.json (served with
--load-format dummy) makes a router that serves token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Files any Hugging Face tokenizer is read from; a folder with none of them has no tokenizer
# (a config.json-only folder served with --load-format dummy). Checked before AutoTokenizer
# runs, because transformers may build an empty tokenizer from config.json alone.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "vocab.txt", "spiece.model",
)


def tokenizer_files(model_path: str | Path) -> list[str]:
    """The tokenizer files in the model folder (empty: the router serves token ids only)."""
    return [name for name in TOKENIZER_FILES if (Path(model_path) / name).is_file()]


def load_tokenizer(model_path: str) -> Any | None:
    """The folder's tokenizer, or None if it has no tokenizer files (a broken one still fails)."""
    if not tokenizer_files(model_path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class TokenIdsOnly:
    """Stands in for the tokenizer in the detokenizer of a router without one: every decode
    is "", so responses carry token ids and empty text."""

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        return ""
