"""An SSE response read frame by frame, its raw bytes fed to the strict wire checker."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import httpx

from tests.stack import WAIT_S, FrameReader
from tests.wire import SseConnection


class SseStream(FrameReader):
    """Reads an SSE response (``GET …/events`` or ``POST /api/chat`` with
    ``Accept: text/event-stream``); every byte goes to ``wire`` as it arrives,
    so a frame the test does not wait for is still checked."""

    def __init__(self, response: httpx.Response, wire: SseConnection) -> None:
        self.response = response
        self.wire = wire
        self._raw = response.aiter_raw()
        self._unread: deque[dict[str, Any]] = deque()
        self.frames: list[dict[str, Any]] = []
        self.ended = False

    async def recv(self, wait_s: float = WAIT_S) -> dict[str, Any]:
        """The next frame; AssertionError if the stream ends first."""
        async with asyncio.timeout(wait_s):
            while not self._unread:
                try:
                    raw = await anext(self._raw)
                except StopAsyncIteration:
                    self.ended = True
                    raise AssertionError(f"the SSE stream ended after {len(self.frames)} frames") from None
                self._unread.extend(self.wire.feed_bytes(raw))
        frame = self._unread.popleft()
        self.frames.append(frame)
        return frame

    async def to_end(self, wait_s: float = WAIT_S) -> None:
        """Read until the server ends the stream (a turn's stream ends after its done)."""
        async with asyncio.timeout(wait_s):
            async for raw in self._raw:
                self._unread.extend(self.wire.feed_bytes(raw))
        self.frames.extend(self._unread)
        self._unread.clear()
        self.ended = True

    def texts(self) -> str:
        return "".join(f["text"] for f in self.frames if f["type"] == "chunk")
