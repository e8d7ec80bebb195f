"""Reference outputs from `transformers` (the implementation nobody here wrote) and how the
tests compare stageserve's tokens and logprobs with them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Reference:
    token_ids: list[int]
    # [steps, vocab] log-softmax of the logits that chose each token.
    logprobs: torch.Tensor


def hf_greedy(
    model_dir: Path, prompt_ids: Sequence[int], max_new_tokens: int,
    dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str | None = None,
) -> Reference:
    """Greedy decoding with the transformers model, one full forward per token (no eos stop).
    attn_implementation: one registered with transformers' AttentionInterface (None: its default)."""
    model = _load_hf(model_dir, dtype, device, attn_implementation)
    ids = torch.tensor([list(prompt_ids)], device=device)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(lp))
            out.append(token)
            lps.append(lp)
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return Reference(out, torch.stack(lps).cpu())


_HF_MODELS: dict[tuple, torch.nn.Module] = {}


def _load_hf(
    model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str | None = None
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), dtype, device, attn_implementation)
    if key not in _HF_MODELS:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **extra)
        _HF_MODELS[key] = model.to(device).eval()
    return _HF_MODELS[key]


def forget_hf_model(model_dir: Path) -> None:
    """After editing a model folder's config: the next use reloads it."""
    for key in [k for k in _HF_MODELS if k[0] == str(model_dir)]:
        del _HF_MODELS[key]


def hf_generate(model_dir: Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own `generate` (greedy, stops at the config's eos)."""
    model = _load_hf(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids):].tolist()


def _first_near_tie(ref: Reference, margin: float) -> int | None:
    """The first step whose top-2 logprobs are within `margin`, if any."""
    for step, lp in enumerate(ref.logprobs):
        top2 = torch.topk(lp, 2).values
        if float(top2[0] - top2[1]) < margin:
            return step
    return None


def comparable_prefix(ref: Reference, margin: float = 1e-3) -> int:
    """Steps up to and including the first near tie of the top-2 logprobs; after it, a tiny
    numeric difference may legitimately pick the other token."""
    tie = _first_near_tie(ref, margin)
    return len(ref.token_ids) if tie is None else tie + 1


def steps_before_near_tie(ref: Reference, margin: float) -> int:
    """Steps before the first near tie: with rounding as coarse as bf16's, the tie step itself
    may already pick either token."""
    tie = _first_near_tie(ref, margin)
    return len(ref.token_ids) if tie is None else tie


def assert_matches_reference(got, ref: Reference, tol: float, margin: float = 1e-3) -> tuple[int, float]:
    """`got` (a client result with logprobs) must give `ref`'s greedy tokens over the
    comparable prefix (up to the first top-2 gap under `margin`), each chosen token's logprob
    within `tol` of the reference's. Returns (steps compared, largest logprob difference)."""
    n = comparable_prefix(ref, margin)
    assert got.token_ids[:n] == ref.token_ids[:n]
    max_diff = 0.0
    for step in range(n):
        lp = got.logprobs[step]
        diff = abs(lp.logprob - float(ref.logprobs[step, lp.token_id]))
        assert diff < tol, f"step {step}: logprob differs by {diff:.3g} (tolerance {tol:g})"
        max_diff = max(max_diff, diff)
    return n, max_diff


def agreement_with_reference(tokens: Sequence[int], logprobs: Sequence[float], ref: Reference) -> tuple[int, float]:
    """Steps agreeing with `ref`'s greedy path, and the largest logprob error over them."""
    agree, worst = 0, 0.0
    for step, token in enumerate(tokens):
        if token != ref.token_ids[step]:
            break
        agree += 1
        worst = max(worst, abs(logprobs[step] - float(ref.logprobs[step, token])))
    return agree, worst
