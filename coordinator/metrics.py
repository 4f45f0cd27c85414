"""Prometheus metrics of one daemon, in a registry of its own (several daemons may share a test process), served
over HTTP only when ``serve --metrics-listen HOST:PORT`` asks for it.

Counters and histograms are fed where things happen (commits, publication, the gRPC interceptor below); the
member counts are read from the ledger at scrape time, so they are never stale. docs/operations.md lists them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily

from dume.shared.errors import DumeError

disable_created_metrics()  # no *_created series: they double every family and no dashboard reads them
MEMBER_STATES = ("enrolled", "active", "left", "revoked")
TRANSFERS = {"/dume.v1.Federation/SendChunks": "upload", "/dume.v1.Federation/ReadBlob": "download"}
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class MemberCollector:
    """``dume_members{state}``: read from ``count_states`` (the ledger) on every scrape."""

    def __init__(self, count_states: Callable[[], dict[str, int]]) -> None:
        self.count_states = count_states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("dume_members", "Members of the federation by state", labels=["state"])
        counts = self.count_states()
        for state in sorted(set(MEMBER_STATES) | set(counts)):
            family.add_metric([state], counts.get(state, 0))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.uploads = Counter("dume_uploads", "Uploads committed (validated and recorded), by kind", ["kind"],
                               registry=registry)
        self.upload_bytes = Counter("dume_upload_bytes", "Bytes of committed uploads, by kind", ["kind"],
                                    registry=registry)
        self.transfer_seconds = Histogram("dume_transfer_seconds", "Duration of one chunk stream: a node's upload "
                                          "(SendChunks) or a download of a blob (ReadBlob)", ["direction"],
                                          buckets=SECONDS_BUCKETS, registry=registry)
        self.statistics_validation_seconds = Histogram(
            "dume_statistics_validation_seconds", "Checking an uploaded statistics file before it is recorded",
            buckets=SECONDS_BUCKETS, registry=registry)
        self.basis_seconds = Histogram("dume_basis_seconds", "Averaging a new basis over the active members",
                                       buckets=SECONDS_BUCKETS, registry=registry)
        self.solve_seconds = Histogram("dume_solve_seconds", "Solving every layer's router from the statistics",
                                       buckets=SECONDS_BUCKETS, registry=registry)
        self.publication_seconds = Histogram("dume_publication_seconds", "One publication round: basis, routers, "
                                             "checkpoint and ledger", buckets=SECONDS_BUCKETS, registry=registry)
        self.versions = Counter("dume_versions_published", "Versions published, exact or provisional", ["exact"],
                                registry=registry)
        self.latest_version = Gauge("dume_latest_version", "Number of the latest published version (0: none)",
                                    registry=registry)
        self.publication_failures = Counter("dume_publication_failures", "Publication rounds that failed",
                                            registry=registry)
        self.refusals = Counter("dume_refusals", "Calls refused, by method and reason (the gRPC status code)",
                                ["method", "reason"], registry=registry)
        for kind in ("model", "statistics"):
            self.uploads.labels(kind)
            self.upload_bytes.labels(kind)
        for exact in ("true", "false"):
            self.versions.labels(exact)
        self._server: Any = None

    def watch_members(self, count_states: Callable[[], dict[str, int]]) -> None:
        self.registry.register(MemberCollector(count_states))

    @contextmanager
    def timed(self, histogram: Histogram) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            histogram.observe(time.monotonic() - started)

    def serve_http(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint in a thread of its own; returns the port bound (``port`` 0 picks one)."""
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise DumeError(f"cannot serve metrics on {host}:{port} ({error.strerror}): choose another "
                            "--metrics-listen") from None
        return self._server.server_port

    def stop_http(self) -> None:
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()
            self._server.server_close()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times the transfer streams and counts refused calls of the dume services, whatever the servicer."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        method = details.method
        if handler is None or not method.startswith("/dume.v1."):
            return handler
        short = method.rpartition("/")[2]
        direction = TRANSFERS.get(method)

        def finished(context: grpc.ServicerContext, started: float) -> None:
            code = context.code()
            if code is not None and code != grpc.StatusCode.OK:
                self.metrics.refusals.labels(short, code.name.lower()).inc()
            if direction:
                self.metrics.transfer_seconds.labels(direction).observe(time.monotonic() - started)

        def unary_response(behaviour: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    return behaviour(request, context)
                finally:
                    finished(context, started)
            return run

        def streamed_response(behaviour: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.monotonic()
                try:
                    yield from behaviour(request, context)
                finally:
                    finished(context, started)
            return run

        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streamed_response(handler.unary_stream), **codec)
        return grpc.stream_stream_rpc_method_handler(streamed_response(handler.stream_stream), **codec)
