"""The session record's Lua scripts against a real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from devstack.servers import Server
from shared.protocol import Chunk, Done, encode
from shared.settings import RetentionSettings
from shared.store import Lease, Segment, SegmentEnd, SessionStore, Stored
from shared.subjects import history_key, lease_index_key, log_key, retired_key, session_key, user_turns_key
from tests.stack import new_session


@asynccontextmanager
async def session_store(redis_url: str, retention: RetentionSettings) -> AsyncIterator[SessionStore]:
    """A SessionStore on its own client, closed afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield SessionStore(client, retention)
    finally:
        await client.aclose()


@pytest.fixture
async def store(redis_server: Server) -> AsyncIterator[SessionStore]:
    async with session_store(redis_server.url, RetentionSettings(retention_s=600, max_frames_per_session=5, max_history_turns=2)) as opened:
        yield opened


def chunk(seq: int, turn: int = 1, text: str | None = None) -> tuple[int, bytes]:
    return seq, encode(Chunk(seq=seq, turn=turn, text=f"w{seq}" if text is None else text))


def end(seq: int, turn: int = 1, *, force: bool = False) -> SegmentEnd:
    return SegmentEnd(turn=turn, seq=seq, frame=encode(Done(seq=seq, turn=turn, reason="stop")), reason="stop", force=force)


def ends(results: list[Stored]) -> list[str]:
    """What became of each segment's end."""
    return [result.end for result in results]


async def due(store: SessionStore, now: float) -> set[str]:
    """The sessions with a lease index entry due at ``now``."""
    return {lease.session for lease in await store.expired_leases(now)}


async def lease_of(store: SessionStore, session: str, now: float) -> Lease:
    """The session's lease index entry, due at ``now``."""
    [lease] = [lease for lease in await store.expired_leases(now) if lease.session == session]
    return lease


async def index_score(store: SessionStore, lease: Lease) -> float | None:
    return await store.redis.zscore(lease_index_key(lease.session), f"{lease.session}:{lease.lease_id}")


async def test_one_turn_at_a_time_and_contiguous_seq(store: SessionStore) -> None:
    """A second start is busy; the next turn's base seq is the last turn's done seq."""
    session = new_session()
    first = await store.start_turn(session, "p1")
    assert (first.started, first.turn, first.base_seq) == (True, 1, 0)
    busy = await store.start_turn(session, "p2")
    assert (busy.started, busy.turn) == (False, 1)
    assert ends(await store.store_segments([Segment(session, [chunk(1)], end=end(2))])) == ["stored"]
    second = await store.start_turn(session, "p2")
    assert (second.started, second.turn, second.base_seq) == (True, 2, 2)


async def test_claim_is_granted_once(store: SessionStore) -> None:
    """Only the first claim of an active turn wins, even by the same worker (a second
    delivery of its request); only a re-run of that very call is answered as claimed
    (test_store_retries.py)."""
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
    segment = Segment(session, [chunk(1)], end=end(2))
    assert ends(await store.store_segments([segment])) == ["stored"]
    assert ends(await store.store_segments([segment])) == ["stored"]
    frames, first, hwm = await store.read_frames(session, after=0, limit=10)
    assert frames == [chunk(1), (2, end(2).frame)] and first == 1 and hwm == 2
    assert [t.turn for t in await store.history(session)] == [1]


async def test_history_is_built_from_the_stored_chunks(store: SessionStore) -> None:
    """The turn's end carries no text: its history entry is the prompt and its stored chunks, in seq order."""
    session = new_session()
    await store.start_turn(session, "what is \"json\"?")
    frames = [chunk(1, text="a \"q\" / "), chunk(2, text="\U0001f600\n"), chunk(3, text="é\u0000")]
    await store.store_segments([Segment(session, [frames[2], frames[0]])])
    assert ends(await store.store_segments([Segment(session, [frames[1]], end=end(4))])) == ["stored"]
    [turn] = await store.history(session)
    assert (turn.turn, turn.prompt, turn.answer, turn.reason, turn.last_seq) == (
        1, 'what is "json"?', 'a "q" / \U0001f600\né\u0000', "stop", 4,
    )


