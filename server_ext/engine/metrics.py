"""Prometheus metrics of ``leyline serve``, on a registry of the app's own (several apps may
share a process). Request counts are labelled by route template, never by raw path: a client
must not be able to grow ``/metrics`` by inventing URLs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leyline.server.engine.engine import Engine
from leyline.server.engine.request import Finished

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "leyline_requests",
            "HTTP requests by route template and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "leyline_prompt_tokens", "Prompt tokens by how they were served", ["kind"], registry=r
        )
        self.completion_tokens = Counter(
            "leyline_completion_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "leyline_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "leyline_request_latency_seconds",
            "Engine time per request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_used = Gauge("leyline_kv_used_tokens", "KV slots in use", registry=r)
        self.kv_capacity = Gauge("leyline_kv_capacity_tokens", "KV slots in the pool", registry=r)
        self.evicted = Gauge("leyline_evicted_tokens", "Tokens evicted so far", registry=r)
        self.sessions = Gauge("leyline_sessions", "Open sessions", registry=r)
        self.queue = Gauge("leyline_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge("leyline_running", "Requests decoding", registry=r)
        self.engine = engine
        engine.observers.append(self.observe)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe(self, done: Finished) -> None:
        for kind, n in done.tokens.to_wire().items():
            if kind != "approximate":  # a sum of three kinds, not a kind
                self.prompt_tokens.labels(kind).inc(n)
        self.completion_tokens.inc(len(done.token_ids))
        self.ttft.observe(done.ttft_s)
        self.latency.observe(done.latency_s)

    def render(self) -> bytes:
        stats = self.engine.stats()
        self.kv_used.set(stats["kv"]["used_tokens"])
        self.kv_capacity.set(stats["kv"]["capacity_tokens"])
        self.evicted.set(stats["counters"]["evicted_tokens"])
        self.sessions.set(stats["sessions"])
        self.queue.set(stats["queue"])
        self.running.set(stats["running"])
        return generate_latest(self.registry)
