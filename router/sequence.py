"""A request's sequence as the router's scheduler and block manager see it.

Only the state that scheduling and KV accounting need lives here; the engine keeps the rest
(sampling parameters, stop strings, the client stream) in its own bookkeeping.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from shared.token_ids import slice_prompt_and_output

# FCFS order must survive preemption (a preempted sequence keeps its place), so arrival is
# a process-wide counter taken at construction rather than a position in some queue.
_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation request's token state, block table and scheduling flags.

    Compared by identity (``eq=False``): two sequences with equal tokens are still two requests.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose KV is in the cache, counted after completed steps only.
    num_computed_tokens: int = 0
    # Prefix-cache hit at the (last) admission, for reporting.
    num_cached_prompt_tokens: int = 0
    # The block table: block i holds the KV of tokens [i * block_size, (i + 1) * block_size).
    block_ids: list[int] = field(default_factory=list)
    # Steps sent to the stages whose result has not come back yet that hold this sequence
    # (two with asynchronous scheduling: a decode step is sent before the previous one's
    # token is known), and the tokens they compute.
    num_inflight_steps: int = 0
    num_inflight_tokens: int = 0
    # The scheduler's batch counter at the sequence's latest step (groups look-ahead steps).
    last_batch_index: int = -1
    # The scheduler's lane (pipelines: router/scheduler.py), set at each admission.
    lane: int = 0
    # Cancelled by the client (or failed); its blocks are released at the next safe point.
    aborted: bool = False
    # Why the sequence ended with an error (a failed step), for the engine to report.
    error: str | None = None
    num_preemptions: int = 0
    # Block manager bookkeeping. The chained hashes depend only on token content, which never
    # changes for a given position, so they stay valid across preemptions and are reused.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # Blocks of the current table already offered to the prefix cache (reset on free).
    num_registered_blocks: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt must hold at least one token")
        if self.max_new_tokens < 0:
            raise ValueError(
                f"sequence {self.seq_id}: max_new_tokens must be >= 0, got {self.max_new_tokens}"
            )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_flight(self) -> bool:
        return self.num_inflight_steps > 0

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed or being computed by a step in flight."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        return slice_prompt_and_output(self.prompt_token_ids, self.output_token_ids, start, end)
