"""NATS: one connection per process, and the JetStream streams the services share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError

from .pull import ConsumerLost
from .settings import masked_url
from .subjects import STREAM_GENERATED, STREAM_REQUESTS, SUBJECT_REQUESTS, generated_wildcard

__all__ = [
    "NatsUnreachable", "Streams", "connect_nats", "ensure_streams", "jetstream_enabled", "describe_error", "stream_gone",
]

log = logging.getLogger(__name__)

# While a broker is away, say so at most this often (the client retries every 0.5 s).
LOG_EVERY_S = 5.0



def describe_error(exc: BaseException) -> str:
    """A failure in a few words: ``connection refused``, not a traceback."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ").strip("'")


class NatsUnreachable(Exception):
    """No server of the URL accepted a connection; ``cause`` is the last failure."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe_error(cause))
        self.cause = cause

    @property
    def auth_failed(self) -> bool:
        return isinstance(self.cause, nats.errors.AuthorizationError) or "authorization" in str(self.cause).lower()


class _FirstConnectFailed(Exception):
    """Raised from the error callback to end nats-py's first connect, which
    would otherwise retry forever without returning (the callers wait with
    their own backoff, say where they wait and obey signals)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def connect_nats(
    url: str,
    *,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
) -> NATS:
    """Try each server of ``url`` once; raise :class:`NatsUnreachable` when none answers.

    Once connected, reconnects are unlimited: a broker restart is waited out,
    not fatal, and said in the log at most every ``LOG_EVERY_S``.
    ``on_reconnect`` runs after each reconnect: core NATS messages published
    while disconnected are gone, so live consumers must catch up from Redis.
    """
    servers = [one.strip() for one in url.split(",") if one.strip()]
    where = masked_url(url)
    established = False
    failures: list[BaseException] = []
    last_log = 0.0
    quiet = 0

    async def disconnected() -> None:
        if established and not (nc.is_closed or nc.is_draining):  # not our own close
            log.warning("nats disconnected from %s", where, extra={"event": "nats_disconnected", "nats": where})

    async def reconnected() -> None:
        nonlocal quiet, last_log
        log.info("nats reconnected to %s", where, extra={"event": "nats_reconnected", "nats": where})
        quiet, last_log = 0, 0.0
        if on_reconnect is not None:
            on_reconnect()

    async def error(exc: Exception) -> None:
        nonlocal quiet, last_log
        if not established:
            failures.append(exc)
            if len(failures) >= len(servers) or isinstance(exc, nats.errors.AuthorizationError):
                raise _FirstConnectFailed(exc)
            return
        now = time.monotonic()
        if now - last_log < LOG_EVERY_S:
            quiet += 1
            return
        more = f" ({quiet} more since the last report)" if quiet else ""
        log.warning(
            "nats at %s: %s%s", where, describe_error(exc), more,
            extra={"event": "nats_error", "nats": where, "cause": describe_error(exc)},
        )
        quiet, last_log = 0, now

    nc = NATS()
    try:
        await nc.connect(
            servers,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py says int; it sleeps a float
            connect_timeout=5,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            pending_size=8 * 1024 * 1024,
        )
    except _FirstConnectFailed as failed:
        await _discard(nc)
        raise NatsUnreachable(failed.cause) from None
    except BaseException:
        await _discard(nc)
        raise
    established = True
    return nc


async def _discard(nc: NATS) -> None:
    """Close a client whose first connect failed (it may hold a socket)."""
    try:
        await nc.close()
    except Exception:  # noqa: BLE001 - nothing more to do with a client that never connected
        pass


def jetstream_enabled(nc: NATS) -> bool:
    """Whether the connected server said (in its INFO) that it runs JetStream."""
    return bool(nc._server_info.get("jetstream"))  # noqa: SLF001 - nats-py exposes no accessor


# Requests wait as long as the queue timeout can be (its upper bound): a worker
# that takes a stale one ends its turn with a clear error instead of it vanishing.
REQUEST_MAX_AGE_S = 3600.0
GENERATED_MAX_AGE_S = 86_400.0


async def ensure_streams(js: JetStreamContext, *, generated_storage: str = "file") -> None:
    """Create (or update) the two work-queue streams; safe to call from every process.

    ``CHAT_REQUESTS`` holds turn requests until a worker takes one; messages
    are deduplicated by ``Nats-Msg-Id`` so a retried publish starts one turn.
    ``CHAT_GENERATED`` holds generated frames until a buffer has stored them,
    in ``generated_storage`` (``file`` or ``memory``). JetStream cannot change
    an existing stream's storage: that update is refused (``APIError``).
    """
    configs = [
        StreamConfig(
            name=STREAM_REQUESTS,
            subjects=[SUBJECT_REQUESTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=REQUEST_MAX_AGE_S,
            duplicate_window=120.0,
            discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=STREAM_GENERATED,
            subjects=[generated_wildcard()],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType(generated_storage),
            max_age=GENERATED_MAX_AGE_S,
            discard=DiscardPolicy.NEW,
        ),
    ]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


STREAM_NOT_FOUND = 10059  # JetStream's API error code for a stream that does not exist
RESTORE_EVERY_S = 0.5  # callers that find a stream gone meanwhile retry; they share one check


def stream_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says a stream (or a pull's consumer) does not exist: a JetStream
    publish nobody answers ("no response from stream"), the API's "stream not found",
    or :class:`shared.pull.ConsumerLost` (a pull answered "no responders")."""
    if isinstance(exc, NoStreamResponseError | nats.errors.NoRespondersError):
        return True
    if isinstance(exc, APIError) and exc.err_code == STREAM_NOT_FOUND:
        return True
    return isinstance(exc, ConsumerLost)


class Streams:
    """The product's streams as one process sees them: made at start, and made again
    (:meth:`restore`) as soon as one is found gone, whatever removed it: a restarted
    nats-server with memory storage or without its store, or an operator. ``healthy``
    is False from a failed attempt to make them until one succeeds (/readyz reports it)."""

    def __init__(self, js: JetStreamContext, *, generated_storage: str = "file") -> None:
        self.js = js
        self.generated_storage = generated_storage
        self.healthy = True
        self._lock = asyncio.Lock()
        self._checked_at = -RESTORE_EVERY_S

    async def ensure(self) -> None:
        """Create or update both streams (:func:`ensure_streams`); raises what it raises."""
        await ensure_streams(self.js, generated_storage=self.generated_storage)
        self.healthy = True

    async def recover(self, exc: BaseException) -> bool:
        """After a failed publish or pull: if ``exc`` says a stream is gone
        (:func:`stream_gone`), :meth:`restore` and return True, else False."""
        if not stream_gone(exc):
            return False
        await self.restore()
        return True

    async def restore(self) -> None:
        """Make the streams again after a failure that says one is gone. At most one
        check per ``RESTORE_EVERY_S`` for all callers (a burst of failing publishes
        makes one API call); a failure is logged, and the callers' retries come back."""
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._checked_at < RESTORE_EVERY_S:
                return
            self._checked_at = now
            try:
                await self.ensure()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self.healthy = False
                log.warning("could not make the streams again: %s", describe_error(exc),
                            extra={"event": "streams_not_restored", "cause": describe_error(exc)})
                return
        log.info("checked the streams after finding one gone", extra={"event": "streams_restored"})
