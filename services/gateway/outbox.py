"""A connection's bounded send queue.

The feed and the request handlers put frames in without waiting; the
connection's writer takes them out at the client's pace. When the client
reads too slowly the queue fills, ``overflowed`` is set, and the connection
ends: the client reconnects with its last seq and catches up by replay, so
a slow reader never grows the gateway's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Outbox"]

T = TypeVar("T")


class Outbox(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: deque[T] = deque()
        self.ready = asyncio.Event()
        self.overflowed = asyncio.Event()
        self.half_empty = asyncio.Event()
        self.half_empty.set()

    def put(self, item: T) -> None:
        """Queue ``item``, or mark the outbox overflowed (and drop everything)."""
        if self.overflowed.is_set():
            return
        if len(self.items) >= self.maxsize:
            self.overflow()
            return
        self.items.append(item)
        self.ready.set()
        if len(self.items) > self.maxsize // 2:
            self.half_empty.clear()

    def overflow(self) -> None:
        """Give up on this reader: drop what is queued; :meth:`get` returns None."""
        self.items.clear()
        self.overflowed.set()
        self.ready.set()
        self.half_empty.set()

    async def get(self) -> T | None:
        """The next item, or None once overflowed."""
        while not self.items:
            if self.overflowed.is_set():
                return None
            self.ready.clear()
            await self.ready.wait()
        item = self.items.popleft()
        if len(self.items) <= self.maxsize // 2:
            self.half_empty.set()
        return item

    async def room(self) -> int:
        """Wait until the outbox is at most half full; return its free slots.

        Replays ask for no more than this, so catching up is paced by the
        client instead of overflowing a reader that is merely behind.
        """
        await self.half_empty.wait()
        return self.maxsize - len(self.items)