async def test_turn_end_waits_for_chunks_stored_elsewhere(store: SessionStore) -> None:
    """A done whose turn still misses chunks (another buffer holds them) is not stored, and the session
    stays busy, until they are; forced, it is stored with what is there."""
    session = new_session()
    await store.start_turn(session, "p")
    assert ends(await store.store_segments([Segment(session, [chunk(3)], end=end(4))])) == ["waiting"]
    frames, _, hwm = await store.read_frames(session, after=0, limit=10)
    assert frames == [chunk(3)] and hwm == 3  # the chunk is stored, the done is not
    assert (await store.meta(session)).active_turn == 1 and await store.history(session) == []
    await store.store_segments([Segment(session, [chunk(1), chunk(2)])])
    assert ends(await store.store_segments([Segment(session, [], end=end(4))])) == ["stored"]
    assert (await store.history(session))[0].answer == "w1w2w3"
    assert (await store.meta(session)).active_turn is None

    other = new_session()
    await store.start_turn(other, "p")
    assert ends(await store.store_segments([Segment(other, [chunk(2)], end=end(3, force=True))])) == ["stored"]
    assert (await store.history(other))[0].answer == "w2"
    assert (await store.start_turn(other, "next")).started


async def test_storing_survives_a_script_flush(store: SessionStore) -> None:
    """Frames are stored by EVALSHA in one pipeline; after Redis forgets its
    scripts (a restart, SCRIPT FLUSH) the batch is stored once all the same."""
    sessions = [new_session(), new_session()]
    for session in sessions:
        await store.start_turn(session, "p")
    await store.redis.script_flush()
    await store.store_segments([Segment(s, [chunk(1), chunk(2)]) for s in sessions])
    for session in sessions:
        frames, _, hwm = await store.read_frames(session, after=0, limit=10)
        assert frames == [chunk(1), chunk(2)] and hwm == 2


async def test_out_of_order_storage_reads_in_order(store: SessionStore) -> None:
    """Frames stored out of order (two buffers) read back by seq; a missing lower seq is not reported lost."""
    session = new_session()
    await store.start_turn(session, "p")
    await store.store_segments([Segment(session, [chunk(3)])])
    frames, first, hwm = await store.read_frames(session, after=0, limit=10)
    assert frames == [chunk(3)] and first == 1 and hwm == 3  # 1 and 2 are on their way
    await store.store_segments([Segment(session, [chunk(1), chunk(2)])])
    frames, _, hwm = await store.read_frames(session, after=1, limit=10)
    assert frames == [chunk(2), chunk(3)] and hwm == 3


async def test_caps_and_ttl(store: SessionStore) -> None:
    """The log keeps the newest frames up to the cap; history keeps the last turns; keys expire."""
    session = new_session()
    await store.start_turn(session, "p")
    await store.store_segments([Segment(session, [chunk(seq) for seq in range(1, 9)])])
    frames, first, hwm = await store.read_frames(session, after=0, limit=100)
    assert [seq for seq, _ in frames] == [4, 5, 6, 7, 8] and first == 4 and hwm == 8
    assert ends(await store.store_segments([Segment(session, [], end=end(9))])) == ["stored"]
    for turn in (2, 3):
        await store.start_turn(session, "p")
        assert ends(await store.store_segments([Segment(session, [], end=end(8 + turn, turn))])) == ["stored"]
    assert [t.turn for t in await store.history(session)] == [2, 3]
    for key in (session_key(session), log_key(session), history_key(session)):
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


async def test_resent_chat_id_gets_its_turn_back_while_it_generates(store: SessionStore) -> None:
    """A chat resent with the generating turn's id and prompt returns that turn; once the turn has
    ended, the same id and prompt start a new turn (never an accepted that produces nothing)."""
    session = new_session()
    first = await store.start_turn(session, "p", client_id="c1")
    assert first.started and first.turn == 1
    again = await store.start_turn(session, "p", client_id="c1")
    assert (again.started, again.duplicate, again.turn, again.base_seq) == (False, True, 1, 0)
    assert not (await store.start_turn(session, "other", client_id="c1")).started  # busy
    await store.store_segments([Segment(session, [chunk(1)], end=end(2))])
    reused = await store.start_turn(session, "p", client_id="c1")
    assert (reused.started, reused.duplicate, reused.turn, reused.base_seq) == (True, False, 2, 2)
    resent = await store.start_turn(session, "p", client_id="c1")
    assert (resent.duplicate, resent.turn, resent.base_seq) == (True, 2, 2)
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
    assert session in await due(store, now + 6)
    await store.claim_turn(session, 1, "w1", lease_until=now + 60)
    assert session not in await due(store, now + 6)
    assert (await store.renew_lease(session, 1, "w1", lease_until=now + 120)).ours
    assert not (await store.renew_lease(session, 1, "w2", lease_until=now + 120)).ours  # not its turn
    await store.store_segments([Segment(session, [], end=end(1))])
    assert session not in await due(store, now + 10_000)
    assert not (await store.renew_lease(session, 1, "w1", lease_until=now + 120)).ours  # ended: stop


