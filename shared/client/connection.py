"""The asyncio client: a WebSocket to the gateway that survives anything the
network does, on top of the sans-I/O :class:`~shared.client.session.SessionState`.

Usage::

    async with ChatClient("ws://127.0.0.1:8000/ws", session="demo") as client:
        async for event in client.turn("Tell me about rivers"):
            ...  # its Accepted, Chunks and Done, and Connected, Reconnecting, …

``turn()`` follows the turn its own chat started (matched by the chat's id)
to that turn's ``done``; ``events()`` yields everything, including the replay
of a session's earlier turns.

It reconnects with exponential backoff and full jitter, resumes from its last
seq and drops duplicates (its consumer sees every seq once, in order), sends
an application ``ping`` every ``ping_interval_s`` and replaces a connection
that has been silent for ``ping_timeout_s`` (half-open TCP is detected, not
waited on), and sends what was sent while offline once it is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..backoff import Backoff
from ..errors import ProtocolError
from ..protocol import (
    SUBPROTOCOL,
    Accepted,
    Ack,
    Auth,
    AuthOk,
    Chat,
    Chunk,
    Done,
    Error,
    Pause,
    Paused,
    Ping,
    Ready,
    Resume,
    Resumed,
    ServerFrame,
    Stop,
    encode,
)
from ..redact import redact_secrets
from .session import (
    ChatRejected,
    ClientClosed,
    CloseAction,
    Connected,
    ConnectionEvent,
    Disconnected,
    GapDetected,
    GaveUp,
    HandshakeRefused,
    Reconnecting,
    SessionState,
    close_action,
    handshake_action,
    refusal,
)

__all__ = ["ChatClient", "ClientClosed", "HandshakeRefused", "ChatRejected", "TokenProvider", "Event", "WireTap"]

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str | None]]
Event = ServerFrame | ConnectionEvent


class WireTap(Protocol):
    """Sees the raw wire, before the client drops duplicates or reconnects on
    a gap: for protocol checkers and debugging. Called on the client's task;
    it must not block or raise."""

    def opened(self, url: str) -> None:
        """A connection was upgraded at ``url`` (its query holds session and last_seq)."""

    def received(self, message: str | bytes) -> None:
        """A message arrived, as the server sent it."""

    def closed(self) -> None:
        """The connection ended."""


class ChatClient:
    """A reconnecting protocol-v1 client for one session.

    Args:
        url: the gateway's WebSocket URL, e.g. ``ws://127.0.0.1:8000/ws``.
        session: the session to continue; None starts a new one.
        last_seq: the highest seq the caller already has (0: replay everything).
        token: a fixed token, sent as ``Authorization: Bearer`` (never in the
            URL); a 401 refusal then stops the client. Not with ``token_provider``.
        token_provider: called for a token before connecting, after a 4001 or
            HTTP 401, and ahead of the token's expiry (sent as an ``auth`` frame:
            the connection stays open); None when no token is needed. A 401 for
            a token it has just given stops the client.
        backoff: the reconnect schedule (default: 0.5 s doubling to 30 s, forever).
        ping_interval_s: how often to send an application ping.
        ping_timeout_s: silence after which the connection is considered dead.
        open_timeout_s: the longest a connection attempt may take.
        connect_timeout_s: the longest the client tries to make its first
            connection (until ``ready``) before giving up; None: as long as
            ``backoff`` allows. Once connected, reconnects follow ``backoff``.
        max_queue: frames held while offline.
        max_events: events buffered for a slow consumer before reading stops.
        rng: the jitter source, ``random.random`` by default.
        wire_tap: shown every connection and raw message (:class:`WireTap`).
    """

    def __init__(
        self,
        url: str,
        *,
        session: str | None = None,
        last_seq: int = 0,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        backoff: Backoff | None = None,
        ping_interval_s: float = 5.0,
        ping_timeout_s: float = 15.0,
        open_timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        max_queue: int = 100,
        max_events: int = 1024,
        rng: Callable[[], float] = random.random,
        wire_tap: WireTap | None = None,
    ) -> None:
        if token is not None and token_provider is not None:
            raise ValueError("pass token or token_provider, not both")
        if connect_timeout_s is not None and connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        self.url = url
        self.state = SessionState(session=session, last_seq=last_seq, max_queue=max_queue)
        self.token = token
        self.token_provider = token_provider
        self.backoff = backoff or Backoff()
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.open_timeout_s = open_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.rng = rng
        self.wire_tap = wire_tap
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(max_events)
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._finished = False
        self._gave_up: GaveUp | None = None
        self._ever_connected = False
        self._ready_seen = False  # the current connection got its ready

    # Lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> ChatClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def session(self) -> str | None:
        return self.state.session

    @property
    def last_seq(self) -> int:
        return self.state.last_seq

    # Sending -------------------------------------------------------------

    async def chat(self, prompt: str, *, id: str | None = None) -> str:
        """Start a turn (now, or once reconnected); return the chat's id."""
        frame = self.state.send(Chat(prompt=prompt, id=id))
        await self._flush()
        assert isinstance(frame, Chat) and frame.id is not None
        return frame.id

    async def pause(self) -> None:
        self.state.send(Pause())
        await self._flush()

    async def resume(self) -> None:
        self.state.send(Resume())
        await self._flush()

    async def stop(self) -> None:
        self.state.send(Stop())
        await self._flush()

    async def ack(self, seq: int) -> None:
        self.state.send(Ack(seq=seq))
        await self._flush()

    async def _flush(self) -> None:
        if self._gave_up is not None:
            raise self._gave_up.exception
        ws = self._ws
        for data in self.state.data_to_send():
            if ws is None:
                break  # lost meanwhile: chats and pauses are resent on reconnect
            try:
                await ws.send(data)
            except ConnectionClosed:
                break

    # Receiving -----------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Server frames and connection events, in order, until the client stops."""
        while not (self._finished and self._events.empty()):
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def turn(self, prompt: str, *, id: str | None = None) -> AsyncIterator[Event]:
        """Start a turn and yield what belongs to it, ending with its ``Done``.

        Yields the chat's ``Accepted``, then that turn's ``Chunk``s and its
        ``Done`` (matched by the turn number the ``accepted`` gave), plus
        ``Paused``, ``Resumed``, other ``Error``s and connection events.
        Frames of other turns (the replay of a session's earlier turns when
        ``last_seq`` is behind, another client's turn) are skipped, so this
        works however often it is run on the same session.

        Raises:
            ChatRejected: the server refused the chat (``busy``: another turn
                is generating; ``too_big``, ``rate_limited``, …).
            HandshakeRefused: the gateway refused the connection (400, 401, 403).
            ClientClosed: the client gave up reconnecting or was closed.
        """
        chat_id = await self.chat(prompt, id=id)
        turn: int | None = None
        async for event in self.events():
            match event:
                case Accepted(id=accepted_id, turn=number):
                    if accepted_id == chat_id:
                        turn = number
                        yield event
                case Error(id=error_id, code=code, message=message) if error_id == chat_id:
                    raise ChatRejected(code, message)
                case Chunk(turn=number) if number == turn:
                    yield event
                case Done(turn=number) if number == turn:
                    yield event
                    return
                case Chunk() | Done() | Ready():
                    pass  # another turn's, or the ready every connection starts with
                case GaveUp():
                    raise event.exception
                case Connected() | Disconnected() | Reconnecting() | Error() | Paused() | Resumed():
                    yield event
        raise ClientClosed("the client was closed before the turn ended")

    async def _emit(self, event: Event) -> None:
        await self._events.put(event)  # blocks reading while the consumer lags

    # The connection loop -------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        token: str | None = self.token
        need_token = self.token_provider is not None
        fresh_token = False  # the token in hand was just given by the provider
        deadline = None if self.connect_timeout_s is None else loop.time() + self.connect_timeout_s
        try:
            while not self._closing:
                error: ClientClosed | None = None
                connected = False
                try:
                    if need_token and self.token_provider is not None:
                        token = await self.token_provider()
                        need_token, fresh_token = False, True
                except Exception as exc:  # a failed attempt like any other: back off, ask again
                    action, code, reason = CloseAction.RECONNECT, None, f"the token provider failed: {exc}"
                else:
                    open_timeout = self.open_timeout_s
                    if deadline is not None and not self._ever_connected:
                        open_timeout = max(0.1, min(open_timeout, deadline - loop.time()))
                    outcome = await self._connect_once(token, loop, open_timeout)
                    if isinstance(outcome, HandshakeRefused):
                        error, code, reason = outcome, None, str(outcome)
                        action = handshake_action(
                            outcome.status, can_refresh=self.token_provider is not None and not fresh_token
                        )
                    else:
                        action, code, reason, connected = outcome
                    if connected:
                        fresh_token = False
                if self._closing:
                    break
                if action is CloseAction.STOP:
                    await self._give_up(GaveUp(reason=reason, code=code, error=error))
                    break
                if action is CloseAction.REFRESH_TOKEN:
                    need_token = True
                elif error is not None:
                    fresh_token = False  # refused for another reason: a later 401 may refresh again
                delay = self.backoff.next_delay(self.rng())
                if delay is None:
                    await self._give_up(GaveUp(reason=f"gave up after {self.backoff.attempt} attempts: {reason}", code=code, error=error))
                    break
                if deadline is not None and not self._ever_connected:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        await self._give_up(
                            GaveUp(reason=f"could not connect within {self.connect_timeout_s:g} s: {reason}", code=code, error=error)
                        )
                        break
                    delay = min(delay, remaining)
                await self._emit(Reconnecting(delay_s=delay, attempt=self.backoff.attempt, reason="" if connected else reason))
                await asyncio.sleep(delay)
        finally:
            self._finished = True
            if not self._events.full():  # else the consumer stops once it has drained the queue
                self._events.put_nowait(None)

    async def _give_up(self, event: GaveUp) -> None:
        self._gave_up = event
        await self._emit(event)

    def display_url(self) -> str:
        """The gateway's URL for messages: without its query (no token, no
        cursor), and with a password in it (``ws://user:pw@host``) masked."""
        parts = urlsplit(self.url)
        return redact_secrets(urlunsplit(parts._replace(query="", fragment="")))

    def _unreachable(self, exc: BaseException, open_timeout: float) -> str:
        """Why a connection attempt failed, in words: "cannot reach URL: connection refused"."""
        if isinstance(exc, TimeoutError):
            what = f"no answer within {open_timeout:g} s"
        elif isinstance(exc, socket.gaierror):
            what = f"cannot resolve {urlsplit(self.url).hostname} ({exc.strerror or exc})"
        elif isinstance(exc, ConnectionRefusedError) or f"[Errno {errno.ECONNREFUSED}]" in str(exc):
            what = "connection refused"  # also asyncio's "Multiple exceptions" when every address refused
        elif isinstance(exc, OSError) and exc.strerror:
            what = exc.strerror[:1].lower() + exc.strerror[1:]
        else:
            what = str(exc) or type(exc).__name__
        return f"cannot reach {self.display_url()}: {what}"

    async def _connect_once(
        self, token: str | None, loop: asyncio.AbstractEventLoop, open_timeout: float
    ) -> tuple[CloseAction, int | None, str, bool] | HandshakeRefused:
        """One connection, start to end: (what to do next, close code, reason,
        whether it got as far as ``ready``), or the refusal of the upgrade."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            ws = await connect(
                self.state.url(self.url),
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers=headers,
                open_timeout=open_timeout,
                ping_interval=None,  # the application heartbeat below replaces it
                close_timeout=2,
            )
        except InvalidStatus as exc:
            # websockets reads the refusal's body into the response: the server's reason.
            return refusal(exc.response.status_code, exc.response.body)
        except InvalidURI as exc:
            return CloseAction.STOP, None, redact_secrets(str(exc)), False
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return CloseAction.RECONNECT, None, self._unreachable(exc, open_timeout), False
        started = loop.time()
        self._ready_seen = False
        if self.wire_tap is not None:
            self.wire_tap.opened(ws.request.path if ws.request else self.url)
        try:
            code, reason = await self._serve(ws, loop)
        finally:
            if self.wire_tap is not None:
                self.wire_tap.closed()
            self._ws = None
            self.state.connection_lost()
        self.backoff.connection_ended(loop.time() - started)
        if not self._closing:
            await self._emit(Disconnected(code=code, reason=reason))
        return close_action(code), code, reason or f"closed with {code}", self._ready_seen

    async def _serve(self, ws: ClientConnection, loop: asyncio.AbstractEventLoop) -> tuple[int | None, str]:
        """Read until the connection ends; return its close code and reason."""
        self._ws = ws
        heard_at = [loop.time()]

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.ping_interval_s)
                if loop.time() - heard_at[0] > self.ping_timeout_s:
                    log.info("no frame for %.1f s: dropping the connection", self.ping_timeout_s)
                    ws.transport.abort()  # a half-open connection never closes by itself
                    return
                try:
                    await ws.send(encode(Ping(t=int(time.time() * 1000))).decode())
                except ConnectionClosed:
                    return

        exp: list[int | None] = [None]
        renewed = asyncio.Event()

        async def renew() -> None:
            """Send a fresh token before the current one expires (the auth frame)."""
            assert self.token_provider is not None
            renewed_exp = 0
            while True:
                while exp[0] is None:
                    renewed.clear()
                    await renewed.wait()
                if exp[0] <= renewed_exp:
                    await asyncio.sleep(1.0)  # the new token expires no later (whole seconds): do not spin
                renewed_exp = exp[0]
                remaining = exp[0] - time.time()
                await asyncio.sleep(max(0.0, remaining - min(60.0, remaining / 4)))
                renewed.clear()
                try:
                    token = await self.token_provider()
                except Exception as exc:  # try again shortly; the server closes with 4001 if it is too late
                    log.warning("token renewal failed: %s", exc)
                    await asyncio.sleep(min(5.0, max(0.1, (exp[0] - time.time()) / 4)))
                    continue
                if token:
                    await ws.send(encode(Auth(token=token)).decode())
                await renewed.wait()  # the auth_ok with the new expiry

        beat = asyncio.create_task(heartbeat())
        renewing = asyncio.create_task(renew()) if self.token_provider is not None else None
        try:
            async for message in ws:
                heard_at[0] = loop.time()
                if self.wire_tap is not None:
                    self.wire_tap.received(message)
                if isinstance(message, bytes):
                    continue
                try:
                    frames = self.state.receive(message)
                except GapDetected as exc:
                    log.warning("%s: reconnecting to resume", exc)
                    ws.transport.abort()
                    return None, str(exc)
                except ProtocolError as exc:
                    log.warning("ignoring a frame: %s", exc)
                    continue
                for frame in frames:
                    if isinstance(frame, Ready):
                        self._ever_connected = self._ready_seen = True
                        await self._emit(Connected(session=frame.session, attempt=self.backoff.attempt))
                        await self._flush()
                    if isinstance(frame, (Ready, AuthOk)) and frame.exp is not None:
                        exp[0] = frame.exp
                        renewed.set()
                    await self._emit(frame)
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
            if renewing is not None:
                renewing.cancel()
        code = ws.close_code
        return (None if code == 1006 else code), ws.close_reason or ""
