"""The session store under a lost reply, and the turn a reaper may end, against a real Redis.

redis-py (``connect_redis``: ``retry_on_timeout``) sends a command again when
its reply is lost (a reset, a failover, a socket timeout), so every script
may run twice for one call. Each bug here was reproduced first:

- a start whose reply was lost dropped its own turn's index entry and user
  slot (the re-run answered busy/duplicate): the turn was never published
  nor reaped, and the session busy for the whole retention;
- a claim whose reply was lost told the claiming worker ``taken``;
- a reaper that took turn 1's lease ended turn 2 (it read the active turn);
- a late second ``done`` of an ended turn was stored inside the next turn;
- claims and renewals did not refresh the record's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from nats.js.errors import NotFoundError

from devstack.servers import Server
from services.buffer.service import Buffer
from services.buffer.settings import Settings as BufferSettings
from shared.messages import TurnEnd, decode_generated
from shared.protocol import Chunk, Done, encode
from shared.settings import RetentionSettings
from shared.store import _CLAIM_TURN, _START_TURN, Lease, Segment, SegmentEnd, SessionStore
from shared.subjects import generated_subject, history_key, lease_index_key, log_key, session_key, user_turns_key
from tests.integration.test_store import chunk, end, ends, lease_of, session_store
from tests.stack import new_session


@pytest.fixture
async def store(redis_server: Server) -> AsyncIterator[SessionStore]:
    async with session_store(redis_server.url, RetentionSettings(retention_s=600, max_frames_per_session=100, max_history_turns=20)) as opened:
        yield opened


def rerun(script: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A script whose first reply is lost: it runs, then redis-py sends it again; the caller sees the second reply."""
    async def twice(*args: Any, **kwargs: Any) -> Any:
        await script(*args, **kwargs)
        return await script(*args, **kwargs)
    return twice


async def index_members(store: SessionStore, session: str) -> list[bytes]:
    """The session's entries in its lease index shard (which holds other sessions too)."""
    return [m for m in await store.redis.zrange(lease_index_key(session), 0, -1) if m.startswith(f"{session}:".encode())]


def error_end(seq: int, turn: int, message: str) -> SegmentEnd:
    frame = encode(Done(seq=seq, turn=turn, reason="error", message=message))
    return SegmentEnd(turn=turn, seq=seq, frame=frame, reason="error")


async def log_dones(store: SessionStore, session: str) -> list[tuple[int, int]]:
    """(seq, turn) of every done in the session's log."""
    stored, _, _ = await store.read_frames(session, after=0, limit=10_000)
    frames = [json.loads(data) for _, data in stored]
    return [(frame["seq"], frame["turn"]) for frame in frames if frame["type"] == "done"]


# ---------------------------------------------------------------- B1: a start's reply lost

