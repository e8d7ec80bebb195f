"""Finishes a rank's launched steps on a thread of their own, in launch order.

The rank's main thread launches step n+1 (applies its deltas, builds its inputs, enqueues
its kernels) while this thread waits for step n's sampled tokens to reach the host and
sends its result. So on a GPU the host work of one step overlaps the device work of the
one before, and the device always has the next step queued when the router keeps two in
flight (asynchronous scheduling). The waiting happens in CUDA event synchronisation,
which releases the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from shared.proto import stage_worker_pb2 as pb
from stage_worker.model_runner import LaunchedStep, ModelRunner


class StepFinisher:
    def __init__(
        self,
        runner: ModelRunner,
        reply: Callable[[pb.StepResult], None] | None,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        """`reply` receives each finished result (None: this rank reports nothing);
        `on_fatal` is told of an exception while finishing, after which nothing more runs."""
        self._runner = runner
        self._reply = reply
        self._on_fatal = on_fatal
        self._queue: queue.Queue[LaunchedStep] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="step-finisher", daemon=True)
        self._thread.start()

    def submit(self, launched: LaunchedStep) -> None:
        self._queue.put(launched)

    def drain(self) -> None:
        """Returns once every submitted step is finished and its result sent."""
        self._queue.join()

    def _run(self) -> None:
        if self._runner.device.type == "cuda":
            # Events belong to the rank's device; this thread starts on device 0.
            torch.cuda.set_device(self._runner.device)
        while True:
            launched = self._queue.get()
            try:
                result = self._runner.finish(launched, report=self._reply is not None)
                if self._reply is not None:
                    self._reply(result)
            except BaseException as exc:  # noqa: BLE001 - must reach the stage process
                self._on_fatal(exc)
                return
            finally:
                self._queue.task_done()
