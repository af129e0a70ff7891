"""The client contract, checked on the raw frames a gateway sends.

One :class:`WireChecker` per test watches every connection the test opens
(WebSocket, SSE, plain-text compatibility), fed the frames exactly as they
came off the wire: never a client library's events, which drop duplicates
and reconnect on gaps, and so hide the faults this exists to catch.

What it asserts, as frames arrive (docs/protocol.md):

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

Also checked: frames are strict JSON (no duplicate keys, no NaN), a chunk's
text is valid Unicode of at most 16 KiB, error codes are documented ones, an
error ``done`` has a message, an ``accepted`` never names a turn its
connection already saw end (unless that chat was accepted as it before: a
resend), ``ready.last_seq`` is never below a seq already delivered, SSE
bodies are UTF-8 and only ``chunk``/``done`` events carry an ``id``, and a
plain-text connection never receives a protocol frame.

What it cannot see: a connection that keeps delivering after another one
got ``paused`` (frames carry no pause version, and a connection may deliver
until the broadcast pause reaches it); a plain-text connection's lost or
repeated chunk when the text repeats (only the joined text can be compared);
anything on a connection that already broke the contract (after its first
violation it is checked no further, so one fault is reported once).

A violation raises :class:`WireViolation` (an ``AssertionError``) where the
frame is fed, and is also kept in :attr:`WireChecker.violations`, because a
frame fed from inside a client library's task (:class:`WireTap`) cannot fail
the test by raising: :meth:`WireChecker.assert_clean` does.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeGuard, TypeVar
from urllib.parse import parse_qs, urlsplit

from shared.sse import SSEDecoder

T = TypeVar("T")
MAX_CHUNK_BYTES = 16 * 1024  # one chunk's text at most (docs/protocol.md)
ERROR_CODES = {"invalid", "busy", "unauthorized", "forbidden", "rate_limited", "too_big", "unavailable"}
# Each server frame type and a field it always has: how a protocol frame is told from a model's JSON answer.
FRAME_FIELDS = {"ready": "session", "chunk": "seq", "done": "seq", "paused": "seq", "resumed": "seq", "accepted": "turn",
                "error": "code", "auth_ok": "exp", "pong": "type"}
_PAST_RETENTION = re.compile(r"frames (\d+)\.\.(\d+) are past retention")


class WireViolation(AssertionError):
    """A frame that breaks the client contract."""


@dataclass
class SessionRecord:
    """What every connection of one session has shown of its seq space."""

    session: str
    frames: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> chunk or done
    last_seq: int = 0  # the highest seq seen
    done_seq: dict[int, int] = field(default_factory=dict)  # turn -> seq of its done
    accepted: set[int] = field(default_factory=set)
    accepted_ids: dict[str, int] = field(default_factory=dict)  # chat id -> its turn

    def text(self, turn: int) -> str:
        return "".join(f["text"] for _, f in sorted(self.frames.items()) if f["type"] == "chunk" and f["turn"] == turn)


class WireChecker:
    """Checks every connection of a test against the contract; see the module doc."""

    made: ClassVar[list[WireChecker]] = []  # since the current test started (tests/conftest.py reports them)

    def __init__(self) -> None:
        WireChecker.made.append(self)
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
        the stored turns are numbered one after another and agree with
        ``last_seq`` and ``resume_from``; each stored turn that was delivered
        has its done at the stored seq with the stored reason, and its chunks
        joined equal its answer. ``complete``: every stored turn was delivered
        whole, every turn delivered is stored, and no turn is still generating."""
        self.assert_clean()
        record = self.record(session)
        turns = history["turns"]
        numbers = [stored["turn"] for stored in turns]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True, f"{session}: stored turns {numbers}"
        if turns:
            assert history["last_seq"] == history["resume_from"] == turns[-1]["last_seq"], (
                f"{session}: last_seq {history['last_seq']}, resume_from {history['resume_from']}, last turn's done at {turns[-1]['last_seq']}"
            )
        previous_done = {stored["turn"]: stored["last_seq"] for stored in turns}
        for stored in turns:
            turn = stored["turn"]
            if turn not in record.done_seq:
                assert not complete, f"{session}: turn {turn} is stored but its done was never delivered"
                continue
            done = record.frames[record.done_seq[turn]]
            assert done["seq"] == stored["last_seq"], f"{session} turn {turn}: done at seq {done['seq']}, stored at {stored['last_seq']}"
            assert done["reason"] == stored["reason"], f"{session} turn {turn}: done {done['reason']!r}, stored {stored['reason']!r}"
            # The turn's first seq follows the previous turn's done, wherever that is known from.
            before = 0 if turn == 1 else previous_done.get(turn - 1, record.done_seq.get(turn - 1))
            unseen = ["the start"] if before is None else [seq for seq in range(before + 1, done["seq"]) if seq not in record.frames]
            if unseen:
                assert not complete, f"{session} turn {turn}: seqs {unseen[:5]}… were never delivered"
                continue
            text = record.text(turn)
            assert text == stored["answer"], f"{session} turn {turn}: delivered {len(text)} chars differ from the stored answer ({len(stored['answer'])})"
        if complete:
            assert history["active"] is None, f"{session}: turn {history['active']} still generating"
            assert record.last_seq == history["last_seq"], f"{session}: delivered up to {record.last_seq}, stored {history['last_seq']}"
            unstored = sorted(set(record.done_seq) - set(numbers))
            assert not unstored, f"{session}: turns {unstored} delivered but not stored"
            self.assert_ended(session)

    # Shared by the connection kinds ---------------------------------------

    def validate(self, where: str, frame: dict[str, Any]) -> None:
        """A chunk or done has the fields the contract gives it, of the right types."""
        seq, turn = frame.get("seq"), frame.get("turn")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            self.fail(where, f"{frame['type']} without a valid seq: {frame!r}")
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
            self.fail(where, f"{frame['type']} without a valid turn: {frame!r}")
        if frame["type"] == "chunk":
            text = frame.get("text")
            if not isinstance(text, str):
                self.fail(where, f"chunk without text: {frame!r}")
            try:
                size = len(text.encode())
            except UnicodeEncodeError:
                self.fail(where, f"chunk seq {seq} text is not valid Unicode (a lone surrogate)")
            if size > MAX_CHUNK_BYTES:
                self.fail(where, f"chunk seq {seq} text of {size} bytes, over {MAX_CHUNK_BYTES}")
        if frame["type"] == "done" and frame.get("reason") not in ("stop", "length", "stopped", "error"):
            self.fail(where, f"done with reason {frame.get('reason')!r}")
        if frame["type"] == "done" and frame["reason"] == "error" and not (isinstance(frame.get("message"), str) and frame["message"]):
            self.fail(where, f"an error done without a message for the user: {frame!r}")

    def seq_frame(self, where: str, session: str, frame: dict[str, Any]) -> None:
        """Check a valid chunk or done against everything known of its session's
        seq space, from any connection: turns never go back, a turn's frames are
        contiguous and end with its one done, the next seq is the next turn's."""
        record = self.record(session)
        seq, turn, is_done = frame["seq"], frame["turn"], frame["type"] == "done"
        known = record.frames.get(seq)
        if known is not None:
            if known != frame:
                self.fail(where, f"seq {seq} was {known!r} and is now {frame!r}")
            return
        if seq == 1 and turn != 1:
            self.fail(where, f"seq 1 belongs to turn {turn}")
        if is_done and turn in record.done_seq:
            self.fail(where, f"a second done for turn {turn}: seq {record.done_seq[turn]} and {seq}")
        lower = seq - 1 if seq - 1 in record.frames else max((s for s in record.frames if s < seq), default=None)
        if lower is not None:
            before = record.frames[lower]
            least = before["turn"] + (1 if before["type"] == "done" else 0)
            if turn < least or (lower == seq - 1 and turn != least):
                self.fail(where, f"seq {seq} is turn {turn} after seq {lower} ({before['type']} of turn {before['turn']})")
        higher = None if seq >= record.last_seq else min(s for s in record.frames if s > seq)
        if higher is not None:
            after = record.frames[higher]
            least = turn + (1 if is_done else 0)
            if after["turn"] < least or (higher == seq + 1 and after["turn"] != least):
                self.fail(where, f"seq {seq} ({frame['type']} of turn {turn}) before seq {higher} ({after['type']} of turn {after['turn']})")
        if is_done:
            record.done_seq[turn] = seq
        record.frames[seq] = frame
        record.last_seq = max(record.last_seq, seq)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in {keys}")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_seq(value: Any) -> TypeGuard[int]:
    """A seq or cursor: a non-negative integer (a bool or float is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse(where: str, checker: WireChecker, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        checker.fail(where, "a binary frame")
    try:
        frame = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except ValueError as exc:
        checker.fail(where, f"not JSON ({exc}): {text[:80]!r}")
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
        if frame["code"] not in ERROR_CODES:
            self.fail(f"error with an undocumented code {frame['code']!r}")
        missing = _PAST_RETENTION.search(frame["message"]) if frame["code"] == "unavailable" else None
        if missing:
            first, last = int(missing[1]), int(missing[2])
            if self.cursor is None:  # a turn's stream before its first frame: it starts after the range
                self.cursor = first - 1
            if first != self.cursor + 1 or last < first:
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
            if not _is_seq(frame.get("seq")) or frame["seq"] != self.cursor:
                self.fail(f"paused at seq {frame.get('seq')!r}, but this connection delivered up to {self.cursor}")
            self.paused_at = self.cursor
        elif kind == "resumed":
            if self.paused_at is None:
                self.fail("resumed when not paused")
            if not _is_seq(frame.get("seq")) or frame["seq"] != self.paused_at:
                self.fail(f"resumed at seq {frame.get('seq')!r} after paused at {self.paused_at}")
            self.paused_at = None
        elif kind == "accepted":
            self._accepted(frame)
        elif kind == "error":
            self._error(frame)
        elif kind == "auth_ok":
            if not isinstance(frame.get("exp"), int) or isinstance(frame.get("exp"), bool):
                self.fail(f"auth_ok without an integer exp: {frame!r}")
        elif kind != "pong":
            self.fail(f"an unknown frame type {kind!r}")
        return frame

    def _accepted(self, frame: dict[str, Any]) -> None:
        """A turn accepted: a valid number, and never one this connection saw end
        unless the same chat was accepted as that turn before (a resend)."""
        assert self.session is not None
        turn, chat_id = frame.get("turn"), frame.get("id")
        if not _is_seq(turn) or turn < 1:
            self.fail(f"accepted without a valid turn: {frame!r}")
        record = self.checker.record(self.session)
        ended_here = any(f.get("type") == "done" and f.get("turn") == turn for f in self.frames[:-1])
        if ended_here and (chat_id is None or record.accepted_ids.get(chat_id) != turn):
            self.fail(f"a chat accepted as turn {turn}, which had already ended: it can produce nothing")
        if isinstance(chat_id, str):
            record.accepted_ids[chat_id] = turn
        self.checker.accepted(self.session, turn)

    def _on_ready(self, frame: dict[str, Any]) -> None:
        session = frame.get("session")
        if not isinstance(session, str) or (self.session is not None and session != self.session):
            self.fail(f"ready for session {session!r}")
        self.session = session
        last_seq = frame.get("last_seq")
        if not _is_seq(last_seq) or (self.cursor is not None and last_seq < self.cursor):
            self.fail(f"ready.last_seq {last_seq!r} below the connection's last_seq {self.cursor}")
        stored = self.checker.record(session).last_seq
        if last_seq < stored:  # every frame delivered was stored first
            self.fail(f"ready.last_seq {last_seq} below seq {stored}, already delivered")
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
        super().__init__(checker, session, 0 if last_seq is None and turn == 1 else last_seq)
        self.turn = turn
        self.decoder = SSEDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.last_id: str | None = None
        self.paused_at: int | None = None
        self.ended = False
        if turn is not None:
            checker.accepted(session, turn)

    def feed_bytes(self, data: bytes) -> list[dict[str, Any]]:
        """Check the events these bytes complete; return their frames."""
        if not self.broken:
            try:
                self.utf8.decode(data)  # the decoder below would replace bad bytes and hide them
            except UnicodeDecodeError as exc:
                self.broken = True
                self.fail(f"the body is not UTF-8: {exc}")
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
        if kind not in ("chunk", "done") and id != self.last_id:
            # Only chunk and done carry an id; the decoder, like EventSource, keeps the last one.
            self.fail(f"a {kind} event with id {id!r}, after id {self.last_id!r}")
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
            self.last_id = id
            self.ended = kind == "done" and self.turn is not None
        elif kind == "paused":
            seq = frame.get("seq")
            if not _is_seq(seq) or (self.cursor is not None and seq != self.cursor):
                self.fail(f"paused at seq {seq!r}, but this stream delivered up to {self.cursor}")
            self.cursor = self.paused_at = seq  # a turn's stream that starts paused starts after it
        elif kind == "resumed":
            if self.paused_at is None or not _is_seq(frame.get("seq")) or frame["seq"] != self.paused_at:
                self.fail(f"resumed at seq {frame.get('seq')!r} after paused at {self.paused_at}")
            self.paused_at = None
        elif kind == "error":
            self._error(frame)
        else:
            self.fail(f"an unexpected frame type {kind!r} on SSE")
        return frame


def _looks_like_a_frame(text: str) -> bool:
    """A protocol frame, not a model's answer that happens to be JSON: an
    object typed as a server frame, with that frame's defining field."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") in FRAME_FIELDS and FRAME_FIELDS[value["type"]] in value


class CompatConnection(Connection):
    """Plain text, chunk by chunk (``sessionId=`` sockets, ``text/plain`` bodies)."""

    kind = "compat"

    def __init__(self, checker: WireChecker, session: str) -> None:
        super().__init__(checker, session, None)
        self.texts: list[str] = []

    def feed(self, text: str | bytes) -> str:
        if not isinstance(text, str):
            self.fail("a binary frame")
        if _looks_like_a_frame(text):
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