class ReplyDropper:
    """TCP proxy to Redis that, once armed, forwards a request containing ``needle`` and then
    aborts the client's connection instead of forwarding the reply (the command ran, its
    reply was lost: redis-py reconnects and sends it again)."""

    def __init__(self, port: int, needle: bytes) -> None:
        self.port, self.needle, self.armed, self.fired = port, needle, True, 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _link(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += (cw, uw)
        drop = asyncio.Event()

        async def up() -> None:
            try:
                while data := await cr.read(65536):
                    if self.armed and self.needle in data:
                        self.armed = False
                        drop.set()
                    uw.write(data)
                    await uw.drain()
            finally:
                uw.close()  # the client left: so does the link to Redis

        async def down() -> None:
            try:
                while data := await ur.read(65536):
                    if drop.is_set():
                        self.fired += 1
                        cw.transport.abort()
                        return
                    cw.write(data)
                    await cw.drain()
            finally:
                cw.close()
                uw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self.server.wait_closed()


@pytest.fixture
async def dropping(redis_server: Server) -> AsyncIterator[Callable[[str], Awaitable[tuple[SessionStore, ReplyDropper]]]]:
    """A store whose client goes through a proxy that loses the first reply to a given script."""
    made: list[tuple[aioredis.Redis, ReplyDropper]] = []

    async def make(script: str) -> tuple[SessionStore, ReplyDropper]:
        sha = await direct.script_load(script)
        proxy = ReplyDropper(urlsplit(redis_server.url).port or 6379, sha.encode() if isinstance(sha, str) else sha)
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{await proxy.start()}/0", retry_on_timeout=True)
        made.append((client, proxy))
        return SessionStore(client, RetentionSettings(retention_s=600, max_frames_per_session=100, max_history_turns=5)), proxy

    direct = aioredis.Redis.from_url(redis_server.url)
    try:
        yield make
    finally:
        for client, proxy in made:
            await client.aclose()
            await proxy.close()
        await direct.aclose()


async def test_a_start_whose_reply_was_lost_keeps_its_turn(
    dropping: Callable[[str], Awaitable[tuple[SessionStore, ReplyDropper]]],
) -> None:
    """The start ran, its reply was lost and redis-py ran it again: the caller is told its
    turn started (so it publishes it), and the turn keeps its index entry and user slot."""
    store, proxy = await dropping(_START_TURN)
    session, user, now = new_session(), "u" + new_session(), 1000.0
    result = await store.start_turn(session, "hello", client_id="c1", user=user, max_turns_per_user=4, now=now)
    assert proxy.fired == 1  # the reply was really lost
    assert (result.started, result.turn, result.base_seq) == (True, 1, 0)
    [member] = await index_members(store, session)
    assert await store.redis.zrange(user_turns_key(user), 0, -1) == [member]
    assert (await store.meta(session)).active_turn == 1
    assert [lease.session for lease in await store.expired_leases(now + 10_000) if lease.session == session]


@pytest.mark.parametrize("client_id", [None, "c1"])
async def test_a_start_run_twice_is_started_once(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, client_id: str | None,
) -> None:
    """The same, with the script simply run twice: started (not busy, not duplicate), one
    turn, its entries kept; the turn then ends as usual and the next one starts."""
    session, user = new_session(), "u" + new_session()
    monkeypatch.setattr(store, "_start", rerun(store._start))
    monkeypatch.setattr(store, "_reserve", rerun(store._reserve))  # the user's slot, likewise
    result = await store.start_turn(session, "p", client_id=client_id, user=user, max_turns_per_user=1)
    assert (result.started, result.turn, result.duplicate) == (True, 1, False)
    assert len(await index_members(store, session)) == 1
    assert await store.redis.zcard(user_turns_key(user)) == 1
    monkeypatch.undo()
    assert ends(await store.store_segments([Segment(session, [chunk(1)], end=end(2))])) == ["stored"]
    assert await index_members(store, session) == [] and await store.redis.zcard(user_turns_key(user)) == 0
    assert (await store.start_turn(session, "q", user=user, max_turns_per_user=1)).started


async def test_a_refused_start_never_drops_a_generating_turns_entries(store: SessionStore) -> None:
    """A start refused busy gives back only its own entries, and only once its lease id is
    retired: the generating turn's entry and slot stay."""
    session, user = new_session(), "u" + new_session()
    assert (await store.start_turn(session, "p", user=user, max_turns_per_user=4)).started
    [member] = await index_members(store, session)
    busy = await store.start_turn(session, "q", user=user, max_turns_per_user=4)
    assert not busy.started and busy.turn == 1
    assert await index_members(store, session) == [member]
    assert await store.redis.zrange(user_turns_key(user), 0, -1) == [member]


# ---------------------------------------------------------------- B2: a claim's reply lost

async def test_a_claim_whose_reply_was_lost_is_still_claimed(
    dropping: Callable[[str], Awaitable[tuple[SessionStore, ReplyDropper]]],
) -> None:
    """The claim ran for w1, its reply was lost, redis-py ran it again: w1 is told
    ``claimed`` (it generates the turn), not ``taken``."""
    store, proxy = await dropping(_CLAIM_TURN)
    session = new_session()
    proxy.armed = False
    assert (await store.start_turn(session, "hello")).started
    await store.request_stop(session)
    proxy.armed = True
    claim = await store.claim_turn(session, 1, "w1", lease_until=2e9)
    assert proxy.fired == 1
    assert (claim.status, claim.stop_requested) == ("claimed", True)
    assert (await store.meta(session)).worker == "w1"


async def test_a_claim_run_twice_is_claimed_but_a_second_delivery_is_not(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A re-run of the same claim call answers ``claimed``; the same worker claiming the
    turn again (its request delivered twice) and any other worker get ``taken``."""
    session = new_session()
    await store.start_turn(session, "p")
    monkeypatch.setattr(store, "_claim", rerun(store._claim))
    assert (await store.claim_turn(session, 1, "w1", lease_until=2e9)).status == "claimed"
    monkeypatch.undo()
    assert (await store.claim_turn(session, 1, "w1", lease_until=2e9)).status == "taken"
    assert (await store.claim_turn(session, 1, "w2", lease_until=2e9)).status == "taken"
    assert (await store.renew_lease(session, 1, "w1", lease_until=2e9)).ours


# ---------------------------------------------------------------- B3: the reaper ends only the turn it took

class FakeJS:
    """JetStream as the reaper sees it: the stream's newest message (none by
    default); publishes and their message ids captured."""

    def __init__(self, newest: bytes | None = None) -> None:
        self.newest = newest
        self.published: list[Done] = []
        self.msg_ids: list[str] = []

    async def get_last_msg(self, *_: Any) -> Any:
        if self.newest is None:
            raise NotFoundError()
        return SimpleNamespace(data=self.newest)

    async def publish(self, subject: str, data: bytes, *, headers: dict[str, str], **_: Any) -> None:
        end = decode_generated(data)
        assert isinstance(end, TurnEnd)
        self.published.append(end.done)
        self.msg_ids.append(headers["Nats-Msg-Id"])


def reaper(store: SessionStore, newest: bytes | None = None) -> tuple[Buffer, FakeJS]:
    js = FakeJS(newest)
    return Buffer(BufferSettings(), nc=None, js=js, store=store), js  # type: ignore[arg-type]


async def test_the_reaper_does_not_end_the_next_turn(store: SessionStore) -> None:
    """The reaper takes turn 1's lease (its worker was late); turn 1's own done is then
    stored, turn 2 starts and is claimed, all before the reaper ends "its" turn: it
    publishes nothing, and turn 2 ends with its worker's done alone."""
    session, now = new_session(), 1000.0
    await store.start_turn(session, "p1", now=now - 100, claim_within_s=1)
    await store.claim_turn(session, 1, "w1", lease_until=now - 1)
    [taken] = await store.take_expired_leases([await lease_of(store, session, now)], now=now, retry_at=now + 5)
    assert taken.turn == 1
    assert ends(await store.store_segments([Segment(session, [chunk(1)], end=end(2))])) == ["stored"]
    assert (await store.start_turn(session, "p2", now=now)).turn == 2
    assert (await store.claim_turn(session, 2, "w2", lease_until=now + 10)).status == "claimed"
    buffer, js = reaper(store)
    await buffer.end_abandoned_turn(taken)
    assert js.published == []
    assert (await store.renew_lease(session, 2, "w2", lease_until=now + 20)).ours
    assert ends(await store.store_segments([Segment(session, [chunk(3, turn=2)], end=end(4, turn=2))])) == ["stored"]
    assert await log_dones(store, session) == [(2, 1), (4, 2)]


async def test_the_reaper_ends_the_turn_it_took(store: SessionStore) -> None:
    """The control: while the taken turn still generates under that lease, the reaper ends it."""
    session, now = new_session(), 1000.0
    await store.start_turn(session, "p1", now=now - 100, claim_within_s=1)
    await store.claim_turn(session, 1, "w1", lease_until=now - 1)
    await store.store_segments([Segment(session, [chunk(1)])])
    [taken] = await store.take_expired_leases([await lease_of(store, session, now)], now=now, retry_at=now + 5)
    buffer, js = reaper(store)
    await buffer.end_abandoned_turn(taken)
    assert [(d.seq, d.turn, d.reason) for d in js.published] == [(2, 1, "error")]
    await buffer.end_abandoned_turn(Lease(session, taken.lease_id, now))  # a lease it did not take
    assert len(js.published) == 1


async def test_the_reaper_numbers_its_done_after_its_own_turns_frames_only(store: SessionStore) -> None:
    """The stream's newest frame belongs to a later turn (the taken turn ended and the next began
    between the reaper's reads): the reaper's done follows the taken turn's own frames, and its
    message id names the turn, so it can never be taken for the next turn's frame at that seq."""
    session, now = new_session(), 1000.0
    await store.start_turn(session, "p1", now=now - 100, claim_within_s=1)
    await store.claim_turn(session, 1, "w1", lease_until=now - 1)
    await store.store_segments([Segment(session, [chunk(1)])])
    [taken] = await store.take_expired_leases([await lease_of(store, session, now)], now=now, retry_at=now + 5)
    next_turns_chunk = encode(Chunk(seq=5, turn=2, text="later"))
    buffer, js = reaper(store, newest=next_turns_chunk)
    await buffer.end_abandoned_turn(taken)
    assert [(d.seq, d.turn) for d in js.published] == [(2, 1)]
    assert js.msg_ids == [f"{session}:1:2"]


# ---------------------------------------------------------------- B4: frames of a turn not generating

async def test_a_late_done_of_an_ended_turn_is_refused(store: SessionStore) -> None:
    """A second done of turn 1 (seq 5) arriving while turn 2 generates at seqs 3-4 is
    refused: not stored, the resume point stays; turn 2 then ends as usual."""
    session = new_session()
    await store.start_turn(session, "p1")
    await store.store_segments([Segment(session, [chunk(1)], end=end(2))])
    assert (await store.start_turn(session, "p2")).base_seq == 2
    await store.store_segments([Segment(session, [chunk(3, turn=2), chunk(4, turn=2)])])
    assert ends(await store.store_segments([Segment(session, [], end=error_end(5, 1, "late"))])) == ["refused"]
    _, meta = await store.transcript(session)
    assert await log_dones(store, session) == [(2, 1)]
    assert (meta.base_seq, meta.active_turn, meta.hwm) == (2, 2, 4)
    assert ends(await store.store_segments([Segment(session, [], end=end(5, turn=2))])) == ["stored"]
    assert [(t.turn, t.answer) for t in await store.history(session)] == [(1, "w1"), (2, "w3w4")]


async def test_frames_of_a_turn_not_generating_are_refused(store: SessionStore) -> None:
    """A chunk after its turn's (forced) end, and a second done of the generating turn after
    its first, are refused; a redelivery of what was stored is not (it is published again)."""
    session = new_session()
    await store.start_turn(session, "p")
    [result] = await store.store_segments([Segment(session, [chunk(2)], end=end(3, force=True))])
    assert (result.end, result.refused) == ("stored", frozenset())
    [late] = await store.store_segments([Segment(session, [chunk(1)], end=error_end(4, 1, "again"))])
    assert (late.end, late.refused) == ("refused", frozenset({1}))
    [again] = await store.store_segments([Segment(session, [chunk(2)], end=end(3))])
    assert (again.end, again.refused) == ("stored", frozenset())
    frames, _, hwm = await store.read_frames(session, after=0, limit=10)
    assert [seq for seq, _ in frames] == [2, 3] and hwm == 3


class FakeMsg:
    """A JetStream message as the buffer's batch handler sees it."""

    def __init__(self, session: str, data: bytes) -> None:
        self.subject, self.data, self.headers = generated_subject(session), data, None
        self.metadata = type("Meta", (), {"num_delivered": 1})()
        self.acked = self.naked = False

    async def ack(self) -> None:
        self.acked = True

    async def nak(self, delay: float = 0) -> None:
        self.naked = True


class FakeNC:
    max_payload = 1024 * 1024  # nats-server's default, which the buffer splits deliveries under

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append(data)


async def test_the_buffer_publishes_no_refused_frame(store: SessionStore) -> None:
    """The buffer publishes what was stored (and a redelivery of it), never a refused
    frame, and acks the refused ones (they are never to be stored)."""
    session = new_session()
    await store.start_turn(session, "p")
    nc = FakeNC()
    buffer = Buffer(BufferSettings(), nc=nc, js=None, store=store)  # type: ignore[arg-type]
    done1 = encode(TurnEnd(done=Done(seq=2, turn=1, reason="stop")))
    first = [FakeMsg(session, chunk(1)[1]), FakeMsg(session, done1)]
    await buffer.handle_batch(first)  # type: ignore[arg-type]
    assert nc.published == [chunk(1)[1] + b"\n" + end(2).frame]  # one message per session per batch
    nc.published.clear()
    late = [FakeMsg(session, chunk(3)[1]), FakeMsg(session, encode(TurnEnd(done=Done(seq=4, turn=1, reason="error"))))]
    redelivered = [FakeMsg(session, chunk(1)[1]), FakeMsg(session, done1)]
    await buffer.handle_batch(late + redelivered)  # type: ignore[arg-type]
    assert nc.published == [chunk(1)[1] + b"\n" + end(2).frame]
    assert all(msg.acked for msg in late + redelivered)
    assert await log_dones(store, session) == [(2, 1)]


# ---------------------------------------------------------------- B5: every write refreshes the TTL

async def test_claims_renewals_and_reaps_refresh_the_records_ttl(store: SessionStore) -> None:
    """A turn generating longer than the retention keeps its record: each write to it
    (claim, renewal, stop, abandon, take) refreshes the session's keys' TTL. The record
    is made about to expire before each (what a long wait would do)."""
    session, now = new_session(), 1000.0
    await store.start_turn(session, "p", now=now)
    await store.store_segments([Segment(session, [chunk(1)])])
    keys = (session_key(session), log_key(session))

    async def refreshed(write: Awaitable[Any]) -> bool:
        for key in keys:
            await store.redis.expire(key, 5)
        await write
        return all([await store.redis.ttl(key) > 5 for key in keys])

    assert await refreshed(store.claim_turn(session, 1, "w", lease_until=now + 10))
    assert await refreshed(store.renew_lease(session, 1, "w", lease_until=now + 20))
    assert await refreshed(store.request_stop(session))
    assert await refreshed(store.abandon_turn(session, 1, "w", reason="gave up"))
    assert await refreshed(store.take_expired_leases([await lease_of(store, session, now + 30)], now=now + 30,
                                                     retry_at=now + 35))
    assert ends(await store.store_segments([Segment(session, [], end=end(2))])) == ["stored"]
    assert await store.redis.ttl(history_key(session)) > 5


# ---------------------------------------------------------------- the same kind elsewhere

async def test_a_pause_run_twice_still_reports_the_change(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller broadcasts a pause only if it changed the flag: a re-run of the call that
    changed it still says so (else the session's connections never hear of it); a second
    pause call does not."""
    session = new_session()
    monkeypatch.setattr(store, "_pause", rerun(store._pause))
    assert await store.set_paused(session, True) == (True, 1)
    assert await store.set_paused(session, False) == (True, 2)
    monkeypatch.undo()
    assert await store.set_paused(session, False) == (False, 2)


async def test_a_store_run_twice_stores_the_turn_once(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storing a turn's end whose reply was lost: the re-run says stored (the buffer
    publishes the done), with one history entry and one done in the log."""
    session = new_session()
    await store.start_turn(session, "p")
    monkeypatch.setattr(store, "_evalsha_all", rerun(store._evalsha_all))
    assert ends(await store.store_segments([Segment(session, [chunk(1)], end=end(2))])) == ["stored"]
    monkeypatch.undo()
    assert [t.turn for t in await store.history(session)] == [1] and await log_dones(store, session) == [(2, 1)]
    assert (await store.start_turn(session, "q")).started


async def test_a_claim_retried_with_its_id_is_claimed_again(store: SessionStore) -> None:
    """A worker whose claim reply was lost (the pool timed out under load) retries with the same
    claim id and gets the turn back; another id, even the same worker's, and another worker do not."""
    session = new_session()
    await store.start_turn(session, "p")
    assert (await store.claim_turn(session, 1, "w1", lease_until=2e9, claim_id="w1:1")).status == "claimed"
    assert (await store.claim_turn(session, 1, "w1", lease_until=2e9, claim_id="w1:1")).status == "claimed"
    assert (await store.claim_turn(session, 1, "w1", lease_until=2e9, claim_id="other")).status == "taken"
    assert (await store.claim_turn(session, 1, "w2", lease_until=2e9, claim_id="w1:1")).status == "taken"
