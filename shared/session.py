"""Per-connection delivery: the pause/resume/replay/seq state machine.

One :class:`Delivery` exists per client connection (WebSocket or SSE). The I/O
layer feeds it events (a live frame from NATS, a replay batch from a buffer,
the client's pause or resume, another connection's pause or resume) and
executes the actions it returns, in order, from a single task. Because every
frame to the client passes through here, the guarantees of docs/protocol.md hold
per connection whatever order NATS delivers in:

- guarantee 1: a frame is sent only if its seq is ``delivered + 1``; frames
  ahead of the cursor wait in ``pending`` while the gap is filled by replay
  from the Redis log, frames at or behind the cursor are dropped;
- guarantee 2: while paused nothing is sent, and ``paused`` reports the cursor;
- guarantee 3: resume reports the same cursor, then replays from it;
- guarantee 4: pause state comes from the session record and from
  other connections' events, ordered by the record's ``version``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .protocol import Error, Paused, Resumed, encode

__all__ = [
    "Delivery",
    "LiveFrame",
    "ReplayBatch",
    "LocalPause",
    "LocalResume",
    "RemotePause",
    "RemoteResume",
    "GapTimeout",
    "Send",
    "RequestReplay",
    "WaitForGap",
    "Event",
    "Action",
]


# Events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveFrame:
    """A stored frame published by a buffer."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ReplayBatch:
    """Frames read from the log after the cursor, oldest first.

    ``first`` is the lowest seq the log can still deliver (frames below it
    were trimmed by the retention cap); ``more`` says the log holds frames
    past this batch.
    """

    frames: list[tuple[int, bytes]]
    first: int
    more: bool


@dataclass(frozen=True, slots=True)
class LocalPause:
    """This connection's client paused; ``version`` is the record's new version."""

    version: int


@dataclass(frozen=True, slots=True)
class LocalResume:
    version: int


@dataclass(frozen=True, slots=True)
class RemotePause:
    """Some connection of the session paused (possibly this one: an echo)."""

    version: int


@dataclass(frozen=True, slots=True)
class RemoteResume:
    version: int


@dataclass(frozen=True, slots=True)
class GapTimeout:
    """Frames ahead of the cursor waited too long for the missing ones."""


Event = LiveFrame | ReplayBatch | LocalPause | LocalResume | RemotePause | RemoteResume | GapTimeout


# Actions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send an encoded frame. ``seq`` is set for ``chunk`` and ``done`` frames."""

    data: bytes
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class RequestReplay:
    """Ask a buffer for stored frames with seq > ``after``, then feed a ReplayBatch."""

    after: int


@dataclass(frozen=True, slots=True)
class WaitForGap:
    """Feed GapTimeout if no live frame arrives within the gap timeout."""


Action = Send | RequestReplay | WaitForGap


@dataclass(slots=True)  # one per connection: no instance dict
class Delivery:
    """The cursor and pause state of one connection.

    Args:
        delivered: the highest seq the client already has (``last_seq``).
        paused: the session's pause flag when the connection opened.
        version: the pause flag's version read with it.
        max_pending: live frames held ahead of a gap before they are dropped
            (they are replayed from the log later, so memory stays bounded).
    """

    delivered: int
    paused: bool
    version: int = 0
    max_pending: int = 1024
    replaying: bool = False
    pending: dict[int, bytes] = field(default_factory=dict)
    # A replay in flight across a pause and resume may predate frames that
    # were ignored while paused: when it returns, ask again.
    replay_stale: bool = False

    def start(self) -> list[Action]:
        """Actions to run when the connection opens: catch up unless paused."""
        return [] if self.paused else self._request_replay()

    def handle(self, event: Event) -> list[Action]:
        """Apply one event and return the actions to execute, in order."""
        match event:
            case LiveFrame(seq=seq, data=data):
                return self._live(seq, data)
            case ReplayBatch():
                return self._replayed(event)
            case LocalPause(version=version):
                return self._pause(version, local=True)
            case RemotePause(version=version):
                return self._pause(version, local=False)
            case LocalResume(version=version):
                return self._resume(version, local=True)
            case RemoteResume(version=version):
                return self._resume(version, local=False)
            case GapTimeout():
                return [] if self.paused or self.replaying else self._request_replay()
            case _:
                raise TypeError(f"unknown event {event!r}")

    # internals ------------------------------------------------------------

    def _request_replay(self) -> list[Action]:
        if self.replaying:
            return []
        self.replaying = True
        return [RequestReplay(self.delivered)]

    def _live(self, seq: int, data: bytes) -> list[Action]:
        if seq <= self.delivered:
            return []
        if self.paused:
            # Held for a fast resume (bounded; the replay on resume fills in the rest).
            if len(self.pending) < self.max_pending:
                self.pending[seq] = data
            return []
        if seq == self.delivered + 1 and not self.replaying:
            self.delivered = seq
            return [Send(data, seq), *self._drain_pending()]
        if len(self.pending) < self.max_pending:
            self.pending[seq] = data
        if self.replaying:
            return []
        return self._request_replay()

    def _replayed(self, batch: ReplayBatch) -> list[Action]:
        self.replaying = False
        stale, self.replay_stale = self.replay_stale, False
        if self.paused:
            return []  # the pause came after the request: send nothing
        actions: list[Action] = []
        if batch.first > self.delivered + 1:
            # Frames past retention (TTL or cap) cannot be delivered; say so
            # once and go on from the oldest frame the log holds.
            missing = f"{self.delivered + 1}..{batch.first - 1}"
            actions.append(
                Send(encode(Error(code="unavailable", message=f"frames {missing} are past retention")))
            )
            self.delivered = batch.first - 1
        for seq, data in batch.frames:
            if seq == self.delivered + 1:
                self.delivered = seq
                actions.append(Send(data, seq))
            elif seq > self.delivered + 1:
                break  # a frame still being stored: wait for it
        actions.extend(self._drain_pending())
        if (batch.more or stale) and not self.pending:
            actions.extend(self._request_replay())
        elif self.pending:
            actions.append(WaitForGap())
        return actions

    def _drain_pending(self) -> list[Action]:
        actions: list[Action] = []
        for seq in sorted(self.pending):
            if seq <= self.delivered:
                del self.pending[seq]
            elif seq == self.delivered + 1:
                self.delivered = seq
                actions.append(Send(self.pending.pop(seq), seq))
            else:
                break
        return actions

    def _pause(self, version: int, *, local: bool) -> list[Action]:
        if version <= self.version and not local:
            return []  # stale or echoed
        self.version = max(self.version, version)
        if self.paused:
            return [Send(encode(Paused(seq=self.delivered)))] if local else []
        self.paused = True
        return [Send(encode(Paused(seq=self.delivered)))]

    def _resume(self, version: int, *, local: bool) -> list[Action]:
        if version <= self.version and not local:
            return []
        self.version = max(self.version, version)
        if not self.paused:
            return []
        self.paused = False
        if self.replaying:
            self.replay_stale = True
        resumed = Send(encode(Resumed(seq=self.delivered)))
        # Frames held while paused go out at once (the first chunk does not
        # wait for a round trip); the replay still follows, because frames
        # may have been dropped past the bound or missed in a NATS reconnect.
        return [resumed, *self._drain_pending(), *self._request_replay()]
