"""A stateful fuzz of the WebSocket protocol against a running stack.

Hypothesis drives a few clients of a few sessions through a real gateway:
connections opened (new sessions, or existing ones from what a client has)
and closed or dropped, valid chats, pause, resume, stop, acks, pings, token
renewals, and invalid frames of every kind. Every frame received goes through
the strict wire checker (tests/wire.py). After each step the model knows what
each frame sent must be answered with (docs/protocol.md, "Client → server"),
and a marker ping on every connection involved tells it when the answers have
arrived. After each example, every accepted turn has ended with one done, each
done's reason fits the stops the server accepted, and the text delivered
equals the stored history.

The gateway's tasks and memory are measured once, idle and per open
connection, before the first example; after the last, with every connection
closed, they must be back within a fixed budget.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from devstack.servers import Server
from tests.stack import WAIT_S, Stack, isolated_stack, new_session
from tests.wire import WireChecker, WsConnection

T = TypeVar("T")

MAX_FRAME_BYTES = 4096
MAX_PROMPT_CHARS = 300
FUZZ_ENV = {
    # 15 tokens at 250 a second: a turn lasts ~60 ms, so most end between
    # steps and some are still generating when a chat (busy) or stop lands.
    "CHAT_DEMO_TOKENS_PER_S": "250",
    "CHAT_DEMO_ANSWER_TOKENS": "15",
    # Rate limits are tested in test_server_limits; here they would only refuse valid frames.
    "CHAT_FRAMES_PER_S": "1000",
    "CHAT_FRAME_BURST": "1000",
    "CHAT_MAX_TURNS_PER_USER": "100",
    # Small bounds, so an oversize frame and a too-long prompt are cheap to send.
    "CHAT_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
    "CHAT_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
}
MAX_OPEN = 4  # connections open at once in one example
MAX_SESSIONS = 3

FUZZ_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    # A live stack does not replay a failure exactly: no shrinking (the failing
    # steps are printed as run), and no example database in the checkout.
    phases=[Phase.explicit, Phase.generate],
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# A run must exercise turns and every control, or it proves little. Counted over
# all examples. Hypothesis leaves a random subset of rules out of each example
# (swarm testing), so counts vary several-fold from run to run (the least seen in
# 8 runs: 104 chats accepted, 64 stops accepted, 29 resumes, 27 acks, 57 invalid
# frames): the floors catch a fuzz that stopped exercising something, not a quiet run.
FLOORS = {
    "chats accepted": 70,  # 60 come from the examples' first steps
    "turns ended": 70,
    "stops accepted": 5,
    "reconnects": 5,
    "pauses": 5,
    "resumes": 5,
    "acks": 5,
    "auth_ok": 5,
    "invalid frames": 5,
}

# Tasks after the fuzz: exactly the idle baseline (an idle gateway runs a fixed
# set, 7 here; each open connection adds 8).
TASK_SLACK = 0
# Memory after the fuzz: the idle baseline plus this much. A run (~200 turns, ~400
# connections) leaves 1-2 MiB of allocator high-water marks, not a trend (five runs
# in a row on one gateway: +0.9, +0.4, +0.3, +0.0, +0.2 MiB). An idle connection
# holds ~35 KiB: a leak of a connection's state (or a turn's) grows past the budget.
RSS_BUDGET_KIB = 4 * 1024

# Strategies ------------------------------------------------------------------

KNOWN_TYPES = ("chat", "pause", "resume", "stop", "ping", "auth", "ack")
VALID_FIELDS: dict[str, dict[str, Any]] = {"chat": {"prompt": "hello"}, "auth": {"token": "x.y.z"}, "ack": {"seq": 1}}
VALID_FRAMES = [
    '{"type":"chat","prompt":"hello","id":"c1"}',
    '{"type":"pause"}',
    '{"type":"resume"}',
    '{"type":"stop"}',
    '{"type":"ping","t":1}',
    '{"type":"auth","token":"x.y.z"}',
    '{"type":"ack","seq":3}',
]

# Built, never filtered: a filter that misses discards the whole example (here,
# a third of them), and with it the turns it ran.
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)  # no lone surrogates: not sendable
numbers = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
lists = st.lists(json_values, max_size=3)
objects = st.dictionaries(texts, json_values, max_size=3)
not_strings = st.none() | st.booleans() | numbers | lists | objects
not_ints = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | texts | lists | objects
not_objects = st.none() | st.booleans() | numbers | texts | lists
# Never blank: the first character is not whitespace.
prompts = st.tuples(
    st.characters(codec="utf-8", exclude_categories=("Zs", "Zl", "Zp", "Cc")),
    st.text(st.characters(codec="utf-8"), max_size=39),
).map("".join)
odd_names = st.sampled_from(["extra", "Type", "PROMPT", "seq ", "", "ttl"]) | texts.map(lambda t: "_" + t)
MISSING = object()  # a field left out


def _with(frame_type: str, name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """A frame of a known type whose field ``name`` holds one of ``values`` (or is missing)."""
    base = VALID_FIELDS.get(frame_type, {})

    def build(value: Any) -> str:
        fields = {k: v for k, v in base.items() if k != name}
        if value is not MISSING:
            fields[name] = value
        return json.dumps({"type": frame_type, **fields})

    return values.map(build)


# (what is wrong, the frame): each must get error invalid, the connection staying open.
invalid_frames = st.one_of(
    # No JSON text starts with these.
    st.tuples(st.sampled_from("}]:,'<x"), texts).map(lambda p: ("malformed JSON", p[0] + p[1])),
    st.sampled_from(VALID_FRAMES).flatmap(
        lambda frame: st.integers(1, len(frame) - 1).map(lambda cut: ("cut-off JSON", frame[:cut]))
    ),
    not_objects.map(lambda v: ("not an object", json.dumps(v))),
    st.dictionaries(odd_names, json_values, max_size=3).map(lambda d: ("no type", json.dumps(d))),
    (
        st.sampled_from(["", "nope", "CHAT", "Chat", " chat", "chat.v1", "ready", "pong", "accepted", "error"])
        | not_strings
    ).map(lambda t: ("unknown type", json.dumps({"type": t}))),
    _with("chat", "prompt", st.just(MISSING) | not_strings).map(lambda f: ("chat prompt not a string", f)),
    _with("chat", "id", st.booleans() | numbers | lists | objects).map(lambda f: ("chat id not a string", f)),
    _with("chat", "id", st.integers(129, 300).map(lambda n: "i" * n)).map(lambda f: ("chat id too long", f)),
    _with("ack", "seq", st.just(MISSING) | not_ints).map(lambda f: ("ack seq not an int", f)),
    _with("auth", "token", st.just(MISSING) | not_strings).map(lambda f: ("auth token not a string", f)),
    st.tuples(st.sampled_from(KNOWN_TYPES), odd_names, json_values).flatmap(
        lambda p: _with(p[0], p[1], st.just(p[2])).map(lambda f: ("unknown field", f))
    ),
    st.integers(33, 200).map(lambda n: ("ping t nested too deeply", '{"type":"ping","t":' + "[" * n + "]" * n + "}")),
    st.binary(max_size=50).map(lambda b: ("binary", b)),
)

# The model -------------------------------------------------------------------


@dataclass(eq=False)
class Session:
    """What the model knows of one session."""

    id: str | None  # None until its first ready names a server-picked id
    token: str | None  # the owner's token; None: an anonymous session
    turns: int = 0  # turns accepted so far
    paused: bool = False
    stopped: set[int] = field(default_factory=set)  # turns whose stop the server accepted

    def __repr__(self) -> str:
        return f"Session({self.id or 'server-named'}, {'user' if self.token else 'anonymous'})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how Hypothesis prints a draw
        printer.text(repr(self))


@dataclass
class Expect:
    """An answer a connection must receive. ``direct`` answers are sent while
    the frame is handled, so they precede the marker's pong; ``paused`` and
    ``resumed`` come from the session feed and may follow it."""

    what: str
    matches: Callable[[dict[str, Any]], bool]
    direct: bool = True
    optional: bool = False


@dataclass(eq=False)
class Conn:
    ws: ClientConnection
    wire: WsConnection
    session: Session
    expected: list[Expect] = field(default_factory=list)
    open: bool = True
    marker: str = ""

    def __repr__(self) -> str:
        return f"Conn(#{self.wire.index}, {self.session!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def is_type(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame["type"] == kind


def is_error(code: str, chat_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def matches(frame: dict[str, Any]) -> bool:
        if frame["type"] != "error" or frame["code"] != code or frame.get("id") != chat_id:
            return False
        assert frame["message"].strip(), f"error {code} without a message"
        return True

    return matches


def canonical(value: Any) -> str:
    """JSON that tells 1 from 1.0 and True (an echo must keep the type)."""
    return json.dumps(value, sort_keys=True)


class ProtocolMachine(RuleBasedStateMachine):
    """Clients of a few sessions on one gateway; see the module doc."""

    stack: ClassVar[Stack]
    user: ClassVar[str]  # owner of the non-anonymous sessions
    stats: ClassVar[Counter[str]]

    def __init__(self) -> None:
        super().__init__()
        # Hypothesis calls rules synchronously: each example gets an event loop
        # of its own, which outlives the steps (connections stay open between them).
        self.runner = asyncio.Runner()
        self.http = httpx.AsyncClient(base_url=self.stack.http_url, timeout=WAIT_S)
        self.checker = WireChecker()
        self.sessions: list[Session] = []
        self.conns: list[Conn] = []
        self.numbers = itertools.count(1)
        self.broken = False
        self.waiting = ""  # what the current step waits for, for a timeout's message

    # Running steps ---------------------------------------------------------

    def run(self, step: Coroutine[Any, Any, T]) -> T:
        """Run one step's I/O on this example's loop, bounded by WAIT_S."""

        async def bounded() -> T:
            async with asyncio.timeout(WAIT_S):
                return await step

        self.waiting = "the step"
        try:
            return self.runner.run(bounded())
        except TimeoutError:
            self.broken = True
            raise AssertionError(f"nothing for {WAIT_S} s while waiting for {self.waiting}") from None
        except BaseException:
            self.broken = True  # teardown must not pile more errors on this one
            raise

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.run(self.finish())
        finally:
            try:
                self.runner.run(asyncio.wait_for(self.close_all(), WAIT_S))
                self.runner.run(self.http.aclose())
            finally:
                self.runner.close()

    @property
    def open_conns(self) -> list[Conn]:
        return [conn for conn in self.conns if conn.open]

    def pick(self, data: st.DataObject) -> Conn:
        return data.draw(st.sampled_from(self.open_conns), label="connection")

    def count(self, what: str) -> None:
        self.stats[what] += 1
        event(what)

    # I/O -------------------------------------------------------------------

    async def issue_token(self, user: str) -> str:
        """A fresh dev-mode token for ``user`` (``POST /api/token``)."""
        response = await self.http.post("/api/token", json={"user": user})
        response.raise_for_status()
        token: str = response.json()["token"]
        return token

    async def connect(self, session: Session, last_seq: int) -> Conn:
        url = self.stack.ws_url(session=session.id, last_seq=last_seq, token=session.token)
        # No flow control: a connection left unread for some steps would stop reading
        # its socket, and then wait out close_timeout (10 s) for the close handshake.
        ws = await connect(url, subprotocols=["chat.v1"], max_queue=None)  # type: ignore[list-item]
        conn = Conn(ws, self.checker.ws(session.id, last_seq), session)
        self.conns.append(conn)
        ready = await self.receive(conn)
        session.id = ready["session"]
        assert ready["paused"] is session.paused, (
            f"{conn}: ready.paused {ready['paused']}, the session's is {session.paused}"
        )
        return conn

    async def receive(self, conn: Conn) -> dict[str, Any]:
        return conn.wire.feed(await conn.ws.recv())

    async def settle(self, conns: list[Conn]) -> None:
        """Send a marker ping on each connection, then read each until its
        marker's pong and every answer it expects have arrived."""
        for conn in conns:
            conn.marker = f"marker-{next(self.numbers)}-{uuid.uuid4().hex}"  # longer than any fuzzed ping t
            await conn.ws.send(json.dumps({"type": "ping", "t": conn.marker}))
        for conn in conns:
            marker_seen = False
            while not marker_seen or conn.expected:
                self.waiting = (
                    f"{conn}: marker pong {'seen' if marker_seen else 'not seen'}; {[e.what for e in conn.expected]}"
                )
                frame = await self.receive(conn)
                if frame["type"] in ("chunk", "done"):
                    continue  # the wire checker has them
                if frame["type"] == "pong" and frame.get("t") == conn.marker and not marker_seen:
                    missing = [e.what for e in conn.expected if e.direct and not e.optional]
                    assert not missing, f"{conn}: no {missing} before the pong of a later ping"
                    conn.expected = [e for e in conn.expected if not e.direct]
                    marker_seen = True
                    continue
                expect = next((e for e in conn.expected if e.matches(frame)), None)
                assert expect is not None, f"{conn}: unexpected {frame!r}; expected {[e.what for e in conn.expected]}"
                conn.expected.remove(expect)
                if marker_seen:
                    self.count(f"{frame['type']} after a later pong")

    async def send(self, conn: Conn, *payloads: str | bytes, settle: list[Conn] | None = None) -> None:
        for payload in payloads:
            await conn.ws.send(payload)
        await self.settle(settle or [conn])

    async def send_until_closed(self, conn: Conn, payload: str | bytes, code: int, error: str | None = None) -> None:
        """Send a frame the gateway must answer by closing with ``code``
        (maybe after an ``error`` with code ``error``)."""
        conn.open = False
        await conn.ws.send(payload)
        self.waiting = f"{conn}: close {code}"
        try:
            while True:
                frame = await self.receive(conn)
                if frame["type"] not in ("chunk", "done"):
                    assert error is not None and is_error(error)(frame), (
                        f"{conn}: unexpected {frame!r} before close {code}"
                    )
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, f"{conn}: the connection ended without a close frame (wanted {code})"
            assert closed.rcvd.code == code, f"{conn}: closed with {closed.rcvd.code}, wanted {code}"

    async def close(self, conn: Conn, *, drop: bool = False) -> None:
        conn.open = False
        if drop:
            conn.ws.transport.abort()
        await conn.ws.close()

    async def close_all(self) -> None:
        for conn in self.conns:
            await self.close(conn)

    async def finish(self) -> None:
        """End of the example: every connection closed, then each session read
        to its end from a new connection and checked against its history."""
        await self.close_all()
        for session in self.sessions:
            await self.drain(session)

    async def drain(self, session: Session) -> None:
        assert session.id is not None
        record = self.checker.record(session.id)
        # Resume from what the clients have: every seq gets delivered at least once.
        conn = await self.connect(session, max(record.frames, default=0))
        if session.paused:
            conn.expected.append(Expect("resumed", is_type("resumed"), direct=False))
            session.paused = False
            await self.send(conn, json.dumps({"type": "resume"}))
        while not record.accepted <= set(record.done_seq):
            self.waiting = f"{conn}: the done of turns {sorted(record.accepted - set(record.done_seq))}"
            frame = await self.receive(conn)
            assert frame["type"] in ("chunk", "done"), f"{conn}: unexpected {frame!r}"
        headers = {"Authorization": f"Bearer {session.token}"} if session.token else {}
        response = await self.http.get(f"/api/sessions/{session.id}/history", headers=headers)
        response.raise_for_status()
        self.checker.assert_history(session.id, response.json())  # every accepted turn ended, once
        assert record.accepted == set(range(1, session.turns + 1))
        for turn, seq in sorted(record.done_seq.items()):
            reason = record.frames[seq]["reason"]
            # The demo model always runs to its length; only an accepted stop cuts it.
            allowed = ("stopped", "length") if turn in session.stopped else ("length",)
            assert reason in allowed, f"{session!r} turn {turn} ended {reason!r}; allowed {allowed}"
            self.count("turns ended")
            event(f"turn ended: {reason}")
        await self.close(conn)

    # Rules: connections ----------------------------------------------------

    @initialize(prompt=prompts)
    def first_connection(self, prompt: str) -> None:
        """Every example starts with a user's session and a turn in it (rules
        may be left out of an example, and turns are what most rules act on)."""
        session = Session(new_session(), self.run(self.issue_token(self.user)))
        self.sessions.append(session)
        self.send_chat(self.run(self.connect(session, 0)), prompt, None)

    @rule(data=st.data())
    def open_connection(self, data: st.DataObject) -> None:
        """A new session (named by the client or the server, anonymous or a
        user's), or an existing one from 0 or from what one of its clients has.
        At MAX_OPEN, the oldest connection is closed first."""
        if len(self.open_conns) >= MAX_OPEN:
            self.run(self.close(self.open_conns[0]))
        # Mostly existing sessions: controls act on every connection of a session.
        kinds = ["existing"] * 2 + (["new", "server-named"] if len(self.sessions) < MAX_SESSIONS else [])
        kind = data.draw(st.sampled_from(kinds), label="session")
        if kind == "existing":
            session = data.draw(st.sampled_from(self.sessions), label="existing session")
            # What the session's clients have: how many frames they read varies from run
            # to run, so the draw must not depend on it (Hypothesis replays draws).
            cursors = [0] + [conn.wire.cursor or 0 for conn in self.conns if conn.session is session]
            last_seq = cursors[data.draw(st.integers(0, 2 * MAX_OPEN), label="client") % len(cursors)]
        else:
            anonymous = data.draw(st.booleans(), label="anonymous")
            token = None if anonymous else self.run(self.issue_token(self.user))
            session = Session(new_session() if kind == "new" else None, token)
            self.sessions.append(session)
            last_seq = 0
        self.run(self.connect(session, last_seq))

    @rule(data=st.data(), drop=st.booleans())
    def close_connection(self, data: st.DataObject, drop: bool) -> None:
        """Close cleanly, or drop the TCP connection without a close frame."""
        conn = self.pick(data)
        self.run(self.close(conn, drop=drop))
        self.keep_one_open(conn)

    @rule(data=st.data(), drop=st.booleans())
    def reconnect(self, data: st.DataObject, drop: bool) -> None:
        """What a client does when its connection ends: a new one from its cursor."""
        conn = self.pick(data)
        self.run(self.close(conn, drop=drop))
        self.reconnect_from(conn)

    def reconnect_from(self, conn: Conn) -> None:
        self.run(self.connect(conn.session, conn.wire.cursor or 0))
        self.count("reconnects")

    def keep_one_open(self, closed: Conn) -> None:
        """Every rule but open_connection acts on an open connection: when the
        last one closes, its client reconnects (else an example in which
        Hypothesis left open_connection out would have no step to take)."""
        if not self.open_conns:
            self.reconnect_from(closed)

    # Rules: valid frames -----------------------------------------------------

    @rule(data=st.data(), prompt=prompts, with_id=st.booleans(), id_text=texts, then_stop=st.booleans())
    def chat(self, data: st.DataObject, prompt: str, with_id: bool, id_text: str, then_stop: bool) -> None:
        """A chat, with or without an id; maybe a stop right behind it."""
        # Unique ids: a resent chat (same id and prompt) is another test's subject.
        chat_id = f"c{next(self.numbers)}-{id_text}"[:128] if with_id else None
        self.send_chat(self.pick(data), prompt, chat_id, then_stop=then_stop)

    def send_chat(self, conn: Conn, prompt: str, chat_id: str | None, *, then_stop: bool = False) -> None:
        """``accepted`` with the next turn, or ``busy`` while the last turn may still generate.
        A stop sent right behind finds that turn generating, unless it has just ended."""
        session = conn.session
        record = self.checker.record(conn.wire.session or "")
        last_ended = session.turns == 0 or session.turns in record.done_seq

        def answered(frame: dict[str, Any]) -> bool:
            if frame["type"] == "accepted" and frame.get("id") == chat_id:
                assert frame["turn"] == session.turns + 1, (
                    f"{conn}: accepted turn {frame['turn']} after {session.turns}"
                )
                session.turns += 1
                early = [f for f in conn.wire.frames if f["type"] in ("chunk", "done") and f["turn"] == session.turns]
                assert not early, f"{conn}: accepted came after {len(early)} frames of its turn"
                self.count("chats accepted")
                return True
            if is_error("busy", chat_id)(frame):
                # Its done is stored before it is delivered: a turn seen to end frees the session.
                assert not last_ended, f"{conn}: busy, but turn {session.turns} was seen to end"
                self.count("chats busy")
                return True
            return False

        conn.expected.append(Expect(f"accepted or busy for chat {chat_id}", answered))
        frames = [json.dumps({"type": "chat", "prompt": prompt} | ({"id": chat_id} if chat_id else {}))]
        if not then_stop:
            self.run(self.send(conn, *frames))
            return
        refused = self.expect_stop_answer(conn, must_refuse=False)
        self.run(self.send(conn, *frames, json.dumps({"type": "stop"})))
        self.stop_answered(session, refused)

    def expect_stop_answer(self, conn: Conn, *, must_refuse: bool) -> list[dict[str, Any]]:
        """Expect ``error invalid`` (nothing generating), required or not; return
        the list that will hold it if it comes."""
        refused: list[dict[str, Any]] = []

        def refusal(frame: dict[str, Any]) -> bool:
            if is_error("invalid")(frame):
                refused.append(frame)
                return True
            return False

        conn.expected.append(Expect("error invalid (nothing generating)", refusal, optional=not must_refuse))
        return refused

    def stop_answered(self, session: Session, refused: list[dict[str, Any]]) -> None:
        """A stop not refused was accepted: the session's last turn must end ``stopped``
        (or ``length``, when the stop crossed its end)."""
        self.count("stops sent")
        if not refused:
            session.stopped.add(session.turns)
            self.count("stops accepted")

    @rule(data=st.data(), too_long=st.booleans(), with_id=st.booleans())
    def refused_chat(self, data: st.DataObject, too_long: bool, with_id: bool) -> None:
        """A blank prompt gets ``invalid``, one over the limit ``too_big``, with the chat's id."""
        conn = self.pick(data)
        chat_id = f"r{next(self.numbers)}" if with_id else None
        prompt = (
            "x" * data.draw(st.integers(MAX_PROMPT_CHARS + 1, 2 * MAX_PROMPT_CHARS))
            if too_long
            else data.draw(st.text(alphabet=" \t\n\r\u3000\u2028", max_size=5))
        )
        code = "too_big" if too_long else "invalid"
        conn.expected.append(Expect(f"error {code}", is_error(code, chat_id)))
        self.run(self.send(conn, json.dumps({"type": "chat", "prompt": prompt, "id": chat_id})))
        self.count("chats refused")

    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        """``paused`` on this connection, and on the session's others unless already paused."""
        conn = self.pick(data)
        session = conn.session
        others = [other for other in self.open_conns if other.session is session and other is not conn]
        conn.expected.append(Expect("paused", is_type("paused"), direct=False))
        for other in others if not session.paused else []:
            other.expected.append(Expect("paused (by another connection)", is_type("paused"), direct=False))
        session.paused = True
        self.run(self.send(conn, json.dumps({"type": "pause"}), settle=[conn, *others]))
        self.count("pauses")

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        """``resumed`` on every connection of a paused session; ``invalid`` if it is not paused."""
        conn = self.pick(data)
        session = conn.session
        connections = [conn] + [other for other in self.open_conns if other.session is session and other is not conn]
        if session.paused:
            for each in connections:
                each.expected.append(Expect("resumed", is_type("resumed"), direct=False))
        else:
            conn.expected.append(Expect("error invalid (not paused)", is_error("invalid")))
        session.paused = False
        self.run(self.send(conn, json.dumps({"type": "resume"}), settle=connections))
        self.count("resumes")

    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        """``invalid`` when no turn generates (surely so once its done was seen);
        otherwise no answer, and the turn ends as :meth:`stop_answered` says."""
        conn = self.pick(data)
        session = conn.session
        seen_ended = session.turns == 0 or session.turns in self.checker.record(conn.wire.session or "").done_seq
        refused = self.expect_stop_answer(conn, must_refuse=seen_ended)
        self.run(self.send(conn, json.dumps({"type": "stop"})))
        self.stop_answered(session, refused)

    @rule(data=st.data(), share=st.floats(0, 1))
    def ack(self, data: st.DataObject, share: float) -> None:
        """An ack of a seq the client has (``share`` of its cursor: the cursor itself
        varies from run to run, so the draw must not depend on it): no answer."""
        conn = self.pick(data)
        seq = round(share * (conn.wire.cursor or 0))
        self.run(self.send(conn, json.dumps({"type": "ack", "seq": seq})))
        self.count("acks")

    @rule(data=st.data(), t=st.just(MISSING) | json_values)
    def ping(self, data: st.DataObject, t: Any) -> None:
        """``pong`` echoing ``t``, type and all; no ``t`` when the ping had none."""
        conn = self.pick(data)
        frame: dict[str, Any] = {"type": "ping"} if t is MISSING else {"type": "ping", "t": t}
        if t is MISSING:  # no t, none echoed
            expect = Expect("pong", lambda f: f == {"type": "pong"})
        else:  # t echoed exactly, a null included
            expect = Expect(f"pong {t!r}", lambda f: f["type"] == "pong" and "t" in f and canonical(f["t"]) == canonical(t))
        conn.expected.append(expect)
        self.run(self.send(conn, json.dumps(frame)))
        self.count("pings")

    @rule(data=st.data())
    def auth(self, data: st.DataObject) -> None:
        """A fresh token of the same user: ``auth_ok`` with its expiry; ``unauthorized`` on an anonymous connection."""
        conn = self.pick(data)
        token = self.run(self.issue_token(self.user))
        if conn.session.token is None:
            conn.expected.append(Expect("error unauthorized", is_error("unauthorized")))
        else:
            now = time.time()
            conn.expected.append(
                Expect("auth_ok", lambda f: f["type"] == "auth_ok" and isinstance(f["exp"], int) and f["exp"] > now)
            )
        self.run(self.send(conn, json.dumps({"type": "auth", "token": token})))
        self.count("auth_ok" if conn.session.token else "auth anonymous")

    # Rules: frames the gateway refuses -----------------------------------------

    @rule(data=st.data(), frame=invalid_frames)
    def invalid_frame(self, data: st.DataObject, frame: tuple[str, str | bytes]) -> None:
        """``error invalid`` with a message; the connection stays open (the marker's pong comes)."""
        conn = self.pick(data)
        problem, payload = frame
        conn.expected.append(Expect(f"error invalid ({problem})", is_error("invalid")))
        self.run(self.send(conn, payload))
        self.count("invalid frames")
        event(f"invalid: {problem}")

    @rule(data=st.data(), other_user=st.booleans(), garbage=texts)
    def bad_auth(self, data: st.DataObject, other_user: bool, garbage: str) -> None:
        """Another user's token closes with 4003, a token that is not valid with 4001
        (an ``error`` may come first); on an anonymous connection, ``unauthorized``."""
        conn = self.pick(data)
        token = self.run(self.issue_token("other-" + self.user)) if other_user else "not-a-token." + garbage
        payload = json.dumps({"type": "auth", "token": token})
        if conn.session.token is None:
            conn.expected.append(Expect("error unauthorized", is_error("unauthorized")))
            self.run(self.send(conn, payload))
        elif other_user:
            self.run(self.send_until_closed(conn, payload, 4003, "forbidden"))
            self.count("closed 4003")
        else:
            self.run(self.send_until_closed(conn, payload, 4001, "unauthorized"))
            self.count("closed 4001")
        self.keep_one_open(conn)

    @rule(data=st.data())
    def oversize_frame(self, data: st.DataObject) -> None:
        """A frame over ``max_frame_bytes`` closes the connection with 1009."""
        conn = self.pick(data)
        size = data.draw(st.integers(MAX_FRAME_BYTES + 1, 2 * MAX_FRAME_BYTES), label="bytes")
        payload = json.dumps({"type": "chat", "prompt": "x" * size})
        self.run(self.send_until_closed(conn, payload, 1009))
        self.count("closed 1009")
        self.keep_one_open(conn)


