"""A connection's bounded send queue.

The feed and the request handlers put frames in without waiting; the
connection's writer takes them out at the client's pace. When the client
reads too slowly the queue fills, ``overflowed`` is set, and the connection
ends: the client reconnects with its last seq and catches up by replay, so
a slow reader never grows the gateway's memory.

An idle connection holds one of these, so it keeps no events, tasks or
futures while empty (a waiter's future exists only while one waits).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Outbox"]

T = TypeVar("T")

_EMPTY: deque[Any] = deque(maxlen=0)  # shared by every empty outbox; appending to it is a no-op, never done


class Outbox(Generic[T]):
    """Frames to send, oldest first, at most ``maxsize``.

    Args:
        maxsize: items held; one more overflows the outbox.
        on_ready: called when an item is put into an empty outbox (a
            connection starts its writer then); must not block.
        on_overflow: called once, when the outbox overflows; must not block.

    One task at a time may wait in :meth:`get`, and one in :meth:`room`.
    """

    __slots__ = ("maxsize", "items", "overflowed", "on_ready", "on_overflow", "_getter", "_room")

    def __init__(
        self,
        maxsize: int,
        *,
        on_ready: Callable[[], None] | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.maxsize = maxsize
        self.items: deque[T] = _EMPTY  # a deque of its own once something is put (an empty one is 600 bytes)
        self.overflowed = False
        self.on_ready = on_ready
        self.on_overflow = on_overflow
        self._getter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        """Queue ``item``, or mark the outbox overflowed (and drop everything)."""
        if self.overflowed:
            return
        if len(self.items) >= self.maxsize:
            self.overflow()
            return
        if self.items is _EMPTY:
            self.items = deque()
        self.items.append(item)
        if len(self.items) == 1:
            _wake(self._getter)
            if self.on_ready is not None:
                self.on_ready()

    def overflow(self) -> None:
        """Give up on this reader: drop what is queued; :meth:`get` returns None."""
        if self.overflowed:
            return
        self.items = _EMPTY
        self.overflowed = True
        _wake(self._getter)
        _wake(self._room)
        if self.on_overflow is not None:
            self.on_overflow()

    def pop(self) -> T | None:
        """The next item without waiting; None when empty or overflowed."""
        if not self.items:
            return None
        item = self.items.popleft()
        if not self.items:
            self.items = _EMPTY
        if len(self.items) <= self.maxsize // 2:
            _wake(self._room)
        return item

    async def get(self) -> T | None:
        """The next item, waiting for one; None once overflowed."""
        while not self.items:
            if self.overflowed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        return self.pop()

    async def room(self) -> int:
        """Wait until the outbox is at most half full; return its free slots.

        Replays ask for no more than this, so catching up is paced by the
        client instead of overflowing a reader that is merely behind.
        """
        while len(self.items) > self.maxsize // 2 and not self.overflowed:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None
        return self.maxsize - len(self.items)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