async def test_renewal_reports_a_stop(store: SessionStore) -> None:
    """A stop asked for after the claim reaches the worker at its next renewal, even without the broadcast."""
    session = new_session()
    await store.start_turn(session, "p")
    await store.claim_turn(session, 1, "w", lease_until=time.time() + 60)
    assert not (await store.renew_lease(session, 1, "w", lease_until=time.time() + 60)).stop_requested
    await store.request_stop(session)
    renewal = await store.renew_lease(session, 1, "w", lease_until=time.time() + 60)
    assert renewal.ours and renewal.stop_requested


async def test_an_expired_lease_is_taken_once_and_kept_until_the_done(store: SessionStore) -> None:
    """Of several reapers exactly one takes an expired lease; it stays, due again at the retry time,
    so a reaper that fails is followed by another; storing the done removes it."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now - 100, claim_within_s=1)
    lease = await lease_of(store, session, now)
    taken = [await store.take_expired_lease(lease, now=now, retry_at=now + 5) for _ in range(3)]
    assert taken == [True, False, False]
    assert await index_score(store, lease) == pytest.approx(now + 5)
    meta = await store.meta(session)
    assert (meta.worker, meta.lapsed_worker) == ("-", "")  # taken unclaimed: ...
    assert (await store.claim_turn(session, 1, "late", lease_until=now + 60)).status == "taken"  # ... no late claim
    assert session not in await due(store, now + 4)
    retry = await lease_of(store, session, now + 6)
    assert await store.take_expired_lease(retry, now=now + 6, retry_at=now + 11)  # the retry
    await store.store_segments([Segment(session, [], end=end(1))])
    assert await index_score(store, lease) is None


async def test_a_lease_without_a_turn_is_dropped(store: SessionStore) -> None:
    """An index entry naming no generating turn (the record is gone, the turn ended, or its start never
    ran) is removed, not retried forever, and its lease id can no longer start a turn."""
    session = new_session()
    await store.redis.zadd(lease_index_key(session), {f"{session}:gone": 1})
    lease = await lease_of(store, session, time.time())
    assert not await store.take_expired_lease(lease, now=time.time(), retry_at=time.time() + 5)
    assert await index_score(store, lease) is None
    assert await store.redis.sismember(retired_key(session), "gone")


async def test_an_early_index_entry_follows_the_record(store: SessionStore) -> None:
    """Renewals move only the record's deadline; a reaper that finds the index entry early takes
    nothing and moves the entry to the record's deadline."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now)
    await store.claim_turn(session, 1, "w", lease_until=now + 60)
    assert (await store.renew_lease(session, 1, "w", lease_until=now + 120)).ours
    lease = await lease_of(store, session, now + 61)
    assert not await store.take_expired_lease(lease, now=now + 61, retry_at=now + 66)
    assert await index_score(store, lease) == pytest.approx(now + 120)
    assert (await store.renew_lease(session, 1, "w", lease_until=now + 180)).ours  # still its turn


