"""The session record's Lua scripts against a real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from devstack.servers import Server
from shared.settings import RetentionSettings
from shared.store import HistoryTurn, Segment, SessionStore
from shared.subjects import log_key, session_key
from tests.stack import new_session


@pytest.fixture
async def store(redis_server: Server) -> AsyncIterator[SessionStore]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield SessionStore(client, RetentionSettings(retention_s=600, max_frames_per_session=5, max_history_turns=2))
    finally:
        await client.aclose()


def entry(turn: int, last_seq: int) -> bytes:
    return msgspec.json.encode(HistoryTurn(turn=turn, prompt="p", answer=f"a{turn}", reason="stop", last_seq=last_seq))


async def test_one_turn_at_a_time_and_contiguous_seq(store: SessionStore) -> None:
    """A second start is busy; the next turn's base seq is the last turn's done seq."""
    session = new_session()
    first = await store.start_turn(session, "p1")
    assert (first.started, first.turn, first.base_seq) == (True, 1, 0)
    busy = await store.start_turn(session, "p2")
    assert (busy.started, busy.turn) == (False, 1)
    await store.store_segments([Segment(session, [(1, b"c1"), (2, b"d2")], turn_end=(1, 2, entry(1, 2)))])
    second = await store.start_turn(session, "p2")
    assert (second.started, second.turn, second.base_seq) == (True, 2, 2)


async def test_claim_is_granted_once(store: SessionStore) -> None:
    """Only the first claim of an active turn wins, even by the same worker."""
    session = new_session()
    await store.start_turn(session, "p")
    assert (await store.claim_turn(session, 1, "w1", lease_until=time.time() + 60)).status == "claimed"
    assert (await store.claim_turn(session, 1, "w1", lease_until=time.time() + 60)).status == "taken"
    assert (await store.claim_turn(session, 1, "w2", lease_until=time.time() + 60)).status == "taken"
    assert (await store.claim_turn(session, 2, "w2", lease_until=time.time() + 60)).status == "inactive"


async def test_stop_before_claim_is_seen_by_the_worker(store: SessionStore) -> None:
    """A stop sent while the turn is queued reaches the worker through its claim."""
    session = new_session()
    await store.start_turn(session, "p")
    assert await store.request_stop(session) == 1
    claim = await store.claim_turn(session, 1, "w", lease_until=time.time() + 60)
    assert claim.status == "claimed" and claim.stop_requested


async def test_redelivered_batch_changes_nothing(store: SessionStore) -> None:
    """Storing the same frames and turn end twice keeps one copy and one history entry."""
    session = new_session()
    await store.start_turn(session, "p")
    segment = Segment(session, [(1, b"c1"), (2, b"d2")], turn_end=(1, 2, entry(1, 2)))
    await store.store_segments([segment])
    await store.store_segments([segment])
    frames, first, hwm = await store.read_frames(session, after=0, limit=10)
    assert frames == [(1, b"c1"), (2, b"d2")] and first == 1 and hwm == 2
    assert [t.turn for t in await store.history(session)] == [1]


async def test_storing_survives_a_script_flush(store: SessionStore) -> None:
    """Frames are stored by EVALSHA in one pipeline; after Redis forgets its
    scripts (a restart, SCRIPT FLUSH) the batch is stored once all the same."""
    sessions = [new_session(), new_session()]
    await store.redis.script_flush()
    await store.store_segments([Segment(s, [(1, b"c1"), (2, b"c2")]) for s in sessions])
    for session in sessions:
        frames, _, hwm = await store.read_frames(session, after=0, limit=10)
        assert frames == [(1, b"c1"), (2, b"c2")] and hwm == 2


async def test_out_of_order_storage_reads_in_order(store: SessionStore) -> None:
    """Frames stored out of order (two buffers) read back by seq; a missing lower seq is not reported lost."""
    session = new_session()
    await store.store_segments([Segment(session, [(3, b"c3")])])
    frames, first, hwm = await store.read_frames(session, after=0, limit=10)
    assert frames == [(3, b"c3")] and first == 1 and hwm == 3  # 1 and 2 are on their way
    await store.store_segments([Segment(session, [(1, b"c1"), (2, b"c2")])])
    frames, _, hwm = await store.read_frames(session, after=1, limit=10)
    assert frames == [(2, b"c2"), (3, b"c3")] and hwm == 3


async def test_caps_and_ttl(store: SessionStore) -> None:
    """The log keeps the newest frames up to the cap; history keeps the last turns; keys expire."""
    session = new_session()
    await store.store_segments([Segment(session, [(seq, f"c{seq}".encode()) for seq in range(1, 9)])])
    frames, first, hwm = await store.read_frames(session, after=0, limit=100)
    assert [seq for seq, _ in frames] == [4, 5, 6, 7, 8] and first == 4 and hwm == 8
    for turn in (1, 2, 3):
        await store.store_segments([Segment(session, [(8 + turn, b"d")], turn_end=(turn, 8 + turn, entry(turn, 8 + turn)))])
    assert [t.turn for t in await store.history(session)] == [2, 3]
    for key in (session_key(session), log_key(session)):
        assert 0 < await store.redis.ttl(key) <= 600


async def test_pause_flag_versions(store: SessionStore) -> None:
    """Each change of the pause flag gets a new version; a no-op change does not."""
    session = new_session()
    assert await store.set_paused(session, True) == (True, 1)
    assert await store.set_paused(session, True) == (False, 1)
    assert await store.set_paused(session, False) == (True, 2)
    assert await store.set_paused(session, False) == (False, 2)
    meta = await store.meta(session)
    assert (meta.paused, meta.pause_version) == (False, 2)


async def test_abort_releases_only_its_turn(store: SessionStore) -> None:
    """Aborting a turn that was never queued frees the session; a stale abort does nothing."""
    session = new_session()
    await store.start_turn(session, "p")
    await store.abort_turn(session, 7)
    assert (await store.meta(session)).active_turn == 1
    await store.abort_turn(session, 1)
    assert (await store.meta(session)).active_turn is None
    assert (await store.start_turn(session, "q")).turn == 2


async def test_resent_chat_id_gets_its_turn_back(store: SessionStore) -> None:
    """A chat resent with the last accepted id returns that turn, even after it ended."""
    session = new_session()
    first = await store.start_turn(session, "p", client_id="c1")
    assert first.started and first.turn == 1
    again = await store.start_turn(session, "p", client_id="c1")
    assert (again.started, again.duplicate, again.turn) == (False, True, 1)
    await store.store_segments([Segment(session, [(1, b"d1")], turn_end=(1, 1, entry(1, 1)))])
    assert (await store.start_turn(session, "p", client_id="c1")).duplicate
    reused = await store.start_turn(session, "a different prompt", client_id="c1")
    assert reused.started and reused.turn == 2  # same id, new prompt: a new chat
    await store.store_segments([Segment(session, [(2, b"d2")], turn_end=(2, 2, entry(2, 2)))])
    other = await store.start_turn(session, "q", client_id="c2")
    assert other.started and other.turn == 3
    assert not (await store.start_turn(session, "r")).duplicate  # no id: busy, never a duplicate


async def test_aborted_turn_forgets_its_chat_id(store: SessionStore) -> None:
    """A resend of a chat whose turn was aborted starts a new turn instead of pointing at the dead one."""
    session = new_session()
    assert (await store.start_turn(session, "p", client_id="c1")).turn == 1
    await store.abort_turn(session, 1)
    again = await store.start_turn(session, "p", client_id="c1")
    assert (again.started, again.duplicate, again.turn) == (True, False, 2)


async def test_leases_follow_the_turn(store: SessionStore) -> None:
    """A queued turn has a claim deadline, a claim replaces it with the worker's lease, the turn's end removes it."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now, claim_within_s=5)
    assert session in await store.expired_leases(now + 6)
    await store.claim_turn(session, 1, "w1", lease_until=now + 60)
    assert session not in await store.expired_leases(now + 6)
    assert await store.renew_lease(session, 1, "w1", lease_until=now + 120)
    assert not await store.renew_lease(session, 1, "w2", lease_until=now + 120)  # not its turn
    await store.store_segments([Segment(session, [(1, b"d1")], turn_end=(1, 1, entry(1, 1)))])
    assert session not in await store.expired_leases(now + 10_000)
    assert not await store.renew_lease(session, 1, "w1", lease_until=now + 120)  # ended: stop


async def test_an_expired_lease_is_taken_once(store: SessionStore) -> None:
    """Of several reapers, exactly one takes an expired lease."""
    session = new_session()
    await store.start_turn(session, "p", now=time.time() - 100, claim_within_s=1)
    assert [await store.take_expired_lease(session) for _ in range(3)] == [True, False, False]
