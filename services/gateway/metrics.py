"""The gateway's Prometheus metrics, on a registry of its own (one per app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.metrics import LATENCY_BUCKETS_S

__all__ = ["GatewayMetrics"]


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connections = Gauge("chat_gateway_open_connections", "Open client connections.", ["kind"], registry=r)
        self.connections_total = Counter("chat_gateway_connections_total", "Client connections accepted.", ["kind"], registry=r)
        self.turns_started = Counter("chat_gateway_turns_started_total", "Turns queued for a worker.", registry=r)
        self.frames_delivered = Counter("chat_gateway_frames_delivered_total", "chunk and done frames sent to clients.", registry=r)
        self.replays = Counter("chat_gateway_replays_total", "Replay requests sent to buffers.", registry=r)
        self.replayed_frames = Counter("chat_gateway_replayed_frames_total", "Frames received by replay.", registry=r)
        self.reconnects = Counter("chat_gateway_reconnects_total", "Connections resuming a session (last_seq > 0).", registry=r)
        self.replay_seconds = Histogram("chat_gateway_replay_seconds", "Stage: one replay request to a buffer.", buckets=LATENCY_BUCKETS_S, registry=r)
        self.pauses = Counter("chat_gateway_pauses_total", "Pause requests that paused a session.", registry=r)
        self.slow_readers = Counter("chat_gateway_slow_readers_total", "Connections closed because their send queue filled.", registry=r)
        # Tasks alive in the gateway's event loop, read at scrape time: a leak shows as growth.
        self.tasks = Gauge("chat_gateway_tasks", "asyncio tasks alive in the gateway.", registry=r)
        self.tasks.set_function(lambda: len(asyncio.all_tasks()))
        # Set to the subscriptions' count by the gateway: one per session with connections here.
        self.sessions = Gauge("chat_gateway_subscribed_sessions", "Sessions this gateway is subscribed to.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
