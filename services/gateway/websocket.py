"""The WebSocket endpoint: protocol v1 on ``/ws`` (and ``/``), and the original
design's plain-text client when it connects with ``sessionId=`` and no
subprotocol (docs/protocol.md, compatibility)."""

from __future__ import annotations

import asyncio
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
            last_chat = None
            if meta.last_chat_id is not None and meta.last_chat_turn is not None:
                last_chat = LastChat(id=meta.last_chat_id, turn=meta.last_chat_turn)
            limits = gateway.settings.limits
            ready = Ready(
                session=handshake.session, last_seq=meta.hwm, paused=meta.paused, exp=principal.exp, last_chat=last_chat,
                max_frame_bytes=limits.max_frame_bytes, max_prompt_chars=limits.max_prompt_chars,
            )
            connection.send(ready)
        await connection.serve()
    finally:
        gateway.connections.release(principal.user)


class Connection:
    """One accepted WebSocket: a reader, a writer and the session feed."""

    def __init__(
        self, gateway: Gateway, websocket: WebSocket, handshake: Handshake, meta: SessionMeta, principal: Principal
    ) -> None:
        self.gateway = gateway
        self.websocket = websocket
        self.session = handshake.session
        self.compat = handshake.compat
        self.principal = principal
        self.renewed = asyncio.Event()
        limits = gateway.settings.limits
        self.bucket = TokenBucket(rate_per_s=limits.frames_per_s, burst=limits.frame_burst)
        self.over_limit = 0
        self.close_with: tuple[int, str] | None = None  # set by a task that ends the connection
        self.held: list[Send] | None = None  # the feed's frames held while a chat is being answered
        self.outbox: Outbox[str] = Outbox(gateway.settings.limits.send_queue_frames)
        # The original client tracks no seq: it gets what is generated from now on.
        cursor = meta.hwm if handshake.compat else handshake.last_seq
        self.feed = gateway.open_feed(self.session, cursor, meta, self.emit, self.outbox)

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
        kind = "compat" if self.compat else "ws"
        metrics = self.gateway.metrics
        metrics.connections_total.labels(kind).inc()
        metrics.connections.labels(kind).inc()
        if self.feed.delivery.delivered > 0 and not self.compat:
            metrics.reconnects.inc()
        try:
            await self._serve()
        finally:
            metrics.connections.labels(kind).dec()

    async def _serve(self) -> None:
        tasks = [
            asyncio.create_task(self._write()),
            asyncio.create_task(self.feed.run()),
            asyncio.create_task(self._read()),
            # The writer may be stuck sending to a slow reader: end on overflow at once.
            asyncio.create_task(self.outbox.overflowed.wait()),
        ]
        if self.principal.exp is not None:  # an anonymous connection never expires: no task for it
            tasks.append(asyncio.create_task(self._expire()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.outbox.overflowed.is_set():
            self.gateway.metrics.slow_readers.inc()
            log.info("closing slow reader", extra={"session": self.session, "event": "slow_reader"})
            self.close_with = (CLOSE_1013_TRY_AGAIN_LATER, "send queue full; reconnect with last_seq")
        for task in done:
            if not task.cancelled() and task.exception() is not None and not isinstance(
                task.exception(), WebSocketDisconnect
            ):
                log.error("connection failed", exc_info=task.exception(), extra={"session": self.session})
                self.close_with = (protocol.CLOSE_1011_INTERNAL, "internal error")
        if self.close_with is not None:
            await self._close(*self.close_with)

    async def _expire(self) -> None:
        """Close with 4001 when the token expires and is not renewed within the grace."""
        grace = self.gateway.settings.auth.grace_s
        while True:
            self.renewed.clear()
            assert self.principal.exp is not None  # a renewal keeps an expiry (_renew)
            remaining = self.principal.exp + grace - time.time()
            try:
                await asyncio.wait_for(self.renewed.wait(), max(0.0, remaining))
            except TimeoutError:
                self.close_with = (CLOSE_4001_TOKEN_EXPIRED, "token expired")
                return

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
        self.renewed.set()
        assert principal.exp is not None
        self.send(AuthOk(exp=principal.exp))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except Exception:  # already closed
            pass

    async def _write(self) -> None:
        while (text := await self.outbox.get()) is not None:
            await self.websocket.send_text(text)

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
