"""The asyncio client: a WebSocket to the gateway that survives anything the
network does, on top of the sans-I/O :class:`~shared.client.session.SessionState`.

Usage::

    async with ChatClient("ws://127.0.0.1:8000/ws") as client:
        await client.chat("Tell me about rivers")
        async for event in client.events():
            ...  # Ready, Accepted, Chunk, Done, Paused, … and Connected, Reconnecting, …

It reconnects with exponential backoff and full jitter, resumes from its last
seq and drops duplicates (its consumer sees every seq once, in order), sends
an application ``ping`` every ``ping_interval_s`` and replaces a connection
that has been silent for ``ping_timeout_s`` (half-open TCP is detected, not
waited on), and sends what was sent while offline once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..backoff import Backoff
from ..errors import ChatError, ProtocolError
from ..protocol import SUBPROTOCOL, Ack, Auth, AuthOk, Chat, Pause, Ping, Ready, Resume, ServerFrame, Stop, encode
from .session import (
    CloseAction,
    Connected,
    ConnectionEvent,
    Disconnected,
    GapDetected,
    GaveUp,
    Reconnecting,
    SessionState,
    close_action,
    handshake_action,
)

__all__ = ["ChatClient", "ClientClosed", "TokenProvider", "Event"]

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str | None]]
Event = ServerFrame | ConnectionEvent


class ClientClosed(ChatError):
    """The client was closed, or gave up reconnecting."""


class ChatClient:
    """A reconnecting protocol-v1 client for one session.

    Args:
        url: the gateway's WebSocket URL, e.g. ``ws://127.0.0.1:8000/ws``.
        session: the session to continue; None starts a new one.
        last_seq: the highest seq the caller already has (0: replay everything).
        token_provider: called for a token before connecting, after a 4001 or
            HTTP 401, and ahead of the token's expiry (sent as an ``auth`` frame:
            the connection stays open); None when no token is needed.
        backoff: the reconnect schedule (default: 0.5 s doubling to 30 s, forever).
        ping_interval_s: how often to send an application ping.
        ping_timeout_s: silence after which the connection is considered dead.
        open_timeout_s: the longest a connection attempt may take.
        max_queue: frames held while offline.
        max_events: events buffered for a slow consumer before reading stops.
        rng: the jitter source, ``random.random`` by default.
    """

    def __init__(
        self,
        url: str,
        *,
        session: str | None = None,
        last_seq: int = 0,
        token_provider: TokenProvider | None = None,
        backoff: Backoff | None = None,
        ping_interval_s: float = 5.0,
        ping_timeout_s: float = 15.0,
        open_timeout_s: float = 10.0,
        max_queue: int = 100,
        max_events: int = 1024,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.state = SessionState(session=session, last_seq=last_seq, max_queue=max_queue)
        self.token_provider = token_provider
        self.backoff = backoff or Backoff()
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.open_timeout_s = open_timeout_s
        self.rng = rng
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(max_events)
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._finished = False
        self._gave_up: GaveUp | None = None

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
            raise ClientClosed(self._gave_up.reason)
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

    async def _emit(self, event: Event) -> None:
        await self._events.put(event)  # blocks reading while the consumer lags

    # The connection loop -------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        token: str | None = None
        need_token = self.token_provider is not None
        try:
            while not self._closing:
                try:
                    if need_token and self.token_provider is not None:
                        token = await self.token_provider()
                        need_token = False
                except Exception as exc:  # a failed attempt like any other: back off, ask again
                    action, code, reason = CloseAction.RECONNECT, None, f"the token provider failed: {exc}"
                else:
                    action, code, reason = await self._connect_once(token, loop)
                if self._closing:
                    break
                if action is CloseAction.STOP:
                    await self._give_up(GaveUp(reason=reason, code=code))
                    break
                need_token = need_token or action is CloseAction.REFRESH_TOKEN
                delay = self.backoff.next_delay(self.rng())
                if delay is None:
                    await self._give_up(GaveUp(reason=f"gave up after {self.backoff.attempt} attempts: {reason}", code=code))
                    break
                await self._emit(Reconnecting(delay_s=delay, attempt=self.backoff.attempt))
                await asyncio.sleep(delay)
        finally:
            self._finished = True
            if not self._events.full():  # else the consumer stops once it has drained the queue
                self._events.put_nowait(None)

    async def _give_up(self, event: GaveUp) -> None:
        self._gave_up = event
        await self._emit(event)

    async def _connect_once(
        self, token: str | None, loop: asyncio.AbstractEventLoop
    ) -> tuple[CloseAction, int | None, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            ws = await connect(
                self.state.url(self.url),
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers=headers,
                open_timeout=self.open_timeout_s,
                ping_interval=None,  # the application heartbeat below replaces it
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            return handshake_action(status), None, f"the gateway refused the connection (HTTP {status})"
        except InvalidURI as exc:
            return CloseAction.STOP, None, str(exc)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return CloseAction.RECONNECT, None, f"could not connect: {exc}"
        started = loop.time()
        try:
            code, reason = await self._serve(ws, loop)
        finally:
            self._ws = None
            self.state.connection_lost()
        self.backoff.connection_ended(loop.time() - started)
        if not self._closing:
            await self._emit(Disconnected(code=code, reason=reason))
        return close_action(code), code, reason or f"closed with {code}"

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
