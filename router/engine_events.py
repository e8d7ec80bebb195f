"""What reaches the engine thread, one small type per kind of event.

The gRPC handlers, the stages' stream readers and the router's lifecycle never touch the
engine's state: they put one of these on its queue, and the engine thread handles them in
order (router/engine.py, `Engine._handle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.proto import generation_pb2 as gen
from shared.proto import stage_worker_pb2 as pb

if TYPE_CHECKING:
    from router.block_manager import BlockManager
    from router.request_validation import ValidatedRequest


class EngineUnavailable(RuntimeError):
    """The pipeline is down (a stage failed); requests cannot be served now."""


# A sink receives each response of one request, then the end of the stream: None, or an
# EngineUnavailable when the request ended because the pipeline went down (the server
# turns that into an UNAVAILABLE status, which clients may retry).
ResponseSink = Callable[[gen.GenerateResponse | EngineUnavailable | None], None]


@dataclass(frozen=True)
class Submit:
    """A validated request to admit (from a gRPC handler)."""

    seq_id: int
    request: ValidatedRequest
    sink: ResponseSink


@dataclass(frozen=True)
class Abort:
    """The client went away or its deadline passed: free the sequence at the next step."""

    seq_id: int


@dataclass(frozen=True)
class StageResult:
    """A stage answered a step. `streams` numbers the set of Execute streams it came on: the
    events of streams closed by a pipeline failure are dropped."""

    streams: int
    from_last_stage: bool
    result: pb.StepResult
    # time.monotonic() when the stream reader received it.
    arrived: float


@dataclass(frozen=True)
class StageStreamBroken:
    """A stage's Execute stream ended: the pipeline failed."""

    streams: int
    message: str


@dataclass(frozen=True)
class Resume:
    """The pipeline was re-formed with an empty KV pool of `block_manager`'s size."""

    block_manager: BlockManager


@dataclass(frozen=True)
class Stop:
    """The router is shutting down."""


EngineEvent = Submit | Abort | StageResult | StageStreamBroken | Resume | Stop
