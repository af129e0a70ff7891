"""Process plumbing shared by the services: open the process's connections in
one place, and run the worker or buffer until SIGTERM/SIGINT.

Start-up waits for NATS and Redis (both at once) instead of failing or
hanging: meanwhile the process serves liveness, reports in readiness what it
waits for, logs which URL it cannot reach and why (at most every few
seconds), and stops at once on SIGTERM/SIGINT. What waiting cannot fix (a
NATS without JetStream, a refused password) ends the process with one line.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

from .backoff import Backoff
from .broker import NatsUnreachable, Streams, connect_nats, describe_error, jetstream_enabled
from .health import serve_health
from .metrics import Metrics
from .settings import BrokerSettings, HealthSettings, masked_url
from .store import connect_redis

__all__ = [
    "Connections",
    "Startup",
    "StartupFailed",
    "open_connections",
    "Service",
    "run_service",
    "listen_error",
]

log = logging.getLogger(__name__)

# Retry delays while a broker is away: 0.5 s, 1 s, 2 s, then every 3 s.
RETRY_INITIAL_S = 0.5
RETRY_CAP_S = 3.0
_RETRY = Backoff(initial_s=RETRY_INITIAL_S, cap_s=RETRY_CAP_S)  # its ceilings: 0.5, 1, 2, then 3 s
# Say that a broker is still away at most this often (and whenever the cause changes).
REPORT_EVERY_S = 5.0
# Draining NATS on the way out is bounded: a stop must not wait on a dead broker.
DRAIN_TIMEOUT_S = 5.0


class StartupFailed(Exception):
    """A start-up failure that waiting will not fix; its message is one line for the operator."""


READINESS_TIMEOUT_S = 1.0  # what a probe waits by default (Kubernetes: timeoutSeconds 1)


@dataclass
class Connections:
    """One NATS connection and one bounded Redis pool per process."""

    nc: NATS
    js: JetStreamContext
    redis: aioredis.Redis
    streams: Streams

    async def checks(self) -> dict[str, bool]:
        """Readiness: NATS connected, its streams there (as far as this process has
        seen: one found gone is made again), and Redis answering."""
        try:  # bounded: a Redis that hangs (not refuses) must not hang the probe
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), READINESS_TIMEOUT_S))
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        return {"nats": self.nc.is_connected and self.streams.healthy, "redis": redis_ok}

    async def close(self) -> None:
        try:
            await _close_nats(self.nc)
        finally:
            await self.redis.aclose()


async def _close_nats(nc: NATS) -> None:
    """Drain if connected (bounded), else just close: a broker that is away cannot be drained."""
    if nc.is_closed:
        return
    if nc.is_connected:
        try:
            await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
            return
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.warning("nats drain failed: %s", describe_error(exc), extra={"event": "nats_drain_failed"})
    try:
        await nc.close()
    except (nats.errors.Error, OSError, RuntimeError):
        # RuntimeError: nats-py's close writes its pending buffer to the
        # transport of the connection that was lost, which uvloop refuses
        # ("the handler is closed"); there is nothing left to send anyway.
        pass


@dataclass
class Startup:
    """Where a process is in its start-up, for /readyz: what it still waits for, then its connections."""

    up: dict[str, bool] = field(default_factory=lambda: {"nats": False, "redis": False})
    waiting: dict[str, str] = field(default_factory=dict)
    connections: Connections | None = None
    fatal: str | None = None

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, the /readyz body): the connections' checks once open, else what is awaited."""
        if self.connections is not None:
            checks = await self.connections.checks()
            ready = all(checks.values())
            return ready, {"ready": ready, **checks}
        waiting = [self.waiting[name] for name in ("nats", "redis") if name in self.waiting]
        if self.fatal:
            waiting = [self.fatal]
        return False, {"ready": False, **self.up, "waiting": waiting or ["starting"]}


