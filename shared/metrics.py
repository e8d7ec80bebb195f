"""Prometheus plumbing shared by the router and the stages: a per-process registry and the
HTTP endpoint that serves it.

Each metrics object gets its own registry instead of prometheus_client's global one, so
that a test (or a process hosting two engines) can create several without "duplicated
timeseries" errors, and a scrape shows exactly one component's series.
"""

from __future__ import annotations

import importlib.metadata
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Info, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
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


# What operators of vLLM and TGI filter and join on: every stageserve_* series carries it.
MODEL_NAME_LABEL = "model_name"


class LabelledRegistry(CollectorRegistry):
    """A registry that adds constant labels (model_name) to every stageserve_* sample at
    scrape time, so no metric definition has to repeat them; process_* and python_* series
    are left as the standard collectors make them."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        super().__init__(auto_describe=True)
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if not self.labels or not family.name.startswith(NAMESPACE + "_"):
                yield family
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield labelled


def new_registry(process_metrics: bool = True, labels: Mapping[str, str] | None = None) -> CollectorRegistry:
    """A fresh registry; with the process, platform and GC collectors the default one has
    (CPU seconds, resident memory, open fds, python version), which operators expect.
    `labels` (e.g. model_name) are added to every stageserve_* sample."""
    registry = LabelledRegistry(labels or {})
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


def model_name_of(model_path: str) -> str:
    """The name a deployment's model goes by (GetModelInfo.model_name, the model_name label):
    its folder's name."""
    return model_path.rstrip("/").rsplit("/", 1)[-1]


def stageserve_version() -> str:
    try:
        return importlib.metadata.version("stageserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing it
        return "unknown"


def add_build_info(registry: CollectorRegistry, **config: object) -> None:
    """`stageserve_build_info{version, ...}` 1: the version and the configuration that matters
    when comparing two deployments' series (vLLM's cache_config_info, TGI's info)."""
    info = Info("build", "stageserve version and this process's configuration.", namespace=NAMESPACE,
                registry=registry)
    info.info({"version": stageserve_version(), **{k: str(v) for k, v in config.items()}})


METRICS_PATH = "/metrics"


def _only_metrics_path(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """`app` on /metrics, 404 elsewhere: a typo in a scrape config shows up as an error
    instead of a scrape that silently works."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found; metrics are on {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return wsgi


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes every few seconds would flood stderr; the access log is not wanted."""


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsEndpoint:
    """Serves `registry` in the Prometheus text format on http://host:port/metrics (404 on any
    other path) from a daemon thread. Raises CannotListen with the address if it is taken
    (the HTTP server sets SO_REUSEADDR only, which never shares a listening port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        server = make_server(host, port, _only_metrics_path(make_wsgi_app(registry)), Server, _QuietHandler)
    except OSError as exc:
        raise CannotListen(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another --metrics-port"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server=server, thread=thread)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
