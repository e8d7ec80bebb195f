"""Prometheus plumbing shared by the router and the stages: a per-process registry and the
HTTP endpoint that serves it.

Each metrics object gets its own registry instead of prometheus_client's global one, so
that a test (or a process hosting two engines) can create several without "duplicated
timeseries" errors, and a scrape shows exactly one component's series.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from shared.grpc_options import CannotListen

log = logging.getLogger("stageserve.metrics")

# The `_created` series double every counter and histogram for a timestamp Prometheus does
# not need (process_start_time_seconds tells a restart); this process-wide switch drops them.
disable_created_metrics()

# Every series stageserve exports starts with this, so one relabel rule selects them all.
NAMESPACE = "stageserve"

# Seconds. Spans a sub-millisecond CPU step up to a multi-minute long generation.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
# Seconds. Step and hop times: tens of microseconds (NCCL hop) to a long chunked prefill.
STEP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry; with the process, platform and GC collectors the default one has
    (CPU seconds, resident memory, open fds, python version), which operators expect."""
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        # The default instances are bound to the global registry; make our own.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; `port` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsEndpoint:
    """Serves `registry` in the Prometheus text format on http://host:port/metrics (any
    path answers) from a daemon thread. Raises CannotListen with the address if it is taken
    (the HTTP server sets SO_REUSEADDR only, which never shares a listening port)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise CannotListen(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another --metrics-port"
        ) from exc
    endpoint = MetricsEndpoint(server=server, thread=thread)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