class _Reporter:
    """Logs that a broker is away: the first failure, a changed cause, else every ``REPORT_EVERY_S``."""

    def __init__(self, broker: str, where: str, startup: Startup) -> None:
        self.broker, self.where, self.startup = broker, where, startup
        self.since = time.monotonic()
        self.last_report = 0.0
        self.last_cause = ""
        self.attempts = 0

    def failed(self, what: str, cause: str) -> float:
        """Note a failed attempt; return the delay before the next one."""
        self.attempts += 1
        now = time.monotonic()
        message = f"{what}: {cause}"
        self.startup.waiting[self.broker] = message
        if cause != self.last_cause or now - self.last_report >= REPORT_EVERY_S:
            waited = now - self.since
            log.warning(
                "%s; still waiting after %.0f s" if waited >= 1 else "%s; waiting for it", message, *([waited] if waited >= 1 else []),
                extra={"event": f"{self.broker}_waiting", self.broker: self.where, "cause": cause,
                       "attempts": self.attempts},
            )
            self.last_report, self.last_cause = now, cause
        return _RETRY.ceiling(self.attempts - 1)

    def succeeded(self) -> None:
        self.startup.waiting.pop(self.broker, None)
        self.startup.up[self.broker] = True
        if self.attempts:
            log.info(
                "%s at %s answers after %.1f s", self.broker, self.where, time.monotonic() - self.since,
                extra={"event": f"{self.broker}_up", self.broker: self.where},
            )


async def _wait_for_nats(
    broker: BrokerSettings, *, name: str, on_reconnect: Callable[[], None] | None, startup: Startup
) -> tuple[NATS, Streams]:
    """Connect to NATS and make sure the JetStream streams exist, waiting for both."""
    url = broker.nats_url
    where = masked_url(url)
    report = _Reporter("nats", where, startup)
    restoring: set[asyncio.Task[None]] = set()

    def reconnected() -> None:
        # A restarted nats-server may have lost the streams (memory storage
        # always does; file storage if its store was not kept): make them again
        # now, rather than at the first publish or pull that finds one gone.
        task = asyncio.get_running_loop().create_task(streams.restore())
        restoring.add(task)
        task.add_done_callback(restoring.discard)
        if on_reconnect is not None:
            on_reconnect()

    while True:
        try:
            nc = await connect_nats(url, name=name, on_reconnect=reconnected)
        except NatsUnreachable as exc:
            if exc.auth_failed:
                raise StartupFailed(
                    f"nats at {where} refused the connection ({exc}): check the user and password "
                    "(or token) in CHAT_NATS_URL"
                ) from None
            await asyncio.sleep(report.failed(f"cannot reach nats at {where}", str(exc)))
            continue
        break
    js = nc.jetstream()
    streams = Streams(js, generated_storage=broker.generated_storage)
    try:
        while True:
            try:
                await streams.ensure()
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError, APIError) as exc:
                if not jetstream_enabled(nc):
                    raise StartupFailed(
                        f"JetStream is not enabled on nats at {where}: start nats-server with -js "
                        "(or enable jetstream in its config)"
                    ) from None
                if isinstance(exc, APIError) and exc.code not in (None, 503):
                    hint = ""
                    if "storage" in str(exc.description or ""):
                        hint = (
                            f": CHAT_JS_STORAGE={broker.generated_storage} differs from the existing "
                            "CHAT_GENERATED stream's storage; set it alike on every service, or see "
                            "docs/configuration.md to change it"
                        )
                    raise StartupFailed(
                        f"nats at {where} refused the streams' setup: {exc.description or exc}{hint}"
                    ) from None
                await asyncio.sleep(report.failed(f"waiting for JetStream on nats at {where}", describe_error(exc)))
            except (nats.errors.Error, OSError) as exc:
                await asyncio.sleep(report.failed(f"waiting for nats at {where}", describe_error(exc)))
    except BaseException:
        await _close_nats(nc)
        raise
    report.succeeded()
    return nc, streams


def _redis_refusal(exc: RedisError) -> str | None:
    """Why Redis refuses this client for good (a wrong password, no such database), or None."""
    text = str(exc)
    if isinstance(exc, AuthenticationError | AuthorizationError) or any(
        word in text for word in ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")
    ):
        return f"refused the password ({text}): check CHAT_REDIS_URL"
    if isinstance(exc, ResponseError) and "DB index" in text:
        return f"has no such database ({text}): check the /<db> in CHAT_REDIS_URL"
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The OS error behind a redis-py error (``connection refused``), else the error itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, RedisError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


