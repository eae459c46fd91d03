"""Prometheus metrics of one API process, in their own registry (never the global one, so
several apps in one process - tests - do not collide).

Request counters and latencies are recorded by :class:`MetricsMiddleware` with the route
*template* as label (``/v1/jobs/{job_id}``), never the raw path, so ids cannot blow up the
label set. The engine's own counters (embedding cache, encodes, swaps, live version) are read
from ``engine.stats()`` at scrape time by :class:`EngineCollector`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.segmentation import SegmentationEngine

__all__ = ["CONTENT_TYPE_LATEST", "EngineCollector", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SWAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNMATCHED_ROUTE = "<unmatched>"


class Metrics:
    """The metrics one API process exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "regcl_http_requests", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "regcl_http_request_duration_seconds",
            "Time from request to the end of the response, by route template.",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.segments = Counter(
            "regcl_segment_requests", "Segmentations served, by adapter kind and whether the "
            "image embedding came from the cache.", ["adapter", "cache"], registry=self.registry)
        self.swap_seconds = Histogram(
            "regcl_adapter_swap_seconds", "Hot swaps of the live adapter: fetch, checks and "
            "load, end to end.", buckets=_SWAP_BUCKETS, registry=self.registry)
        self.swap_paused_seconds = Histogram(
            "regcl_adapter_swap_paused_seconds", "How long encoding was paused by a hot swap.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.swap_failures = Counter(
            "regcl_adapter_swap_failures", "Live versions that could not be loaded (the "
            "previous one kept serving).", registry=self.registry)
        self._engine_collector: EngineCollector | None = None

    def attach_engine(self, engine: SegmentationEngine) -> None:
        """Export ``engine``'s statistics (once per process)."""
        if self._engine_collector is None:
            self._engine_collector = EngineCollector(engine)
            self.registry.register(self._engine_collector)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Reads the engine's counters when Prometheus scrapes."""

    def __init__(self, engine: SegmentationEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        for prefix, what, cache in (("regcl_embedding_cache", "image embeddings",
                                     stats.embeddings),
                                    ("regcl_image_store", "uploaded images", stats.images)):
            yield _counter(f"{prefix}_hits", f"Lookups of {what} that hit.", cache.hits)
            yield _counter(f"{prefix}_misses", f"Lookups of {what} that missed.", cache.misses)
            yield _counter(f"{prefix}_evictions", f"{what.capitalize()} evicted.",
                           cache.evictions)
            yield _gauge(f"{prefix}_entries", f"{what.capitalize()} held.", cache.entries)
            yield _gauge(f"{prefix}_bytes", f"Bytes of {what} held.", cache.nbytes)
            yield _gauge(f"{prefix}_max_bytes", f"Budget for {what}.", cache.max_bytes)
        yield _counter("regcl_image_encodes", "Image-encoder runs.", stats.encodes)
        yield _counter("regcl_embedding_store_loads", "Embeddings read from the persisted "
                       "embedding store (pre-encoded) instead of encoded.", stats.stored_loads)
        yield _counter("regcl_embedding_store_writes", "Embeddings written to the persisted "
                       "embedding store.", stats.stored_writes)
        yield _counter("regcl_adapter_swaps", "Hot swaps of the live adapter.", stats.swaps)
        yield _gauge("regcl_live_version", "Live adapter version served (-1: the base model).",
                     -1 if stats.live_version is None else stats.live_version)
        yield _gauge("regcl_domain_adapters_loaded", "Domain adapters loaded for serving.",
                     len(stats.domains))
        yield _counter("regcl_domain_adapter_loads", "Domain adapters loaded (again after an "
                       "eviction, or after a new upload under the same name).",
                       stats.domain_loads)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class MetricsMiddleware:
    """Pure ASGI (so streaming responses pass through untouched): counts each HTTP request by
    method, route template and status, and times it to the end of its response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
