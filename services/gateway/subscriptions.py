"""One NATS subscription per session per gateway process.

Every connection to a session needs the session's frames and controls; a
subscription per connection would cost NATS a subscription, and this process
a task and a queue, per connection. Here the first feed of a session
subscribes, the others join it, every message is handed to each feed in
arrival order, and the last one to leave unsubscribes.

Messages are handed over in nats-py's read loop, not through a task and a
queue per subscription (see :func:`subscribe_direct`): the handlers never
block, and an idle session then costs no task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.messages import Control, decode_control
from shared.protocol import frame_seq
from shared.subjects import control_subject, delivery_subject, session_wildcard

__all__ = ["SessionSubscriptions", "Subscriber", "subscribe_direct", "split_frames"]

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What a session's subscription hands its messages to (a feed)."""

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        """Frames of one delivery message, as (seq, encoded frame), in the message's order."""

    def on_control(self, control: Control) -> None:
        """A pause, resume or stop broadcast."""


def split_frames(data: bytes, session: str) -> list[tuple[int, bytes]]:
    """A delivery message's frames: one, or several joined by ``b"\\n"`` in
    seq order (a buffer's batch), as (seq, frame); malformed ones are dropped."""
    frames = []
    for frame in data.split(b"\n"):
        if not frame:
            continue
        try:
            frames.append((frame_seq(frame), frame))
        except msgspec.DecodeError:
            log.error("dropping malformed delivery", extra={"session": session})
    return frames


class _Session:
    """A session's subscription and the feeds sharing it."""

    __slots__ = ("session", "feeds", "frames_subject", "controls_subject", "sub", "subscribing")

    def __init__(self, session: str) -> None:
        self.session = session
        self.feeds: list[Subscriber] = []
        self.frames_subject = delivery_subject(session)
        self.controls_subject = control_subject(session)
        self.sub: Subscription | None = None
        # Only while subscribing (a task of its own: a feed cancelled meanwhile
        # must not leave a subscription nobody unsubscribes).
        self.subscribing: asyncio.Task[None] | None = None

    async def subscribe(self, nc: NATS) -> None:
        self.sub = await subscribe_direct(nc, session_wildcard(self.session), self.deliver)
        self.subscribing = None

    async def unsubscribe(self) -> None:
        try:
            if self.subscribing is not None:
                await self.subscribing
            if self.sub is not None:
                await self.sub.unsubscribe()
        except Exception:  # never subscribed, or the connection is closed or reconnecting
            pass

    def deliver(self, subject: str, data: bytes) -> None:
        # Parsed once for every feed; feeds join and leave only between messages.
        if subject == self.frames_subject:
            frames = split_frames(data, self.session)
            for feed in self.feeds:
                try:
                    feed.on_frames(frames)
                except Exception:  # one connection's fault must not cost the others the message
                    log.exception("delivery failed", extra={"session": self.session})
        elif subject == self.controls_subject:
            try:
                control = decode_control(data)
            except msgspec.DecodeError:
                return
            for feed in self.feeds:
                try:
                    feed.on_control(control)
                except Exception:
                    log.exception("delivery failed", extra={"session": self.session})


class SessionSubscriptions:
    """This process's subscriptions to sessions' subjects, shared by their feeds."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.sessions: dict[str, _Session] = {}
        self._unsubscribing: set[asyncio.Task[None]] = set()

    async def join(self, session: str, feed: Subscriber) -> None:
        """Hand ``feed`` the session's messages from now on.

        Returns once the subscription is on its way to the server: anything
        this process publishes afterwards (a replay request) reaches the
        server after it, so a frame stored after that request was read is
        delivered live. Pair with :meth:`leave`.

        Raises:
            Exception: from nats-py, when the subscription cannot be made
                (the feed is then not joined).
        """
        shared = self.sessions.get(session)
        if shared is None:
            shared = self.sessions[session] = _Session(session)
            shared.subscribing = asyncio.create_task(shared.subscribe(self.nc))
        shared.feeds.append(feed)
        if shared.subscribing is not None:
            try:
                await asyncio.shield(shared.subscribing)
            except BaseException:
                self.leave(session, feed)
                raise

    def leave(self, session: str, feed: Subscriber) -> None:
        """Stop handing ``feed`` messages; unsubscribe (in the background) if it was the last."""
        shared = self.sessions.get(session)
        if shared is None or feed not in shared.feeds:
            return
        shared.feeds.remove(feed)
        if shared.feeds:
            return
        del self.sessions[session]
        task = asyncio.create_task(shared.unsubscribe())
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    def feeds(self, session: str) -> int:
        """Feeds of ``session`` in this process (0 when it has no subscription)."""
        shared = self.sessions.get(session)
        return len(shared.feeds) if shared is not None else 0


class _Direct:
    """Stands in for a nats-py subscription's pending queue: each message is
    handed on as it is put, in the connection's read loop."""

    __slots__ = ("sub", "handler")

    def __init__(self, sub: Subscription, handler: Callable[[str, bytes], None]) -> None:
        self.sub = sub
        self.handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self.sub._pending_size -= len(msg.data)
        try:
            self.handler(msg.subject, msg.data)
        except Exception:
            log.exception("delivery handler failed")

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


async def subscribe_direct(nc: NATS, subject: str, handler: Callable[[str, bytes], None]) -> Subscription:
    """Subscribe ``handler(subject, data)`` to ``subject``; it must not block.

    nats-py gives each subscription with a callback a task and a queue; this
    replaces both with a direct call once the subscription is made (nats-py
    puts each message into ``_pending_queue``, which here calls the handler).
    If this nats-py's subscription lacks those internals, the subscription
    keeps its own task and queue: slower and larger, but correct.
    """

    async def callback(msg: Msg) -> None:
        handler(msg.subject, msg.data)

    sub = await nc.subscribe(subject, cb=callback)
    task, queue = getattr(sub, "_wait_for_msgs_task", None), getattr(sub, "_pending_queue", None)
    if isinstance(task, asyncio.Task) and isinstance(queue, asyncio.Queue) and hasattr(sub, "_pending_size"):
        # No await from here on: messages already queued go first, in order.
        # The task has not taken any of them (it would have run the callback
        # in the same step), and once cancelled it takes none.
        task.cancel()
        direct = _Direct(sub, handler)
        sub._pending_queue = direct  # type: ignore[assignment]
        sub._wait_for_msgs_task = None
        while not queue.empty():
            direct.put_nowait(queue.get_nowait())
    return sub


def is_direct(sub: Subscription) -> bool:
    """Whether ``sub`` hands messages on without a task of its own (for tests)."""
    return isinstance(getattr(sub, "_pending_queue", None), _Direct)
