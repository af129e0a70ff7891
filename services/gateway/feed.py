"""Runs one connection's :class:`~shared.session.Delivery` against NATS.

The feed joins its session's subscription (one per session per process,
:mod:`.subscriptions`), asks a buffer for replays, and hands each ``Send`` to
the connection's outbox. All decisions are taken by the pure state machine,
which never awaits: every event (a live frame, a control, a replay batch, the
client's pause, a gap timeout) is applied where it arrives, one at a time, in
arrival order. An idle feed therefore holds no task: only a replay in flight
has one, and a gap being waited for a timer.

Ordering at the start: the feed joins the subscription before it asks for its
first replay, and a buffer publishes a frame only after storing it, so every
frame is either in the replay (stored before the request was read) or
delivered live (published after the subscription was in place).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from shared.messages import REPLAY_FIRST_HEADER, REPLAY_MORE_HEADER, Control, ReplayRequest
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
from shared.subjects import SUBJECT_REPLAY

from .metrics import GatewayMetrics
from .subscriptions import SessionSubscriptions

__all__ = ["SessionFeed", "resync"]

log = logging.getLogger(__name__)

REPLAY_RETRY_S = 0.25
REPLAY_LIMIT = 1000


class SessionFeed:
    """Feeds one connection in seq order.

    Args:
        subscriptions: the process's session subscriptions, joined by :meth:`open`.
        emit: called with each frame to send, in order; it must not block.
        registry: the set of open feeds this feed joins while it is open.
        room: waits for space in the connection's send queue and returns it;
            replays are sized to fit.
        pause_state: reads the session's (paused, version) from the record.
        inbox_frames: events held while the feed opens (before its first
            replay request); frames past it are dropped, and come by that replay.
    """

    __slots__ = (
        "nc", "subscriptions", "session", "delivery", "emit", "inbox_frames", "gap_timeout_s", "replay_timeout_s",
        "registry", "metrics", "room", "pause_state", "started", "closed", "_early", "_replay_task", "_gap_timer",
        "_background",
    )  # fmt: skip

    def __init__(
        self,
        *,
        nc: NATS,
        subscriptions: SessionSubscriptions,
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
        self.subscriptions = subscriptions
        self.session = session
        self.delivery = delivery
        self.emit = emit
        self.inbox_frames = inbox_frames
        self.gap_timeout_s = gap_timeout_s
        self.replay_timeout_s = replay_timeout_s
        self.registry: set[SessionFeed] = registry if registry is not None else set()
        self.metrics = metrics or GatewayMetrics()
        self.room = room
        self.pause_state = pause_state
        self.started = False
        self.closed = False
        self._early: list[Event] | None = None  # events that came while opening
        self._replay_task: asyncio.Task[None] | None = None
        self._gap_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] | None = None

    async def open(self) -> None:
        """Join the session's subscription, then start delivering (a replay
        from the cursor unless paused). Pair with :meth:`close`.

        Raises:
            Exception: from nats-py, when the subscription cannot be made.
        """
        await self.subscriptions.join(self.session, self)
        if self.closed:  # closed while joining
            self.subscriptions.leave(self.session, self)
            return
        self.registry.add(self)
        self._execute(self.delivery.start())
        self.started = True
        early, self._early = self._early, None
        for event in early or ():
            self.submit(event)
        self._arm_gap_timer()

    def close(self) -> None:
        """Leave the subscription and stop everything this feed started; idempotent."""
        self.closed = True
        self.registry.discard(self)
        self.subscriptions.leave(self.session, self)
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        for task in (self._replay_task, *(self._background or ())):
            if task is not None:
                task.cancel()

    def submit(self, event: Event) -> None:
        """Apply an event: the client's pause or resume, or any other, in the order submitted."""
        if self.closed:
            return
        if not self.started:
            if self._early is None:
                self._early = []
            if len(self._early) < self.inbox_frames or not isinstance(event, LiveFrame):
                self._early.append(event)
            return
        self._execute(self.delivery.handle(event))
        self._arm_gap_timer()

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        """Frames of one delivery message (the subscription calls this), in order."""
        for seq, data in frames:
            self.submit(LiveFrame(seq, data))

    def on_control(self, control: Control) -> None:
        """A control broadcast (the subscription calls this); pause and resume apply here."""
        if control.action == "pause":
            self.submit(RemotePause(control.version))
        elif control.action == "resume":
            self.submit(RemoteResume(control.version))

    def resync(self) -> None:
        """Catch up after a NATS reconnect: live frames and pause broadcasts may
        have been missed, so re-read the pause flag and replay from the log."""
        if self._background is None:
            self._background = set()
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
                self.submit(RemotePause(version) if paused else RemoteResume(version))
        self.submit(GapTimeout())

    def _waiting_for_gap(self) -> bool:
        delivery = self.delivery
        return bool(delivery.pending) and not delivery.replaying and not delivery.paused

    def _arm_gap_timer(self) -> None:
        """Time the wait for frames missing ahead of held ones (a timer only while waiting)."""
        if self._waiting_for_gap():
            if self._gap_timer is None:
                self._gap_timer = asyncio.get_running_loop().call_later(self.gap_timeout_s, self._gap_timeout)
        elif self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _gap_timeout(self) -> None:
        self._gap_timer = None
        if self._waiting_for_gap():  # else a frame filled the gap meanwhile
            self.submit(GapTimeout())

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                if action.seq is not None:
                    self.metrics.frames_delivered.inc()
                self.emit(action)
            elif isinstance(action, RequestReplay):
                self._replay_task = asyncio.create_task(self._replay(action.after))
            # WaitForGap: _arm_gap_timer arms the timer from the delivery's state.

    async def _replay(self, after: int) -> None:
        try:
            batch = await self._fetch(after)
        finally:
            self._replay_task = None
        self.submit(batch)

    async def _fetch(self, after: int) -> ReplayBatch:
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
            return ReplayBatch(frames=[], first=1, more=True)
        headers = reply.headers or {}
        frames = [(frame_seq(data), data) for data in reply.data.split(b"\n") if data]
        self.metrics.replayed_frames.inc(len(frames))
        return ReplayBatch(
            frames=frames,
            first=int(headers.get(REPLAY_FIRST_HEADER, "1")),
            more=headers.get(REPLAY_MORE_HEADER) == "1",
        )


def resync(feeds: set[SessionFeed]) -> None:
    """After a NATS reconnect, every open connection catches up from Redis."""
    for feed in list(feeds):
        feed.resync()
