"""One probe of a running front's `/health` (200 only while it runs and the router serves), for
whoever waits for a front to come up: `stageserve up`, the tests, the load benchmark. Plain
urllib: the waiting side needs none of the front's HTTP stack."""

from __future__ import annotations

import urllib.error
import urllib.request


def front_is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True if `url`/health answers 200 now; False for any other answer or none."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False
