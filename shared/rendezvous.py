"""The contract of the rendezvous store the router hosts and every stage rank joins.

The router publishes the current process-group epoch under EPOCH_KEY; ranks of epoch N
rendezvous under epoch_prefix(N), so a group re-formed after a failure never reads the
keys (rank counters, barriers) the broken one left behind.
"""

from __future__ import annotations

EPOCH_KEY = "epoch"


def epoch_prefix(epoch: int) -> str:
    return f"epoch{epoch}/"
