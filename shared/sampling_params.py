"""The sampling rules, defined once: each parameter's meaning, its allowed range and the one
value that turns it off.

The router resolves a client's parameters here (`SamplingParams.from_request`, called by
router/request_validation.py): proto3 cannot tell "unset" from 0, so the client's 0 top_p and 0
repetition_penalty become 1.0, the value that means "off"; a seed is drawn when none is given.
Stages receive the resolved values as `StageSamplingParams` and only assert that they still
hold (`within_bounds`, in stage_worker/sequence_state.py and stage_worker/layers/sampler.py):
they never re-validate and never remap a value.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np

from shared.proto import generation_pb2, stage_worker_pb2

TEMPERATURE_MAX = 100.0
REPETITION_PENALTY_MAX = 10.0
# presence_penalty and frequency_penalty lie in [-2, 2], OpenAI's range.
ADDITIVE_PENALTY_MAX = 2.0

# A python float (one sequence) or a numpy column (a batch): `within_bounds` serves both.
_Value = TypeVar("_Value", float, np.ndarray)


class InvalidSamplingParams(ValueError):
    """A client's sampling parameter out of range; the message names the field, the value and
    what is allowed."""


def within_bounds(
    temperature: _Value, top_p: _Value, min_p: _Value, repetition_penalty: _Value,
    presence_penalty: _Value, frequency_penalty: _Value,
) -> bool | np.ndarray:
    """Whether resolved values obey the rules, for scalars or element-wise for numpy columns.
    NaN fails every comparison and infinities fail the upper or lower bounds, so no separate
    finiteness test is needed."""
    return (
        (temperature >= 0.0) & (temperature <= TEMPERATURE_MAX)
        & (top_p > 0.0) & (top_p <= 1.0)
        & (min_p >= 0.0) & (min_p < 1.0)
        & (repetition_penalty > 0.0) & (repetition_penalty <= REPETITION_PENALTY_MAX)
        & (abs(presence_penalty) <= ADDITIVE_PENALTY_MAX)
        & (abs(frequency_penalty) <= ADDITIVE_PENALTY_MAX)
    )


def stage_params_hold(p: stage_worker_pb2.StageSamplingParams, vocab_size: int) -> bool:
    """What a stage asserts of a sequence's parameters when it arrives."""
    return bool(
        within_bounds(p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                      p.frequency_penalty)
        and p.top_k <= vocab_size and p.top_logprobs <= vocab_size
    )


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters: what the stages sample with (layers/sampler.py says how)."""

    # 0: greedy (top_k, top_p and min_p then do not apply).
    temperature: float = 0.0
    # 0: off.
    top_k: int = 0
    # 1: off.
    top_p: float = 1.0
    # 0: off.
    min_p: float = 0.0
    # The noise of every sampled token derives from (seed, position, token): see the sampler.
    seed: int = 0
    # 1: off.
    repetition_penalty: float = 1.0
    # 0: off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Alternatives returned with each token's logprob.
    top_logprobs: int = 0
    return_logprob: bool = False

    def __post_init__(self) -> None:
        if not within_bounds(self.temperature, self.top_p, self.min_p, self.repetition_penalty,
                             self.presence_penalty, self.frequency_penalty) or self.top_k < 0:
            raise InvalidSamplingParams(f"sampling parameters outside the rules: {self}")

    @classmethod
    def from_request(
        cls, params: generation_pb2.SamplingParams, vocab_size: int, max_top_logprobs: int
    ) -> SamplingParams:
        """A client's parameters checked and resolved; raises InvalidSamplingParams."""
        temperature = _in_range("temperature", params.temperature, 0.0, TEMPERATURE_MAX)
        top_k = int(params.top_k)
        if top_k > vocab_size:
            raise InvalidSamplingParams(
                f"sampling.top_k must be in [0, {vocab_size}] (the vocabulary size; 0 disables), got {top_k}"
            )
        # proto3 cannot tell "unset" from 0: a client's 0 means no nucleus filtering.
        top_p = _in_range("top_p", params.top_p, 0.0, 1.0, note=" (0 means 1)") or 1.0
        min_p = _in_range("min_p", params.min_p, 0.0, 1.0, high_open=True, note=" (0 disables)")
        repetition_penalty = float(params.repetition_penalty)
        if repetition_penalty == 0.0:
            repetition_penalty = 1.0
        else:
            _in_range("repetition_penalty", repetition_penalty, 0.0, REPETITION_PENALTY_MAX, low_open=True,
                      note=" (or 0 for none)")
        presence_penalty = _in_range("presence_penalty", params.presence_penalty, -ADDITIVE_PENALTY_MAX,
                                     ADDITIVE_PENALTY_MAX)
        frequency_penalty = _in_range("frequency_penalty", params.frequency_penalty, -ADDITIVE_PENALTY_MAX,
                                      ADDITIVE_PENALTY_MAX)
        top_logprobs = int(params.logprobs)
        if top_logprobs > max_top_logprobs:
            raise InvalidSamplingParams(f"sampling.logprobs must be in [0, {max_top_logprobs}], got {top_logprobs}")
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            # 63 bits fit every signed/unsigned 64-bit consumer (torch.Generator.manual_seed included).
            seed=int(params.seed) if params.HasField("seed") else secrets.randbits(63),
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            top_logprobs=top_logprobs,
            return_logprob=bool(params.return_logprob) or top_logprobs > 0,
        )

    def to_proto(self) -> stage_worker_pb2.StageSamplingParams:
        # The stages get these fields only (a subclass may add the router's, like stop conditions).
        return stage_worker_pb2.StageSamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False, note: str = "") -> float:
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    # NaN compares false with everything, so it needs its own test.
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidSamplingParams(f"sampling.{name} must be a finite number in {interval}{note}, got {value:g}")
    return value
