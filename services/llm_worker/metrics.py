"""The worker's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS_S, Metrics

__all__ = ["WorkerMetrics"]


class WorkerMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.turns_started = Counter("chat_worker_turns_started_total", "Turns this worker claimed.", registry=r)
        self.turns_finished = Counter("chat_worker_turns_finished_total", "Turns ended, by done reason.", ["reason"], registry=r)
        self.active_turns = Gauge("chat_worker_active_turns", "Turns generating now.", registry=r)
        self.chunks = Counter("chat_worker_chunks_total", "Chunks published.", registry=r)
        self.queue_wait = Histogram("chat_worker_queue_wait_seconds", "From the gateway queueing a turn to a worker starting it.", buckets=LATENCY_BUCKETS_S, registry=r)
        self.first_token = Histogram("chat_worker_first_token_seconds", "From starting a turn to the model's first text.", buckets=LATENCY_BUCKETS_S, registry=r)
        self.publish = Histogram("chat_worker_publish_seconds", "Stage: publishing one frame to JetStream, ack included.", buckets=LATENCY_BUCKETS_S, registry=r)
