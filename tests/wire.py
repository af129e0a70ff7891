"""The client contract, checked on the raw frames a gateway sends.

One :class:`WireChecker` per test watches every connection the test opens
(WebSocket, SSE, plain-text compatibility), fed the frames exactly as they
came off the wire: never a client library's events, which drop duplicates
and reconnect on gaps, and so hide the faults this exists to catch.

What it asserts, as frames arrive (``../shared/PROTOCOL.md``, docs/protocol.md):

- a WebSocket starts with ``ready`` for the session it asked for;
- every ``chunk`` and ``done`` is the connection's cursor + 1 (the cursor
  starts at the connection's ``last_seq``): each seq once, in order, no gap,
  and so none missing across reconnects that resume from the client's cursor.
  The one allowed jump follows an ``error`` ``unavailable`` naming exactly
  the frames past retention;
- a seq carries the same frame on every connection that delivers it;
- seq 1 is turn 1; a turn's frames are contiguous and end with its ``done``;
  the frame after turn t's ``done`` belongs to turn t + 1: exactly one
  ``done`` per turn, with the turn's number;
- after ``paused`` (or ``ready`` with ``paused: true``) no ``chunk`` or ``done``
  until ``resumed``; ``paused.seq`` and ``resumed.seq`` equal the last seq the
  connection delivered, so ``resumed.seq == paused.seq``;
- nothing arrives after a ``done`` on an SSE stream of one turn;
- on demand: every accepted turn ended (:meth:`WireChecker.assert_ended`),
  and the text delivered equals the stored history (:meth:`WireChecker.assert_history`).

A violation raises :class:`WireViolation` (an ``AssertionError``) where the
frame is fed, and is also kept in :attr:`WireChecker.violations`, because a
frame fed from inside a client library's task (:class:`WireTap`) cannot fail
the test by raising: :meth:`WireChecker.assert_clean` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qs, urlsplit

from shared.sse import SSEDecoder

T = TypeVar("T")
_PAST_RETENTION = re.compile(r"frames (\d+)\.\.(\d+) are past retention")


class WireViolation(AssertionError):
    """A frame that breaks the client contract."""


@dataclass
class SessionRecord:
    """What every connection of one session has shown of its seq space."""

    session: str
    frames: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> chunk or done
    done_seq: dict[int, int] = field(default_factory=dict)  # turn -> seq of its done
    accepted: set[int] = field(default_factory=set)

    def text(self, turn: int) -> str:
        return "".join(f["text"] for _, f in sorted(self.frames.items()) if f["type"] == "chunk" and f["turn"] == turn)


class WireChecker:
    """Checks every connection of a test against the contract; see the module doc."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.violations: list[str] = []
        self.connections: list[Connection] = []

    # Connections ---------------------------------------------------------

    def ws(self, session: str | None = None, last_seq: int = 0) -> WsConnection:
        """A new protocol-v1 WebSocket that asked for ``session`` (None: a new
        one, named by its ``ready``) from ``last_seq``."""
        connection = WsConnection(self, session, last_seq)
        self.connections.append(connection)
        return connection

    def ws_url(self, url: str) -> WsConnection:
        """A WebSocket opened at ``url``: session and last_seq read from its query."""
        query = parse_qs(urlsplit(url).query)
        session = query.get("session", [None])[0]
        last_seq = query.get("last_seq", ["0"])[0]
        return self.ws(session, int(last_seq) if last_seq.isdigit() else 0)

    def sse(self, session: str, last_seq: int | None = 0, *, turn: int | None = None) -> SseConnection:
        """An SSE stream of ``session`` after ``last_seq``; with ``turn``, the
        stream of one turn (``POST /api/chat`` with ``Accept: text/event-stream``),
        whose start the client cannot know beforehand (``last_seq=None``)."""
        connection = SseConnection(self, session, last_seq, turn)
        self.connections.append(connection)
        return connection

    def compat(self, session: str) -> CompatConnection:
        """A plain-text (``sessionId=``) socket or streamed ``text/plain`` body."""
        connection = CompatConnection(self, session)
        self.connections.append(connection)
        return connection

    def tap(self) -> WireTap:
        """An observer for :class:`shared.client.ChatClient` (``wire_tap=``)."""
        return WireTap(self)

    # Facts learnt outside the frames -------------------------------------

    def accepted(self, session: str, turn: int) -> None:
        """A turn the server accepted (an ``accepted`` frame, or HTTP 202)."""
        self.record(session).accepted.add(turn)

    # Assertions ----------------------------------------------------------

    def record(self, session: str) -> SessionRecord:
        if session not in self.sessions:
            self.sessions[session] = SessionRecord(session)
        return self.sessions[session]

    def fail(self, where: str, message: str) -> NoReturn:
        violation = f"{where}: {message}"
        self.violations.append(violation)
        raise WireViolation(violation)

    def assert_clean(self) -> None:
        """Raise if any frame, fed anywhere, broke the contract."""
        if self.violations:
            raise WireViolation(f"{len(self.violations)} contract violation(s): " + "; ".join(self.violations[:5]))

    def assert_ended(self, session: str) -> None:
        """Every turn the session accepted was seen to end with its done."""
        self.assert_clean()
        record = self.record(session)
        missing = sorted(record.accepted - set(record.done_seq))
        assert not missing, f"{session}: accepted turns {missing} never delivered a done"

    def assert_history(self, session: str, history: Mapping[str, Any], *, complete: bool = True) -> None:
        """The text delivered equals the stored history (``GET …/history``):
        each finished turn's chunks joined equal its answer, its done has the
        stored seq and reason. ``complete``: every stored turn was delivered
        and no turn is still generating."""
        self.assert_clean()
        record = self.record(session)
        for stored in history["turns"]:
            turn = stored["turn"]
            if turn not in record.done_seq:
                assert not complete, f"{session}: turn {turn} is stored but its done was never delivered"
                continue
            done = record.frames[record.done_seq[turn]]
            assert done["seq"] == stored["last_seq"], f"{session} turn {turn}: done at seq {done['seq']}, stored at {stored['last_seq']}"
            assert done["reason"] == stored["reason"], f"{session} turn {turn}: done {done['reason']!r}, stored {stored['reason']!r}"
            first = record.done_seq.get(turn - 1, 0) + 1
            unseen = [seq for seq in range(first, done["seq"]) if seq not in record.frames]
            if unseen:
                assert not complete, f"{session} turn {turn}: seqs {unseen[:5]}… were never delivered"
                continue
            text = record.text(turn)
            assert text == stored["answer"], f"{session} turn {turn}: delivered {len(text)} chars differ from the stored answer ({len(stored['answer'])})"
        if complete:
            assert history["active"] is None, f"{session}: turn {history['active']} still generating"
            assert max(record.frames, default=0) == history["last_seq"], f"{session}: delivered up to {max(record.frames, default=0)}, stored {history['last_seq']}"
            self.assert_ended(session)

    # Shared by the connection kinds ---------------------------------------

    def validate(self, where: str, frame: dict[str, Any]) -> None:
        """A chunk or done has the fields the contract gives it, of the right types."""
        seq, turn = frame.get("seq"), frame.get("turn")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            self.fail(where, f"{frame['type']} without a valid seq: {frame!r}")
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
            self.fail(where, f"{frame['type']} without a valid turn: {frame!r}")
        if frame["type"] == "chunk" and not isinstance(frame.get("text"), str):
            self.fail(where, f"chunk without text: {frame!r}")
        if frame["type"] == "done" and frame.get("reason") not in ("stop", "length", "stopped", "error"):
            self.fail(where, f"done with reason {frame.get('reason')!r}")
        if frame["type"] == "done" and frame["reason"] == "error" and not (isinstance(frame.get("message"), str) and frame["message"]):
            self.fail(where, f"an error done without a message for the user: {frame!r}")

    def seq_frame(self, where: str, session: str, frame: dict[str, Any]) -> None:
        """Check a valid chunk or done against everything known of its session's seq space."""
        record = self.record(session)
        seq, turn = frame["seq"], frame["turn"]
        known = record.frames.get(seq)
        if known is not None:
            if known != frame:
                self.fail(where, f"seq {seq} was {known!r} and is now {frame!r}")
            return
        if seq == 1 and turn != 1:
            self.fail(where, f"seq 1 belongs to turn {turn}")
        before = record.frames.get(seq - 1)
        if before is not None:
            expected = before["turn"] + 1 if before["type"] == "done" else before["turn"]
            if turn != expected:
                self.fail(where, f"seq {seq} is turn {turn} after seq {seq - 1} ({before['type']} of turn {before['turn']})")
        after = record.frames.get(seq + 1)
        if after is not None and frame["type"] == "chunk" and after["turn"] != turn:
            self.fail(where, f"seq {seq} is a chunk of turn {turn} before turn {after['turn']} began with no done")
        if frame["type"] == "done":
            if turn in record.done_seq:
                self.fail(where, f"a second done for turn {turn}: seq {record.done_seq[turn]} and {seq}")
            record.done_seq[turn] = seq
        elif turn in record.done_seq and record.done_seq[turn] < seq:
            self.fail(where, f"chunk seq {seq} of turn {turn} after its done (seq {record.done_seq[turn]})")
        record.frames[seq] = frame


