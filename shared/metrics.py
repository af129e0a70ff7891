"""Prometheus metrics: one registry per service object, rendered as text."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "LATENCY_BUCKETS_S"]

# Per-stage latencies: from a tenth of a millisecond to ten seconds.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Base of each service's metrics: a private registry (tests run many services in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def render(self) -> bytes:
        return generate_latest(self.registry)
