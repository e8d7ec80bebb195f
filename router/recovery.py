"""Bringing the pipeline back after a stage failure, without restarting any process.

When the engine's pipeline goes down (a stage's step stream broke, or a step timed out),
it keeps every request, back to waiting, for up to --recovery-timeout (or ends them with
UNAVAILABLE at once when that is 0) and schedules nothing. The process group
the stages' ranks formed is broken for good (a collective with a dead peer never
completes), so recovery forms a new one: the next epoch is published in the router's
store, every stage is told to Rejoin it (fresh rank processes that reload their weights
and rendezvous under the new epoch's key prefix), and the usual bring-up runs again; the
same engine then resumes on the new pipeline and recomputes the requests it kept. A stage
the operator (or `stageserve up`) restarts reads the current epoch from the store by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from router.control_plane import BringUpError
from router.stage_client import StageClient

log = logging.getLogger("stageserve.router")

# How often a stage that cannot be reached (killed, being restarted) is asked again.
REJOIN_RETRY_S = 0.5
# Rejoin kills and respawns rank processes; it answers once they are started, not loaded.
REJOIN_TIMEOUT_S = 60.0


class PipelineRecovery:
    """Runs recoveries one at a time on its own thread; a failure reported meanwhile (the
    re-formed pipeline failing again) starts another round once this one ends."""

    def __init__(
        self,
        stages: list[StageClient],
        publish_epoch: Callable[[int], None],
        start_engine: Callable[[], None],
        set_serving: Callable[[bool], None],
    ) -> None:
        self.stages = stages
        self.epoch = 0
        self._publish_epoch = publish_epoch
        self._start_engine = start_engine
        self._set_serving = set_serving
        self._lock = threading.Lock()
        self._pending: str | None = None
        self._running = False
        self._stop = threading.Event()
        # Figures for logs and docs/reliability.md: the last recovery's duration.
        self.last_recovery_s: float | None = None

    def trigger(self, reason: str) -> None:
        """The engine failed (called from any thread); recovery starts at once."""
        with self._lock:
            self._pending = reason
            if self._running or self._stop.is_set():
                return
            self._running = True
        threading.Thread(target=self._loop, name="recovery", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._running

    def _loop(self) -> None:
        while True:
            with self._lock:
                reason, self._pending = self._pending, None
                if reason is None or self._stop.is_set():
                    self._running = False
                    return
            self._recover(reason)

    def _recover(self, reason: str) -> None:
        started = time.monotonic()
        log.warning("pipeline failed (%s); recovering", reason)
        self._set_serving(False)
        # The engine schedules nothing while its pipeline is down; the old streams go.
        for stage in self.stages:
            stage.close_execute()
        while not self._stop.is_set():
            self.epoch += 1
            self._publish_epoch(self.epoch)
            log.info("recovery: forming the process group of epoch %d", self.epoch)
            if not self._rejoin_all(self.epoch):
                return
            try:
                self._start_engine()
            except (BringUpError, grpc.RpcError) as exc:
                # A stage failed again while joining: start over with a fresh epoch.
                log.error("recovery: bring-up of epoch %d failed: %s", self.epoch, exc)
                time.sleep(REJOIN_RETRY_S)
                continue
            self.last_recovery_s = time.monotonic() - started
            log.warning("recovery: serving again in epoch %d after %.1f s", self.epoch, self.last_recovery_s)
            self._set_serving(True)
            return

    def _rejoin_all(self, epoch: int) -> bool:
        """Asks every stage to rejoin `epoch`, retrying the unreachable ones until they come
        back (restarted by the operator or the compose restart policy). False if stopped."""
        waiting = set(range(len(self.stages)))
        last_report: dict[int, str] = {}
        while waiting:
            for index in sorted(waiting):
                stage = self.stages[index]
                try:
                    stage.rejoin(epoch, timeout_s=REJOIN_TIMEOUT_S)
                except grpc.RpcError as exc:
                    message = f"{exc.code().name}: {exc.details()}"
                    if last_report.get(index) != message:
                        last_report[index] = message
                        log.warning("recovery: stage %d (%s) cannot rejoin yet: %s", index, stage.address, message)
                    continue
                waiting.discard(index)
            if waiting and self._stop.wait(REJOIN_RETRY_S):
                return False
        return not self._stop.is_set()
