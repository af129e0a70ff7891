"""Process plumbing shared by the services: open the process's connections in
one place, and run the worker or buffer until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.exceptions import RedisError

from .broker import connect_nats, ensure_streams
from .health import serve_health
from .metrics import Metrics
from .settings import BrokerSettings, HealthSettings
from .store import connect_redis

__all__ = ["Connections", "open_connections", "Service", "run_service"]


@dataclass
class Connections:
    """One NATS connection and one bounded Redis pool per process."""

    nc: NATS
    js: JetStreamContext
    redis: aioredis.Redis

    async def checks(self) -> dict[str, bool]:
        """Readiness: NATS connected and Redis answering."""
        try:
            redis_ok = bool(await self.redis.ping())
        except (RedisError, OSError):
            redis_ok = False
        return {"nats": self.nc.is_connected, "redis": redis_ok}

    async def close(self) -> None:
        try:
            await self.nc.drain()
        finally:
            await self.redis.aclose()


async def open_connections(
    broker: BrokerSettings, *, name: str, on_reconnect: Callable[[], None] | None = None
) -> Connections:
    """Connect to NATS and Redis and make sure the JetStream streams exist."""
    nc = await connect_nats(broker.nats_url, name=name, on_reconnect=on_reconnect)
    js = nc.jetstream()
    await ensure_streams(js)
    return Connections(nc=nc, js=js, redis=connect_redis(broker))


class Service(Protocol):
    @property
    def metrics(self) -> Metrics: ...

    def stop(self) -> None: ...

    async def run(self) -> None: ...


def run_service(
    name: str,
    broker: BrokerSettings,
    build: Callable[[Connections], Service],
    *,
    health: HealthSettings,
) -> None:
    """Open connections, build the service, run it until a signal, clean up."""

    async def main() -> None:
        connections = await open_connections(broker, name=name)
        service = build(connections)
        server = None
        if health.port:
            server = await serve_health(health.host, health.port, connections.checks, service.metrics.render)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        try:
            await service.run()
        finally:
            if server is not None:
                server.close()
            await connections.close()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
