"""Session controls shared by the WebSocket and HTTP paths: start a turn,
pause, resume, stop. Each writes the session record in Redis first (the
durable truth), then tells the other services over NATS."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shared.auth import Principal, TokenService
from shared.broker import Streams
from shared.errors import BrokerUnavailable, ProtocolError, SessionStateError
from shared.messages import TRACE_HEADER, Control, TurnRequest
from shared.protocol import encode, validate_prompt
from shared.session import Delivery, Send
from shared.store import SessionMeta, SessionStore, StartResult
from shared.subjects import SUBJECT_REQUESTS, control_subject

from .feed import SessionFeed
from .metrics import GatewayMetrics
from .outbox import Outbox
from .settings import Settings
from .subscriptions import SessionSubscriptions

__all__ = ["Gateway", "ConnectionLimits"]

log = logging.getLogger(__name__)


class ConnectionLimits:
    """Open connections of this process, in total and per user (decided before the upgrade)."""

    def __init__(self, max_total: int, max_per_user: int) -> None:
        self.max_total = max_total
        self.max_per_user = max_per_user
        self.total = 0
        self.per_user: Counter[str] = Counter()

    def acquire(self, user: str | None) -> None:
        """Take a slot for a new connection; pair with :meth:`release`.

        Raises:
            ProtocolError: ``unavailable`` (this process is full) or
                ``rate_limited`` (the user is at the limit).
        """
        self.check(user)
        self.take(user)

    def take(self, user: str | None) -> None:
        """Take a slot without checking (after :meth:`check`, once a response has started)."""
        self.total += 1
        if user is not None:
            self.per_user[user] += 1

    def check(self, user: str | None) -> None:
        """Raise as :meth:`acquire` would, without taking a slot."""
        if self.total >= self.max_total:
            raise ProtocolError("this gateway is at its connection limit; try another or later", code="unavailable")
        if user is not None and self.per_user[user] >= self.max_per_user:
            raise ProtocolError(f"too many connections for this user (the limit is {self.max_per_user})", code="rate_limited")

    def release(self, user: str | None) -> None:
        self.total -= 1
        if user is not None:
            self.per_user[user] -= 1
            if not self.per_user[user]:
                del self.per_user[user]


@dataclass
class Gateway:
    """What every endpoint needs: settings and the process's connections."""

    settings: Settings
    nc: NATS
    js: JetStreamContext
    store: SessionStore
    tokens: TokenService
    streams: Streams
    feeds: set[SessionFeed] = field(default_factory=set)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    connections: ConnectionLimits = field(init=False)
    subscriptions: SessionSubscriptions = field(init=False)

    def __post_init__(self) -> None:
        limits = self.settings.limits
        self.connections = ConnectionLimits(limits.max_connections, limits.max_connections_per_user)
        self.subscriptions = SessionSubscriptions(self.nc)
        self.metrics.sessions.set_function(lambda: len(self.subscriptions.sessions))

    async def authorize(self, session: str, principal: Principal) -> None:
        """Let ``principal`` use the session, claiming it if nobody owns it yet.

        Raises:
            ProtocolError: ``forbidden``, the session belongs to another user.
        """
        if not await self.store.check_owner(session, principal.user):
            raise ProtocolError("this session belongs to another user", code="forbidden")

    def open_feed(
        self, session: str, last_seq: int, meta: SessionMeta, emit: Callable[[Send], None], outbox: Outbox[Any]
    ) -> SessionFeed:
        """A feed for one connection from ``last_seq``, with this gateway's limits.

        Frames held ahead of a gap are capped at a quarter of the send queue,
        and replays fill at most what is free, so a client that keeps reading
        always catches up, however small the queue.
        """
        delivery = Delivery(
            delivered=last_seq,
            paused=meta.paused,
            version=meta.pause_version,
            max_pending=max(1, min(1024, outbox.maxsize // 4)),
        )
        return SessionFeed(
            nc=self.nc,
            subscriptions=self.subscriptions,
            session=session,
            delivery=delivery,
            emit=emit,
            inbox_frames=self.settings.limits.inbox_frames,
            gap_timeout_s=self.settings.timeouts.gap_timeout_s,
            replay_timeout_s=self.settings.timeouts.replay_timeout_s,
            registry=self.feeds,
            metrics=self.metrics,
            room=outbox.room,
            pause_state=lambda: self._pause_state(session),
        )

    async def _pause_state(self, session: str) -> tuple[bool, int]:
        meta = await self.store.meta(session)
        return meta.paused, meta.pause_version

    async def start_turn(
        self, session: str, prompt: str, *, client_id: str | None = None, user: str | None = None
    ) -> StartResult:
        """Claim the session for a turn and queue it for a worker.

        A chat resent with the ``client_id`` of the last accepted one (a
        client retrying after a reconnect) gets that turn back and starts
        nothing.

        Raises:
            ProtocolError: the prompt is invalid, a turn is already generating
                (``busy``), or the request could not be queued (``unavailable``).
        """
        validate_prompt(prompt, max_prompt_chars=self.settings.limits.max_prompt_chars)
        result = await self.store.start_turn(
            session,
            prompt,
            client_id=client_id,
            user=user,
            max_turns_per_user=self.settings.limits.max_turns_per_user,
            now=time.time(),
            claim_within_s=self.settings.timeouts.queue_timeout_s,
        )
        if result.duplicate:
            return result
        if result.too_many:
            raise ProtocolError(
                f"you have {result.turn} answers generating (the limit); wait for one to finish", code="rate_limited"
            )
        if not result.started:
            raise ProtocolError(
                f"turn {result.turn} is still generating; wait for its done or stop it", code="busy"
            )
        request = TurnRequest(
            session=session,
            turn=result.turn,
            prompt=prompt,
            base_seq=result.base_seq,
            enqueued_at=time.time(),
            user=user,
        )
        trace = secrets.token_hex(8)
        # The message id makes a retried publish start one turn, not two.
        headers = {"Nats-Msg-Id": f"{session}:{result.turn}", TRACE_HEADER: trace}
        try:
            try:
                await self.js.publish(SUBJECT_REQUESTS, encode(request), headers=headers, timeout=5)
            except Exception as exc:
                if not await self.streams.recover(exc):  # deleted, or lost in a nats-server restart: made again
                    raise
                await self.js.publish(SUBJECT_REQUESTS, encode(request), headers=headers, timeout=5)
        except Exception as exc:
            log.warning("could not queue turn: %s", exc, extra={"session": session, "turn": result.turn})
            await self.store.abort_turn(session, result.turn)
            raise BrokerUnavailable("the message broker is unavailable") from exc
        self.metrics.turns_started.inc()
        log.info("turn queued", extra={"session": session, "turn": result.turn, "trace": trace, "event": "turn_queued"})
        return result

    async def pause(self, session: str) -> int:
        """Set the session's pause flag; return its version."""
        changed, version = await self.store.set_paused(session, True)
        if changed:
            self.metrics.pauses.inc()
            await self.nc.publish(control_subject(session), encode(Control("pause", version)))
        return version

    async def resume(self, session: str) -> tuple[bool, int]:
        """Clear the pause flag; return (whether it was set, its version).

        A connection may still be paused when the flag is already clear (it
        missed the broadcast while NATS reconnected), so callers resume their
        own delivery either way and report "not paused" only if it was not.
        """
        changed, version = await self.store.set_paused(session, False)
        if changed:
            await self.nc.publish(control_subject(session), encode(Control("resume", version)))
        return changed, version

    async def stop(self, session: str) -> int:
        """Ask the worker to cancel the generating turn; return the turn.

        Raises:
            SessionStateError: no turn is generating.
        """
        turn = await self.store.request_stop(session)
        if turn is None:
            raise SessionStateError("no turn is generating")
        await self.nc.publish(control_subject(session), encode(Control("stop", turn=turn)))
        return turn
