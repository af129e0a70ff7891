"""NATS: one connection per process, and the JetStream streams the services share."""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .subjects import STREAM_GENERATED, STREAM_REQUESTS, SUBJECT_REQUESTS, generated_wildcard

__all__ = ["connect_nats", "ensure_streams"]

log = logging.getLogger(__name__)


async def connect_nats(
    url: str,
    *,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
) -> NATS:
    """Connect with unlimited reconnects: a broker restart is waited out, not fatal.

    ``on_reconnect`` runs after each reconnect: core NATS messages published
    while disconnected are gone, so live consumers must catch up from Redis.
    """

    async def disconnected() -> None:
        log.warning("nats disconnected", extra={"event": "nats_disconnected"})

    async def reconnected() -> None:
        log.info("nats reconnected", extra={"event": "nats_reconnected"})
        if on_reconnect is not None:
            on_reconnect()

    async def error(exc: Exception) -> None:
        log.warning("nats error: %s", exc, extra={"event": "nats_error"})

    return await nats.connect(
        url.split(","),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        pending_size=8 * 1024 * 1024,
    )


# Requests wait far longer than the queue timeout: a worker that takes a
# stale one ends its turn with a clear error instead of it vanishing.
REQUEST_MAX_AGE_S = 3600.0
GENERATED_MAX_AGE_S = 86_400.0


async def ensure_streams(js: JetStreamContext) -> None:
    """Create (or update) the two work-queue streams; safe to call from every process.

    ``CHAT_REQUESTS`` holds turn requests until a worker takes one; messages
    are deduplicated by ``Nats-Msg-Id`` so a retried publish starts one turn.
    ``CHAT_GENERATED`` holds generated frames until a buffer has stored them.
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
            storage=StorageType.FILE,
            max_age=GENERATED_MAX_AGE_S,
            discard=DiscardPolicy.NEW,
        ),
    ]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
