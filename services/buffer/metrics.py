"""The buffer's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import LATENCY_BUCKETS_S, Metrics

__all__ = ["BufferMetrics"]


class BufferMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.frames_stored = Counter("chat_buffer_frames_stored_total", "Frames stored in Redis and published.", registry=r)
        self.batches = Counter("chat_buffer_batches_total", "Batches stored (one Redis round trip each).", registry=r)
        self.store = Histogram("chat_buffer_store_seconds", "Stage: storing one batch in Redis.", buckets=LATENCY_BUCKETS_S, registry=r)
        self.replays = Counter("chat_buffer_replays_total", "Replay requests answered.", registry=r)
        self.replayed_frames = Counter("chat_buffer_replayed_frames_total", "Frames sent in replays.", registry=r)
        self.turns_reaped = Counter("chat_buffer_turns_reaped_total", "Turns ended by the reaper, by cause.", ["cause"], registry=r)
