"""Chat conversations into prompt token ids, with the model's own chat template.

The router renders `GenerateRequest.messages` itself so that every client (gRPC, the OpenAI
front, other languages) gets the same prompt the model was trained on, without shipping the
template or the tokenizer. Rendering is transformers' `apply_chat_template` (the Jinja
dialect every Hugging Face model's template is written in), with `add_generation_prompt=True`
so the prompt ends where the assistant's answer begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.request_validation import InvalidRequestError
from shared.proto import generation_pb2 as gen


def chat_template_of(tokenizer: Any | None) -> str | None:
    """The tokenizer's chat template (None: a base model, or no tokenizer at all)."""
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None


class ChatRenderer:
    """Renders validated messages (`request_validation` checked roles and sizes) to token ids."""

    def __init__(self, tokenizer: Any) -> None:
        assert chat_template_of(tokenizer) is not None, "the server checks for a template first"
        self.tokenizer = tokenizer

    def __call__(self, messages: Sequence[gen.ChatMessage]) -> list[int]:
        from jinja2.exceptions import TemplateError

        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=True,
                # The template writes its own special tokens (bos, turn markers); the text is
                # tokenized as it is, so nothing is added twice.
                tokenize=True,
                return_dict=False,
                # Special tokens typed inside a message stay text: a user cannot forge a
                # system turn (or end the conversation) with the template's control tokens.
                sanitize_control_tokens=True,
            )
        except TemplateError as exc:
            # The template refused the conversation (raise_exception): a role it has no turn
            # for, roles that do not alternate, ... Its own words say which.
            raise InvalidRequestError(f"the model's chat template refused these messages: {exc}") from exc
        return [int(t) for t in ids]
