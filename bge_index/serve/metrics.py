"""What `bge-index serve` exposes at GET /metrics, in Prometheus' text format (prometheus-client).

One `ServeMetrics` per application, on its own registry (never the process'
global one: tests and embedders may run several servers in one process):

    bge_index_serve_requests_total{route, method, status}   answers sent, by status
    bge_index_serve_request_duration_seconds{route}          histogram: arrival to answer
    bge_index_serve_refused_total{reason}                    connections and requests refused or dropped
    bge_index_serve_queued_queries / _queued_requests        waiting now (answered in batches)
    bge_index_serve_batch_queries                            histogram: queries per batch
    bge_index_serve_batch_seconds                            histogram: a batch's encode + score
    bge_index_serve_generation                               the generation served
    bge_index_serve_index{index_dir, created, model, generation}   1: which index that generation is
    bge_index_serve_serving                                  1 while a generation is served, 0 when none can be
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = ("/search", "/embed", "/info", "/healthz", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """The server's metrics and the text /metrics answers."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("bge_index_serve_requests", "HTTP answers sent, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("bge_index_serve_request_duration_seconds", "From a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("bge_index_serve_refused", "Connections and requests refused or dropped, by reason",
                               ["reason"], registry=r)
        self.queued_queries = Gauge("bge_index_serve_queued_queries", "Queries waiting or being answered", registry=r)
        self.queued_requests = Gauge("bge_index_serve_queued_requests", "Requests waiting or being answered",
                                     registry=r)
        self.batch_queries = Histogram("bge_index_serve_batch_queries", "Queries answered together in one batch",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("bge_index_serve_batch_seconds", "A batch's search (encode + score + hits)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Gauge("bge_index_serve_generation", "The index generation served", registry=r)
        self.index = Gauge("bge_index_serve_index", "1 for the index and generation served (its identity)",
                           ["index_dir", "created", "model", "generation"], registry=r)
        self.serving = Gauge("bge_index_serve_serving", "1 while a generation is served, 0 when none can be",
                             registry=r)

    def watch(self, queued_queries: Callable[[], float], queued_requests: Callable[[], float],
              served: Callable[[], tuple[str, str, str, int] | None]) -> None:
        """Read the gauges from callables at each scrape: queue depths, and (index_dir, created, model,
        generation) of what is served (None: nothing can be served)."""
        self.queued_queries.set_function(queued_queries)
        self.queued_requests.set_function(queued_requests)
        self._served = served

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answer (routes outside ROUTES are counted as "other")."""
        route = route if route in ROUTES else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, queries: int, seconds: float) -> None:
        """Record one batch: how many queries it answered and how long its searches took."""
        self.batch_queries.observe(queries)
        self.batch_seconds.observe(seconds)

    def count_refused(self, reason: str) -> None:
        """Count a refusal or a drop ("queue full", "deadline", "client gone", "slow headers", ...)."""
        self.refused.labels(reason).inc()

    def render(self) -> bytes:
        """The text exposition of every metric, the served generation's read now."""
        served = getattr(self, "_served", None)
        current = served() if served is not None else None
        self.index.clear()
        if current is None:
            self.serving.set(0)
        else:
            index_dir, created, model, generation = current
            self.serving.set(1)
            self.generation.set(generation)
            self.index.labels(index_dir, created, model, str(generation)).set(1)
        return generate_latest(self.registry)
