"""The router's side of one stage: control calls and the long-lived Execute stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_options import channel_options
from shared.proto import stage_worker_pb2 as pb
from shared.proto import stage_worker_pb2_grpc as pb_grpc
from shared.security import StageAccess

_END = object()

# A stage restarted after a crash must be found within seconds, not after gRPC's default
# reconnect backoff (which grows to 2 minutes while the stage is down).
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 2000)]


class StageClient:
    def __init__(self, address: str, access: StageAccess = StageAccess()) -> None:
        self.address = address
        # mTLS and/or the stage token, on every call of this channel (see shared/security.py).
        self.access = access
        self.channel = access.channel(address, channel_options() + _RECONNECT_OPTIONS)
        self.stub = pb_grpc.StageWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._requests: queue.Queue | None = None
        self._reader: threading.Thread | None = None
        self._call = None

    def get_info(self, timeout_s: float = 5.0, parameter_names: bool = False) -> pb.StageInfo:
        return self.stub.GetInfo(pb.GetInfoRequest(include_parameter_names=parameter_names), timeout=timeout_s)

    def profile(self, request: pb.ProfileRequest, timeout_s: float = 900.0) -> pb.ProfileResponse:
        return self.stub.Profile(request, timeout=timeout_s)

    def init_cache(self, request: pb.InitCacheRequest, timeout_s: float = 900.0) -> pb.InitCacheResponse:
        return self.stub.InitCache(request, timeout=timeout_s)

    def rejoin(self, epoch: int, timeout_s: float = 30.0) -> pb.RejoinResponse:
        return self.stub.Rejoin(pb.RejoinRequest(epoch=epoch), timeout=timeout_s)

    def is_serving(self, timeout_s: float = 2.0) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    # ---- Execute stream ----------------------------------------------------------------

    def open_execute(
        self,
        on_result: Callable[[pb.StepResult], None],
        on_error: Callable[[str], None],
    ) -> None:
        """Opens the step stream; results and the stream's end are reported through callbacks."""
        requests: queue.Queue = queue.Queue()
        self._requests = requests

        def request_iter() -> Iterator[pb.StepRequest]:
            while True:
                item = requests.get()
                if item is _END:
                    return
                yield item

        call = self.stub.Execute(request_iter())
        self._call = call

        def read() -> None:
            try:
                for result in call:
                    on_result(result)
                on_error(f"stage {self.address} closed its step stream")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    on_error(f"stage {self.address}: {exc.code().name}: {exc.details()}")

        self._reader = threading.Thread(target=read, name=f"execute-{self.address}", daemon=True)
        self._reader.start()

    def send_step(self, step: pb.StepRequest) -> None:
        assert self._requests is not None, "open_execute first"
        self._requests.put(step)

    def close_execute(self) -> None:
        """Ends the step stream (a failed pipeline); the channel stays for control calls."""
        if self._requests is not None:
            self._requests.put(_END)
            self._requests = None
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def close(self) -> None:
        self.close_execute()
        self.channel.close()