async def _wait_for_redis(broker: BrokerSettings, *, startup: Startup) -> aioredis.Redis:
    where = masked_url(str(broker.redis_url))
    report = _Reporter("redis", where, startup)
    redis = connect_redis(broker)
    try:
        while True:
            try:
                await redis.ping()
                break
            except (RedisError, OSError) as exc:
                refusal = _redis_refusal(exc) if isinstance(exc, RedisError) else None
                if refusal is not None:
                    raise StartupFailed(f"redis at {where} {refusal}") from None
                await asyncio.sleep(report.failed(f"cannot reach redis at {where}", describe_error(_root_cause(exc))))
    except BaseException:
        await redis.aclose()
        raise
    report.succeeded()
    return redis


async def open_connections(
    broker: BrokerSettings,
    *,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
    startup: Startup | None = None,
) -> Connections:
    """Connect to NATS and Redis and make sure the JetStream streams exist.

    Waits (both at once, with backoff) for a broker that does not answer yet,
    noting in ``startup`` what it waits for; cancel it to give up. Raises
    :class:`StartupFailed` for what waiting will not fix.
    """
    startup = startup or Startup()
    nats_task = asyncio.create_task(_wait_for_nats(broker, name=name, on_reconnect=on_reconnect, startup=startup))
    redis_task = asyncio.create_task(_wait_for_redis(broker, startup=startup))
    tasks = (nats_task, redis_task)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if nats_task.done() and not nats_task.cancelled() and nats_task.exception() is None:
            await _close_nats(nats_task.result()[0])
        if redis_task.done() and not redis_task.cancelled() and redis_task.exception() is None:
            await redis_task.result().aclose()
        raise
    nc, streams = nats_task.result()
    return Connections(nc=nc, js=streams.js, redis=redis_task.result(), streams=streams)


def listen_error(exc: OSError, host: str, port: int, *, port_setting: str, host_setting: str) -> str:
    """One line for a port that cannot be listened on."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = "address in use"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no such address on this machine"
    else:
        why = describe_error(exc)
    return f"cannot listen on {where}: {why}; set {port_setting} (and {host_setting})"


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
    """Open connections (waiting for the brokers), build the service, run it
    until SIGTERM/SIGINT, clean up. A signal stops it in any state."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        startup = Startup()
        stopping = asyncio.Event()
        service: Service | None = None

        def on_signal() -> None:
            stopping.set()
            if service is not None:
                service.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)

        server = None
        if health.port:
            try:
                server = await serve_health(
                    health.host,
                    health.port,
                    startup.readiness,
                    lambda: service.metrics.render() if service is not None else None,
                )
            except OSError as exc:
                raise StartupFailed(
                    listen_error(exc, health.host, health.port, port_setting="CHAT_HEALTH_PORT", host_setting="CHAT_HEALTH_HOST")
                ) from None
        try:
            connections = await _until(stopping, open_connections(broker, name=name, startup=startup))
            if connections is None:
                log.info("stopped while starting", extra={"event": "stopped"})
                return
            try:
                startup.connections = connections
                service = build(connections)
                if stopping.is_set():
                    service.stop()
                await service.run()
            finally:
                await connections.close()
        finally:
            if server is not None:
                server.close()

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            asyncio.run(main())
        else:
            uvloop.run(main())
    except StartupFailed as exc:
        sys.exit(f"{name}: {exc}")


async def _until(stopping: asyncio.Event, work: Awaitable[Connections]) -> Connections | None:
    """``work``'s result, or None if ``stopping`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except StartupFailed:
        pass
    else:  # it finished as it was cancelled: close what it opened
        await task.result().close()
    return None


def stop_process() -> None:
    """Stop this process the way an operator would: SIGTERM to itself."""
    os.kill(os.getpid(), signal.SIGTERM)