async def test_a_start_whose_lease_id_was_retired_takes_another(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reaper or prune that dropped a lease id while its start was on its way has retired it: the
    start does not use it (its turn would have no index entry) but starts with a new id."""
    session = new_session()
    ids = iter(["retired", "fresh"])
    monkeypatch.setattr("shared.store.secrets.token_hex", lambda _: next(ids))
    await store.redis.sadd(retired_key(session), "retired")
    started = await store.start_turn(session, "p", user="u1", max_turns_per_user=2, now=time.time())
    assert started.started
    members = await store.redis.zrange(lease_index_key(session), 0, -1)
    assert f"{session}:retired".encode() not in members and f"{session}:fresh".encode() in members
    assert await store.redis.zrange(user_turns_key("u1"), 0, -1) == [f"{session}:fresh".encode()]


async def test_the_per_user_limit_holds_and_stale_slots_are_dropped(store: SessionStore) -> None:
    """A user at the limit is refused (a resend of a generating chat still gets its turn back); a turn's
    done frees its slot; slots left by a lost release name no generating turn and are dropped."""
    user, now = "u" + new_session(), time.time()
    first, second = new_session(), new_session()
    assert (await store.start_turn(first, "p", client_id="c1", user=user, max_turns_per_user=1, now=now)).started
    refused = await store.start_turn(second, "p", user=user, max_turns_per_user=1, now=now)
    assert refused.too_many and refused.turn == 1 and not (await store.meta(second)).active_turn
    resent = await store.start_turn(first, "p", client_id="c1", user=user, max_turns_per_user=1, now=now)
    assert resent.duplicate and resent.turn == 1
    assert (await store.start_turn(first, "q", user=user, max_turns_per_user=1, now=now)).turn == 1  # busy
    assert await store.redis.zcard(user_turns_key(user)) == 1
    await store.store_segments([Segment(first, [], end=end(1))])
    assert await store.redis.zcard(user_turns_key(user)) == 0
    # a gateway died between reserving a slot and starting; an old-layout entry
    await store.redis.zadd(user_turns_key(user), {f"{second}:lost": now, second: now})
    assert (await store.start_turn(second, "p", user=user, max_turns_per_user=2, now=now)).started
    assert await store.redis.zcard(user_turns_key(user)) == 1
    assert await store.redis.sismember(retired_key(second), "lost")


async def test_stop_before_any_claim_expires_the_lease(store: SessionStore) -> None:
    """Stopping a turn no worker has claimed makes its lease due now, so a reaper ends it at once;
    a claimed turn's lease is left to its worker."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now, claim_within_s=600)
    assert session not in await due(store, now)
    assert await store.request_stop(session) == 1
    assert session in await due(store, now)
    claimed = new_session()
    await store.start_turn(claimed, "p", now=now, claim_within_s=600)
    await store.claim_turn(claimed, 1, "w", lease_until=now + 60)
    await store.request_stop(claimed)
    assert claimed not in await due(store, now)


async def test_abandoned_turn_is_due_now_with_its_reason(store: SessionStore) -> None:
    """A worker that gives up its turn makes the lease due now and leaves the reason for the reaper."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now)
    await store.claim_turn(session, 1, "w", lease_until=now + 60)
    await store.abandon_turn(session, 1, "other", reason="not yours")
    assert session not in await due(store, now)
    await store.abandon_turn(session, 1, "w", reason="broker down")
    assert session in await due(store, now)
    assert (await store.meta(session)).failure == "broker down"


async def test_transcript_resume_point_excludes_the_generating_turn(store: SessionStore) -> None:
    """The transcript's base seq is the last finished turn's done, not the chunks of the turn generating."""
    session = new_session()
    await store.start_turn(session, "p")
    await store.store_segments([Segment(session, [chunk(1)], end=end(2))])
    await store.start_turn(session, "q")
    await store.store_segments([Segment(session, [chunk(3, turn=2), chunk(4, turn=2)])])
    turns, meta = await store.transcript(session)
    assert [t.last_seq for t in turns] == [2] and meta.base_seq == 2 and meta.hwm == 4


async def test_a_taken_lease_is_not_revived_by_its_worker(store: SessionStore) -> None:
    """A worker whose lease a reaper took (it was away longer than the lease) is told the turn is no
    longer its at its next renewal, so it publishes nothing after the reaper's done."""
    session = new_session()
    now = time.time()
    await store.start_turn(session, "p", now=now)
    await store.claim_turn(session, 1, "w", lease_until=now - 1)  # the lease ran out while Redis was away
    assert await store.take_expired_lease(await lease_of(store, session, now), now=now, retry_at=now + 5)
    assert (await store.meta(session)).lapsed_worker == "w"
    assert not (await store.renew_lease(session, 1, "w", lease_until=now + 60)).ours
