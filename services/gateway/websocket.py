"""The WebSocket endpoint: protocol v1 on ``/ws`` (and ``/``), and the original
design's plain-text client when it connects with ``sessionId=`` and no
subprotocol (docs/protocol.md, compatibility)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from shared import protocol
from shared.auth import Principal
from shared.errors import BrokerUnavailable, ProtocolError, SessionStateError
from shared.protocol import (
    CLOSE_1008_POLICY,
    CLOSE_1013_TRY_AGAIN_LATER,
    CLOSE_4001_TOKEN_EXPIRED,
    CLOSE_4003_FORBIDDEN,
    SUBPROTOCOL,
    Accepted,
    AuthOk,
    Chat,
    Chunk,
    Error,
    LastChat,
    Ping,
    Pong,
    Ready,
    decode_client_frame,
    decode_compat_frame,
    decode_server_frame,
    encode,
)
from shared.ratelimit import TokenBucket
from shared.session import LocalPause, LocalResume, Send
from shared.store import SessionMeta
from shared.subjects import new_session_id, validate_session_id

from .controls import Gateway
from .errors import error_response
from .outbox import Outbox

__all__ = ["websocket_endpoint", "parse_cursor", "token_from"]

log = logging.getLogger(__name__)

CLOSE_FLUSH_S = 1.0  # at most this long to send what is queued before a close frame

def parse_cursor(raw: str | None) -> int:
    """Parse ``last_seq`` / ``Last-Event-ID``: a non-negative integer, default 0."""
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise ProtocolError("last_seq must be a non-negative integer")
    return int(raw)


@dataclass(frozen=True)
class Handshake:
    session: str
    last_seq: int
    compat: bool
    subprotocol: str | None


def parse_handshake(websocket: WebSocket) -> Handshake:
    params = websocket.query_params
    offered = websocket.scope.get("subprotocols") or []
    compat = "sessionId" in params and SUBPROTOCOL not in offered
    if offered and SUBPROTOCOL not in offered:
        raise ProtocolError(f"unsupported subprotocol; this server speaks {SUBPROTOCOL}")
    raw_session = params.get("sessionId") if compat else params.get("session")
    session = new_session_id() if raw_session is None and not compat else validate_session_id(raw_session)
    return Handshake(
        session=session,
        last_seq=parse_cursor(params.get("last_seq")),
        compat=compat,
        subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None,
    )


def token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The request's token: ``Authorization: Bearer …`` or ``?token=`` (browsers cannot set headers)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query.get("token") or None


async def websocket_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    # Decide before the upgrade, so a refusal is an HTTP status (docs/protocol.md):
    # 400 parameters, 401 token, 403 origin or owner, 429/503 limits.
    try:
        handshake = parse_handshake(websocket)
        principal = gateway.tokens.principal(token_from(websocket.headers, websocket.query_params))
        origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
        if not gateway.settings.origins.allows_request(origin, host):
            raise ProtocolError(gateway.settings.origins.refusal(origin, host), code="forbidden")
        await gateway.authorize(handshake.session, principal)
        meta = await gateway.store.meta(handshake.session)
        if handshake.last_seq > meta.hwm:
            raise ProtocolError(f"last_seq {handshake.last_seq} is beyond the session's last seq {meta.hwm}")
        gateway.connections.acquire(principal.user)
    except ProtocolError as exc:
        await websocket.send_denial_response(error_response(exc.code, exc.message))
        return
    except BrokerUnavailable:
        await websocket.send_denial_response(error_response("unavailable", "the session store is unavailable"))
        return
    try:
        await websocket.accept(subprotocol=handshake.subprotocol)
        connection = Connection(gateway, websocket, handshake, meta, principal)
        if not handshake.compat:
            connection.send(ready_frame(gateway, handshake.session, meta, principal))
        del handshake, meta  # this frame lasts as long as the connection: hold no more than it needs
        await connection.serve()
    finally:
        gateway.connections.release(principal.user)


def ready_frame(gateway: Gateway, session: str, meta: SessionMeta, principal: Principal) -> Ready:
    last_chat = None
    if meta.last_chat_id is not None and meta.last_chat_turn is not None:
        last_chat = LastChat(id=meta.last_chat_id, turn=meta.last_chat_turn)
    limits = gateway.settings.limits
    return Ready(
        session=session, last_seq=meta.hwm, paused=meta.paused, exp=principal.exp, last_chat=last_chat,
        max_frame_bytes=limits.max_frame_bytes, max_prompt_chars=limits.max_prompt_chars,
    )


class Connection:
    """One accepted WebSocket, served by the endpoint's own task: it reads the
    client's frames; the feed's frames are pushed to the outbox as they come,
    and a writer task exists only while the outbox holds frames. A slow
    reader's overflow or an expired token stops the read by cancelling it
    (:meth:`_end`), so an idle connection holds one task."""

    __slots__ = (
        "gateway", "websocket", "session", "compat", "principal", "bucket", "over_limit", "close_with", "held",
        "outbox", "feed", "task", "writer", "expiry", "ended",
    )  # fmt: skip

    def __init__(
        self, gateway: Gateway, websocket: WebSocket, handshake: Handshake, meta: SessionMeta, principal: Principal
    ) -> None:
        self.gateway = gateway
        self.websocket = websocket
        self.session = handshake.session
        self.compat = handshake.compat
        self.principal = principal
        limits = gateway.settings.limits
        self.bucket = TokenBucket(rate_per_s=limits.frames_per_s, burst=limits.frame_burst)
        self.over_limit = 0
        self.close_with: tuple[int, str] | None = None  # set by whatever ends the connection
        self.held: list[Send] | None = None  # the feed's frames held while a chat is being answered
        self.outbox: Outbox[str] = Outbox(
            limits.send_queue_frames, on_ready=self._start_writer, on_overflow=self._slow_reader
        )
        # The original client tracks no seq: it gets what is generated from now on.
        cursor = meta.hwm if handshake.compat else handshake.last_seq
        self.feed = gateway.open_feed(self.session, cursor, meta, self.emit, self.outbox)
        self.task: asyncio.Task[None] | None = None  # the endpoint's task, serving this connection
        self.writer: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.ended = False

    def send(self, frame: protocol.ServerFrame) -> None:
        self.outbox.put(encode(frame).decode())

    def emit(self, send: Send) -> None:
        if self.held is not None:
            # A chat is being answered: its accepted goes out before any frame
            # of the turn it starts (a worker may be quicker than the reply).
            if len(self.held) >= self.outbox.maxsize:
                self.outbox.overflow()  # as a full send queue: the client resumes by replay
            else:
                self.held.append(send)
            return
        if not self.compat:
            self.outbox.put(send.data.decode())
            return
        if send.seq is not None:
            frame = decode_server_frame(send.data)
            if isinstance(frame, Chunk):
                self.outbox.put(frame.text)

    async def serve(self) -> None:
        """Serve the connection until the client leaves or :meth:`_end` ends it."""
        kind = "compat" if self.compat else "ws"
        metrics = self.gateway.metrics
        metrics.connections_total.labels(kind).inc()
        metrics.connections.labels(kind).inc()
        if self.feed.delivery.delivered > 0 and not self.compat:
            metrics.reconnects.inc()
        self.task = asyncio.current_task()
        try:
            self._arm_expiry()
            await self.feed.open()
            await self._read()
        except asyncio.CancelledError:
            # Cancelled by _end (close_with set), unless the server is stopping too.
            assert self.task is not None
            if self.close_with is None or self.task.uncancel() > 0:
                raise
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("connection failed", extra={"session": self.session})
            self.close_with = (protocol.CLOSE_1011_INTERNAL, "internal error")
        finally:
            self.task, self.ended = None, True  # nothing cancels this task, or starts a writer, any more
            self.feed.close()
            if self.expiry is not None:
                self.expiry.cancel()
            # What is queued (an error saying why, say) goes out before a close frame;
            # not to a client that is gone, or reads too slowly to wait for.
            flush = self.close_with is not None and not self.outbox.overflowed
            if self.writer is not None and not flush:
                self.writer.cancel()
            metrics.connections.labels(kind).dec()
        if self.close_with is not None:
            if flush and self.writer is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.writer, CLOSE_FLUSH_S)
            await self._close(*self.close_with)

    def _end(self, code: int, reason: str) -> None:
        """End the connection with ``code``: stop the read wherever it waits
        (the read itself sees ``close_with`` after the frame it is handling)."""
        if self.close_with is None:
            self.close_with = (code, reason)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def _slow_reader(self) -> None:
        # The writer may be stuck sending to a slow reader: end at once.
        self.gateway.metrics.slow_readers.inc()
        log.info("closing slow reader", extra={"session": self.session, "event": "slow_reader"})
        self._end(CLOSE_1013_TRY_AGAIN_LATER, "send queue full; reconnect with last_seq")

    def _arm_expiry(self) -> None:
        """Close with 4001 when the token expires and is not renewed within the
        grace (an anonymous connection never expires: no timer)."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.principal.exp is not None:
            remaining = self.principal.exp + self.gateway.settings.auth.grace_s - time.time()
            self.expiry = asyncio.get_running_loop().call_later(
                max(0.0, remaining), self._end, CLOSE_4001_TOKEN_EXPIRED, "token expired"
            )

    def _renew(self, token: str) -> None:
        """The auth frame: replace the connection's token with a fresh one for the same user."""
        if self.principal.user is None:
            raise ProtocolError("this connection has no token to renew; reconnect with one", code="unauthorized")
        try:
            principal = self.gateway.tokens.verify(token)
        except ProtocolError:
            self.close_with = (CLOSE_4001_TOKEN_EXPIRED, "token not valid")
            raise
        if principal.user != self.principal.user:
            self.close_with = (CLOSE_4003_FORBIDDEN, "token of another user")
            raise ProtocolError("the token is for another user", code="forbidden")
        self.principal = principal
        self._arm_expiry()
        assert principal.exp is not None
        self.send(AuthOk(exp=principal.exp))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except Exception:  # already closed
            pass

    def _start_writer(self) -> None:
        if self.writer is None and not self.ended:
            self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        """Send what the outbox holds, then end (the next frame starts a writer again)."""
        try:
            while (text := self.outbox.pop()) is not None:
                await self.websocket.send_text(text)
        except WebSocketDisconnect:
            pass  # the client is gone: the read sees it too
        except Exception:
            log.exception("connection failed", extra={"session": self.session})
            self._end(protocol.CLOSE_1011_INTERNAL, "internal error")
        finally:
            self.writer = None

    async def _read(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if self.compat:
                action = None if text is None else decode_compat_frame(text)
                # The original client expects no answer to anything but pause and resume.
                if not self._refused_by_rate(action) and action not in (None, "ping"):
                    await self._on_compat(action)
            else:
                frame = self._decode(text)
                if not self._refused_by_rate(frame):
                    await self._on_frame(frame)
            if self.close_with is not None:
                return

    def _refused_by_rate(self, frame: protocol.ClientFrame | protocol.CompatAction | ProtocolError | None) -> bool:
        """Spend the frame's share of the rate limit; True if it must be refused.

        ``ping`` and ``ack`` are free (guarantee 6). Past a burst of refusals
        the connection is closed with 1008: only abuse gets there.
        """
        if not protocol.rate_limited(None if isinstance(frame, ProtocolError) else frame):
            return False
        if self.bucket.take(time.monotonic()):
            self.over_limit = 0
            return False
        self.over_limit += 1
        if self.over_limit > self.gateway.settings.limits.frame_burst:
            self.close_with = (CLOSE_1008_POLICY, "rate limit exceeded")
        elif not self.compat:
            self.send(Error(code="rate_limited", message="too many frames; slow down"))
        return True

    @staticmethod
    def _decode(text: str | None) -> protocol.ClientFrame | ProtocolError:
        if text is None:
            return ProtocolError("binary frames are not supported; send JSON text")
        try:
            return decode_client_frame(text)
        except ProtocolError as exc:
            return exc

    async def _on_compat(self, action: protocol.CompatAction) -> None:
        try:
            if action == "pause":
                self.feed.submit(LocalPause(await self.gateway.pause(self.session)))
            elif action == "resume":
                _, version = await self.gateway.resume(self.session)
                self.feed.submit(LocalResume(version))
        except ProtocolError:
            pass  # the original client expects no answers; "resume" twice is harmless
        except BrokerUnavailable:
            log.warning("control failed: store unavailable", extra={"session": self.session})

    async def _on_frame(self, frame: protocol.ClientFrame | ProtocolError) -> None:
        gateway = self.gateway
        chat_id: str | None = None  # echoed in an error answering a chat
        try:
            match frame:
                case ProtocolError():
                    raise frame
                case Chat(prompt=prompt, id=chat_id):
                    self.held = []
                    try:
                        result = await gateway.start_turn(
                            self.session, prompt, client_id=chat_id, user=self.principal.user
                        )
                        self.send(Accepted(id=chat_id, turn=result.turn))
                    finally:
                        held, self.held = self.held, None
                        for send in held:
                            self.emit(send)
                case protocol.Pause():
                    self.feed.submit(LocalPause(await gateway.pause(self.session)))
                case protocol.Resume():
                    changed, version = await gateway.resume(self.session)
                    if not changed and not self.feed.delivery.paused:
                        raise SessionStateError("the session is not paused")
                    self.feed.submit(LocalResume(version))
                case protocol.Stop():
                    await gateway.stop(self.session)
                case Ping(t=t):
                    self.send(Pong(t=t))
                case protocol.Auth(token=token):
                    self._renew(token)
                case protocol.Ack():
                    pass
                case _:
                    raise ProtocolError("unknown frame")
        except ProtocolError as exc:
            self.send(Error(code=exc.code, message=exc.message, id=chat_id))  # type: ignore[arg-type]
        except BrokerUnavailable:
            self.send(Error(code="unavailable", message="the service is unavailable; try again shortly", id=chat_id))