# The test --------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the gateway holds: open connections, asyncio tasks, resident memory."""

    connections: float
    tasks: float
    rss_kib: int


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def _rss_kib(stack: Stack) -> int:
    """The gateway process's resident memory (it exposes no figure of its own)."""
    process = stack.gateways[0].process
    assert process is not None
    with open(f"/proc/{process.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def gateway_load(stack: Stack, http: httpx.AsyncClient) -> Load:
    metrics = (await http.get("/metrics")).text
    return Load(
        _metric(metrics, "chat_gateway_open_connections"), _metric(metrics, "chat_gateway_tasks"), _rss_kib(stack)
    )


async def settled_load(stack: Stack, http: httpx.AsyncClient, *, connections: int, tasks: float | None = None) -> Load:
    """The gateway's load once it holds ``connections`` and (if given) at most ``tasks``.

    Another process's state offers no event to wait on: this polls, bounded by WAIT_S,
    and returns the last reading either way (the caller asserts on it)."""
    deadline = time.monotonic() + WAIT_S
    load = await gateway_load(stack, http)
    while (
        load.connections != connections or (tasks is not None and load.tasks > tasks)
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        load = await gateway_load(stack, http)
    return load


async def measure(stack: Stack, user_token: str, connections: int) -> tuple[Load, Load]:
    """The idle load, after one turn warmed the gateway up, and with ``connections`` idle open."""
    checker = WireChecker()
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        session = new_session()
        async with connect(stack.ws_url(session=session, token=user_token), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            wire = checker.ws(session)
            wire.feed(await ws.recv())
            await ws.send(json.dumps({"type": "chat", "prompt": "warm up"}))
            while not (frame := wire.feed(await asyncio.wait_for(ws.recv(), WAIT_S)))["type"] == "done":
                pass
        idle = await settled_load(stack, http, connections=0)
        sockets = []
        for _ in range(connections):
            ws = await connect(stack.ws_url(session=new_session(), token=user_token), subprotocols=["chat.v1"])  # type: ignore[list-item]
            sockets.append(ws)
            checker.ws(None).feed(await ws.recv())
        busy = await settled_load(stack, http, connections=connections)
        for ws in sockets:
            await ws.close()
        back = await settled_load(stack, http, connections=0, tasks=idle.tasks)
        assert back.tasks == idle.tasks, f"{connections} idle connections closed left {back.tasks - idle.tasks} tasks"
    checker.assert_clean()
    assert frame["reason"] == "length"
    return idle, busy


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, FUZZ_ENV) as stack:
        yield stack


def test_protocol_fuzz(fuzz_stack: Stack) -> None:
    """Random sequences of valid and invalid client frames over reconnecting
    clients: every frame answered as documented, the wire contract kept,
    every turn ended and stored as delivered, and nothing left behind."""
    user = "fuzz-" + uuid.uuid4().hex[:12]
    token = httpx.post(f"{fuzz_stack.http_url}/api/token", json={"user": user}).json()["token"]
    sample = 8
    idle, busy = asyncio.run(measure(fuzz_stack, token, sample))
    per_connection_tasks = (busy.tasks - idle.tasks) / sample
    per_connection_kib = (busy.rss_kib - idle.rss_kib) / sample
    assert per_connection_tasks >= 1, (
        f"an open connection shows no task ({idle} -> {busy}): the metric measures nothing"
    )

    stats: Counter[str] = Counter()
    machine = type("FuzzMachine", (ProtocolMachine,), {"stack": fuzz_stack, "user": user, "stats": stats})
    run_state_machine_as_test(machine, settings=FUZZ_SETTINGS)

    below = {what: (stats[what], floor) for what, floor in FLOORS.items() if stats[what] < floor}
    assert not below, f"the fuzz exercised too little (got, floor): {below}; all: {dict(stats)}"

    async def final_load() -> Load:
        async with httpx.AsyncClient(base_url=fuzz_stack.http_url) as http:
            return await settled_load(fuzz_stack, http, connections=0, tasks=idle.tasks + TASK_SLACK)

    after = asyncio.run(final_load())
    assert after.connections == 0, f"{after.connections} connections still open"
    assert after.tasks <= idle.tasks + TASK_SLACK, (
        f"{after.tasks - idle.tasks} tasks more than idle ({idle.tasks}); one connection holds {per_connection_tasks}"
    )
    assert after.rss_kib <= idle.rss_kib + RSS_BUDGET_KIB, (
        f"memory grew {after.rss_kib - idle.rss_kib} KiB (budget {RSS_BUDGET_KIB}); "
        f"one idle connection holds ~{per_connection_kib:.0f} KiB"
    )