def _parse(where: str, checker: WireChecker, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        checker.fail(where, "a binary frame")
    try:
        frame = json.loads(text)
    except ValueError:
        checker.fail(where, f"not JSON: {text[:80]!r}")
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        checker.fail(where, f"not a typed JSON object: {text[:80]!r}")
    return frame


def _lenient(text: str | bytes) -> dict[str, Any]:
    """A frame of a connection that already broke the contract, parsed as far as it goes."""
    try:
        frame = json.loads(text)
    except ValueError:
        return {"type": None, "raw": text}
    return frame if isinstance(frame, dict) else {"type": None, "raw": text}


class Connection:
    kind = "connection"

    def __init__(self, checker: WireChecker, session: str | None, last_seq: int | None) -> None:
        self.checker = checker
        self.session = session
        self.cursor = last_seq  # the last seq this connection delivered (or was asked to start after)
        self.frames: list[dict[str, Any]] = []
        self.skipped: list[tuple[int, int]] = []  # ranges an error named past retention
        self.index = len(checker.connections)
        # After its first violation a connection's state is unknown: it is
        # checked no further, so one fault is reported once, not per frame.
        self.broken = False

    @property
    def where(self) -> str:
        return f"{self.kind} #{self.index} ({self.session}, at seq {self.cursor})"

    def fail(self, message: str) -> NoReturn:
        self.checker.fail(self.where, message)

    def _checked(self, check: Callable[[], T], fallback: Callable[[], T]) -> T:
        """Run ``check`` unless an earlier frame broke the contract; mark the connection broken if this one does."""
        if self.broken:
            return fallback()
        try:
            return check()
        except WireViolation:
            self.broken = True
            raise

    def _error(self, frame: dict[str, Any]) -> None:
        """An ``error`` frame; one that names frames past retention allows the jump over them."""
        if not isinstance(frame.get("code"), str) or not isinstance(frame.get("message"), str):
            self.fail(f"error without code and message: {frame!r}")
        missing = _PAST_RETENTION.search(frame["message"]) if frame["code"] == "unavailable" else None
        if missing:
            first, last = int(missing[1]), int(missing[2])
            if self.cursor is None or first != self.cursor + 1 or last < first:
                self.fail(f"frames {first}..{last} past retention, but this connection is at {self.cursor}")
            self.cursor = last  # the one allowed jump: delivery goes on after the named range
            self.skipped.append((first, last))

    def _advance(self, frame: dict[str, Any]) -> None:
        """A chunk or done: the next seq on this connection, consistent with the session."""
        assert self.session is not None
        self.checker.validate(self.where, frame)
        seq = frame["seq"]
        if self.cursor is not None and seq != self.cursor + 1:
            what = "a duplicate or reordered" if seq <= self.cursor else "a gap:"
            self.fail(f"{what} seq {seq} after {self.cursor}")
        self.checker.seq_frame(self.where, self.session, frame)
        self.cursor = frame["seq"]


class WsConnection(Connection):
    """One protocol-v1 WebSocket; :meth:`feed` each text frame received."""

    kind = "ws"

    def __init__(self, checker: WireChecker, session: str | None, last_seq: int) -> None:
        super().__init__(checker, session, last_seq)
        self.ready: dict[str, Any] | None = None
        self.paused_at: int | None = None  # the cursor when delivery paused

    def feed(self, text: str | bytes) -> dict[str, Any]:
        """Check one frame as received; return it parsed."""
        return self._checked(lambda: self._check(text), lambda: _lenient(text))

    def _check(self, text: str | bytes) -> dict[str, Any]:
        frame = _parse(self.where, self.checker, text)
        self.frames.append(frame)
        kind = frame["type"]
        if self.ready is None:
            if kind != "ready":
                self.fail(f"the first frame is {kind!r}, not ready")
            self._on_ready(frame)
            return frame
        assert self.session is not None and self.cursor is not None
        if kind == "ready":
            self.fail("a second ready")
        elif kind in ("chunk", "done"):
            if self.paused_at is not None:
                self.fail(f"{kind} seq {frame.get('seq')} while paused at {self.paused_at}")
            self._advance(frame)
        elif kind == "paused":
            if frame.get("seq") != self.cursor:
                self.fail(f"paused at seq {frame.get('seq')}, but this connection delivered up to {self.cursor}")
            self.paused_at = self.cursor
        elif kind == "resumed":
            if self.paused_at is None:
                self.fail("resumed when not paused")
            if frame.get("seq") != self.paused_at:
                self.fail(f"resumed at seq {frame.get('seq')} after paused at {self.paused_at}")
            self.paused_at = None
        elif kind == "accepted":
            if not isinstance(frame.get("turn"), int):
                self.fail(f"accepted without a turn: {frame!r}")
            self.checker.accepted(self.session, frame["turn"])
        elif kind == "error":
            self._error(frame)
        elif kind == "auth_ok":
            if not isinstance(frame.get("exp"), int) or isinstance(frame.get("exp"), bool):
                self.fail(f"auth_ok without an integer exp: {frame!r}")
        elif kind != "pong":
            self.fail(f"an unknown frame type {kind!r}")
        return frame

    def _on_ready(self, frame: dict[str, Any]) -> None:
        session = frame.get("session")
        if not isinstance(session, str) or (self.session is not None and session != self.session):
            self.fail(f"ready for session {session!r}")
        self.session = session
        last_seq = frame.get("last_seq")
        if not isinstance(last_seq, int) or (self.cursor is not None and last_seq < self.cursor):
            self.fail(f"ready.last_seq {last_seq!r} below the connection's last_seq {self.cursor}")
        if frame.get("paused") is True:
            self.paused_at = self.cursor
        elif frame.get("paused") is not False:
            self.fail(f"ready.paused is {frame.get('paused')!r}")
        self.ready = frame
        self.checker.record(session)

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


class SseConnection(Connection):
    """An SSE stream; :meth:`feed_bytes` the body as it arrives."""

    kind = "sse"

    def __init__(self, checker: WireChecker, session: str, last_seq: int | None, turn: int | None) -> None:
        super().__init__(checker, session, last_seq)
        self.turn = turn
        self.decoder = SSEDecoder()
        self.paused_at: int | None = None
        self.ended = False
        if turn is not None:
            checker.accepted(session, turn)

    def feed_bytes(self, data: bytes) -> list[dict[str, Any]]:
        """Check the events these bytes complete; return their frames."""
        return [self.feed_event(event.event, event.data, event.id) for event in self.decoder.feed(data)]

    def feed_event(self, event: str, data: str, id: str | None) -> dict[str, Any]:
        """Check one SSE event; return its frame parsed."""
        return self._checked(lambda: self._check_event(event, data, id), lambda: _lenient(data))

    def _check_event(self, event: str, data: str, id: str | None) -> dict[str, Any]:
        frame = _parse(self.where, self.checker, data)
        self.frames.append(frame)
        kind = frame["type"]
        if event != kind:
            self.fail(f"event {event!r} carries a {kind!r} frame")
        if self.ended:
            self.fail(f"{kind} after the turn's done")
        if kind in ("chunk", "done"):
            if id != str(frame.get("seq")):
                self.fail(f"id {id!r} for seq {frame.get('seq')}")
            if self.paused_at is not None:
                self.fail(f"{kind} seq {frame.get('seq')} while paused at {self.paused_at}")
            self.checker.validate(self.where, frame)
            if self.turn is not None:
                if frame.get("turn") != self.turn:
                    self.fail(f"a frame of turn {frame.get('turn')} on the stream of turn {self.turn}")
                if self.cursor is None:  # the turn's first frame: after the previous turn's done, if known
                    before = self.checker.record(self.session or "").done_seq.get(self.turn - 1)
                    self.cursor = frame["seq"] - 1 if before is None else before
            self._advance(frame)
            self.ended = kind == "done" and self.turn is not None
        elif kind == "paused":
            if self.cursor is not None and frame.get("seq") != self.cursor:
                self.fail(f"paused at seq {frame.get('seq')}, but this stream delivered up to {self.cursor}")
            self.paused_at = frame.get("seq")
        elif kind == "resumed":
            if self.paused_at is None or frame.get("seq") != self.paused_at:
                self.fail(f"resumed at seq {frame.get('seq')} after paused at {self.paused_at}")
            self.paused_at = None
        elif kind == "error":
            self._error(frame)
        else:
            self.fail(f"an unexpected frame type {kind!r} on SSE")
        return frame


class CompatConnection(Connection):
    """Plain text, chunk by chunk (``sessionId=`` sockets, ``text/plain`` bodies)."""

    kind = "compat"

    def __init__(self, checker: WireChecker, session: str) -> None:
        super().__init__(checker, session, None)
        self.texts: list[str] = []

    def feed(self, text: str | bytes) -> str:
        if not isinstance(text, str):
            self.fail("a binary frame")
        if text.startswith("{") and '"type"' in text:
            self.fail(f"a JSON frame on a plain-text connection: {text[:80]!r}")
        self.texts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def assert_history(self, history: Mapping[str, Any], *, from_start: bool = False, to_end: bool = True) -> None:
        """What this connection received is the stored answers' text from some
        point on, once and in order: their suffix (``to_end``), or all of it
        (``from_start``)."""
        stored = "".join(turn["answer"] for turn in history["turns"])
        got = self.text
        if from_start and to_end:
            ok = got == stored
        elif to_end:
            ok = stored.endswith(got)
        else:
            ok = got in stored
        assert ok, f"{self.where}: {len(got)} chars received are not the stored text's {'whole' if from_start else 'tail'} ({len(stored)} chars)"


class WireTap:
    """Feeds a :class:`shared.client.ChatClient`'s raw wire to the checker:
    each connection it opens, every text frame it receives. Violations are
    recorded, not raised into the client's task; assert them with
    :meth:`WireChecker.assert_clean`."""

    def __init__(self, checker: WireChecker) -> None:
        self.checker = checker
        self.connection: WsConnection | None = None

    @property
    def session(self) -> str | None:
        return None if self.connection is None else self.connection.session

    def opened(self, url: str) -> None:
        self.connection = self.checker.ws_url(url)

    def received(self, message: str | bytes) -> None:
        if self.connection is None:
            return
        try:
            self.connection.feed(message)
        except WireViolation:
            pass  # recorded; the test asserts it

    def closed(self) -> None:
        self.connection = None
