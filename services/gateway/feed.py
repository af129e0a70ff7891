"""Runs one connection's :class:`~shared.session.Delivery` against NATS.

The feed subscribes to the session's delivery and control subjects, asks a
buffer for replays, and hands each ``Send`` to the connection's outbox. All
decisions are taken by the pure state machine, in one task, so events are
applied one at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.messages import (
    REPLAY_FIRST_HEADER,
    REPLAY_MORE_HEADER,
    ReplayRequest,
    decode_control,
)
from shared.protocol import encode, frame_seq
from shared.session import (
    Action,
    Delivery,
    Event,
    GapTimeout,
    LiveFrame,
    RemotePause,
    RemoteResume,
    ReplayBatch,
    RequestReplay,
    Send,
)
from shared.subjects import SUBJECT_REPLAY, control_subject, delivery_subject, session_wildcard

from .metrics import GatewayMetrics

__all__ = ["SessionFeed", "resync"]

log = logging.getLogger(__name__)

REPLAY_RETRY_S = 0.25
REPLAY_LIMIT = 1000


class SessionFeed:
    """Feeds one connection in seq order.

    Args:
        emit: called with each frame to send, in order; it must not block.
        registry: the set of open feeds this feed joins while it runs.
        room: waits for space in the connection's send queue and returns it;
            replays are sized to fit.
        pause_state: reads the session's (paused, version) from the record.
        inbox_frames: live frames held before the feed stops taking them and
            catches up by replay instead (memory stays bounded).
    """

    def __init__(
        self,
        *,
        nc: NATS,
        session: str,
        delivery: Delivery,
        emit: Callable[[Send], None],
        inbox_frames: int,
        gap_timeout_s: float,
        replay_timeout_s: float,
        registry: set[SessionFeed] | None = None,
        metrics: GatewayMetrics | None = None,
        room: Callable[[], Awaitable[int]] | None = None,
        pause_state: Callable[[], Awaitable[tuple[bool, int]]] | None = None,
    ) -> None:
        self.nc = nc
        self.session = session
        self.delivery = delivery
        self.emit = emit
        # None only wakes run() to re-arm the gap timer (see _on_frame).
        self.inbox: asyncio.Queue[Event | None] = asyncio.Queue()
        self.started = False
        self.frames_subject = delivery_subject(session)
        self.controls_subject = control_subject(session)
        self.inbox_frames = inbox_frames
        self.gap_timeout_s = gap_timeout_s
        self.replay_timeout_s = replay_timeout_s
        self.overflowed = False
        self.registry: set[SessionFeed] = registry if registry is not None else set()
        self.metrics = metrics or GatewayMetrics()
        self.room = room
        self.pause_state = pause_state
        self._replay_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def submit(self, event: Event) -> None:
        """Queue an event from the connection (the client's pause or resume)."""
        self.inbox.put_nowait(event)

    def resync(self) -> None:
        """Catch up after a NATS reconnect: live frames and pause broadcasts may
        have been missed, so re-read the pause flag and replay from the log."""
        task = asyncio.create_task(self._resync())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resync(self) -> None:
        if self.pause_state is not None:
            try:
                paused, version = await self.pause_state()
            except Exception as exc:  # Redis down too: the replay below still runs
                log.warning("resync could not read the pause flag: %s", exc, extra={"session": self.session})
            else:
                self.inbox.put_nowait(RemotePause(version) if paused else RemoteResume(version))
        self.inbox.put_nowait(GapTimeout())

    async def run(self) -> None:
        # One subscription for frames and controls: a subscription costs a
        # task and a queue per connection (memory per idle connection).
        subs = [await self.nc.subscribe(session_wildcard(self.session), cb=self._on_message)]
        self.registry.add(self)
        try:
            self._execute(self.delivery.start())
            self.started = True
            while True:
                try:
                    event = await asyncio.wait_for(
                        self.inbox.get(), self.gap_timeout_s if self._waiting_for_gap() else None
                    )
                except TimeoutError:
                    if not self._waiting_for_gap():
                        continue  # a frame taken in _on_frame filled the gap meanwhile
                    event = GapTimeout()
                if event is None:
                    continue
                self._execute(self.delivery.handle(event))
                if self.overflowed and not self.delivery.replaying:
                    # Live frames were dropped: catch up from the log instead.
                    self.overflowed = False
                    self._execute(self.delivery.handle(GapTimeout()))
        finally:
            self.registry.discard(self)
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except Exception:  # connection closed or reconnecting
                    pass
            if self._replay_task is not None:
                self._replay_task.cancel()

    def _waiting_for_gap(self) -> bool:
        delivery = self.delivery
        return bool(delivery.pending) and not delivery.replaying and not delivery.paused

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                if action.seq is not None:
                    self.metrics.frames_delivered.inc()
                self.emit(action)
            elif isinstance(action, RequestReplay):
                self._replay_task = asyncio.create_task(self._replay(action.after))
            # WaitForGap: run() arms the gap timer from the delivery's state.

    async def _on_message(self, msg: Msg) -> None:
        if msg.subject == self.frames_subject:
            self._on_frames(msg.data)
        elif msg.subject == self.controls_subject:
            await self._on_control(msg)

    def _on_frames(self, data: bytes) -> None:
        """Apply a delivery message: one frame, or several joined by ``b"\\n"``
        in seq order (a buffer's batch), each as if it had come alone."""
        direct = False
        for frame in data.split(b"\n"):
            if frame:
                direct = self._on_frame(frame) or direct
        if direct and self._waiting_for_gap():
            self.inbox.put_nowait(None)  # run() arms the gap timer

    def _on_frame(self, data: bytes) -> bool:
        """Apply or queue one frame; True if it was applied here, not queued."""
        if self.inbox.qsize() >= self.inbox_frames:
            self.overflowed = True
            return False
        try:
            seq = frame_seq(data)
        except msgspec.DecodeError:
            log.error("dropping malformed delivery", extra={"session": self.session})
            return False
        event = LiveFrame(seq, data)
        if not self.started or not self.inbox.empty():
            self.inbox.put_nowait(event)  # behind other events: keep arrival order
            return False
        # The common case, taken here: no queue hop and no task switch per
        # frame. Safe because handle() never awaits, so events still apply one
        # at a time in arrival order.
        self._execute(self.delivery.handle(event))
        return True

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = decode_control(msg.data)
        except msgspec.DecodeError:
            return
        if control.action == "pause":
            self.inbox.put_nowait(RemotePause(control.version))
        elif control.action == "resume":
            self.inbox.put_nowait(RemoteResume(control.version))

    async def _replay(self, after: int) -> None:
        limit = REPLAY_LIMIT
        if self.room is not None:
            # Leave space for the frames held ahead of a gap, released after the batch.
            limit = max(1, min(limit, await self.room() - self.delivery.max_pending))
        request = encode(ReplayRequest(session=self.session, after=after, limit=limit))
        self.metrics.replays.inc()
        try:
            with self.metrics.replay_seconds.time():
                reply = await self.nc.request(SUBJECT_REPLAY, request, timeout=self.replay_timeout_s)
        except Exception as exc:  # timeout, no buffer running, reconnecting
            log.warning("replay failed: %s", exc, extra={"session": self.session, "event": "replay_failed"})
            await asyncio.sleep(REPLAY_RETRY_S)
            self.inbox.put_nowait(ReplayBatch(frames=[], first=1, more=True))
            return
        headers = reply.headers or {}
        frames = [(frame_seq(data), data) for data in reply.data.split(b"\n") if data]
        self.metrics.replayed_frames.inc(len(frames))
        self.inbox.put_nowait(
            ReplayBatch(
                frames=frames,
                first=int(headers.get(REPLAY_FIRST_HEADER, "1")),
                more=headers.get(REPLAY_MORE_HEADER) == "1",
            )
        )


def resync(feeds: set[SessionFeed]) -> None:
    """After a NATS reconnect, every open connection catches up from Redis."""
    for feed in list(feeds):
        feed.resync()
