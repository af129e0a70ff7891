"""Every script and transaction the session store sends touches one Redis Cluster hash slot.

A Redis Cluster refuses a script or MULTI/EXEC whose keys span slots
(CROSSSLOT). The store is driven through a whole life of turns on a real
Redis with a client whose connections record every command they send; each
EVAL/EVALSHA, and each MULTI..EXEC block, must name keys of a single slot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from devstack.servers import Server
from shared.protocol import Chunk, Done, encode
from shared.settings import RetentionSettings
from shared.store import Segment, SegmentEnd, SessionStore, Stored
from shared.subjects import lease_index_key, user_turns_key
from tests.stack import new_session

Command = tuple[int, tuple[Any, ...]]  # (connection id, arguments)


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview):
        return value.tobytes()
    return str(value).encode()


class RecordingConnection(aioredis.Connection):
    """A connection that writes down every command it packs (single commands and pipelines alike)."""

    sent: list[Command] = []

    def pack_command(self, *args: Any) -> list[bytes]:
        type(self).sent.append((id(self), tuple(_bytes(arg) for arg in args)))
        return super().pack_command(*args)


@pytest.fixture
async def recorded(redis_server: Server) -> AsyncIterator[tuple[SessionStore, list[Command], aioredis.Redis]]:
    sent: list[Command] = []
    connection_class = type("Recording", (RecordingConnection,), {"sent": sent})
    pool = aioredis.ConnectionPool.from_url(redis_server.url, connection_class=connection_class)
    client = aioredis.Redis.from_pool(pool)
    plain = aioredis.Redis.from_url(redis_server.url)
    try:
        store = SessionStore(client, RetentionSettings(retention_s=600, max_frames_per_session=50, max_history_turns=5))
        yield store, sent, plain
    finally:
        await client.aclose()
        await plain.aclose()


def chunk(seq: int, turn: int) -> tuple[int, bytes]:
    return seq, encode(Chunk(seq=seq, turn=turn, text=f"w{seq}"))


def end(seq: int, turn: int, user: str | None = None, *, force: bool = False) -> SegmentEnd:
    frame = encode(Done(seq=seq, turn=turn, reason="stop"))
    return SegmentEnd(turn=turn, seq=seq, frame=frame, reason="stop", user=user, force=force)


def ends(results: list[Stored]) -> list[str]:
    """What became of each segment's end."""
    return [result.end for result in results]


async def reap(store: SessionStore, now: float) -> list[str]:
    """What a buffer's reaper does once: take every due lease; return the sessions it took."""
    leases = await store.expired_leases(now)
    return [lease.session for lease in await store.take_expired_leases(leases, now=now, retry_at=now + 5)]


async def full_flow(store: SessionStore, plain: aioredis.Redis) -> None:
    """Every store operation the services use, with users and a per-user limit."""
    now = time.time()
    user, limit = "u" + new_session(), 2

    # start, resend, busy, owner, claim, renew, store frames and the done
    s1 = new_session()
    assert await store.check_owner(s1, user)
    first = await store.start_turn(s1, "p", client_id="c1", user=user, max_turns_per_user=limit, now=now)
    assert first.started
    assert (await store.start_turn(s1, "p", client_id="c1", user=user, max_turns_per_user=limit, now=now)).duplicate
    busy = await store.start_turn(s1, "q", client_id="c2", user=user, max_turns_per_user=limit, now=now)
    assert not busy.started and not busy.duplicate
    assert (await store.claim_turn(s1, 1, "w1", lease_until=now + 60)).status == "claimed"
    assert (await store.renew_lease(s1, 1, "w1", lease_until=now + 90)).ours
    assert ends(await store.store_segments([Segment(s1, [chunk(1, 1), chunk(2, 1)])])) == ["none"]
    assert ends(await store.store_segments([Segment(s1, [], end=end(3, 1, user))])) == ["stored"]

    # pause and resume, history, transcript and a replay read
    assert (await store.set_paused(s1, True))[0]
    assert (await store.set_paused(s1, False))[0]
    assert [t.answer for t in await store.history(s1)] == ["w1w2"]
    turns, meta = await store.transcript(s1)
    assert len(turns) == 1 and meta.base_seq == 3
    frames, _, hwm = await store.read_frames(s1, after=0, limit=10)
    assert len(frames) == 3 and hwm == 3

    # a worker gives its turn up; a reaper takes the lease and its done is stored
    s2 = new_session()
    assert (await store.start_turn(s2, "p", user=user, max_turns_per_user=limit, now=now)).started
    assert (await store.claim_turn(s2, 1, "w2", lease_until=now + 60)).status == "claimed"
    await store.abandon_turn(s2, 1, "w2", reason="gave up")
    assert s2 in await reap(store, time.time())
    assert ends(await store.store_segments([Segment(s2, [], end=end(1, 1, user))])) == ["stored"]

    # a worker dies: its lease runs out and a reaper takes it
    s3 = new_session()
    assert (await store.start_turn(s3, "p", user=user, max_turns_per_user=limit, now=now)).started
    assert (await store.claim_turn(s3, 1, "w3", lease_until=now - 1)).status == "claimed"
    assert s3 in await reap(store, time.time())
    assert not (await store.renew_lease(s3, 1, "w3", lease_until=now + 60)).ours
    assert ends(await store.store_segments([Segment(s3, [], end=end(1, 1, user))])) == ["stored"]

    # no worker claims in time
    s4 = new_session()
    assert (await store.start_turn(s4, "p", now=now - 100, claim_within_s=1)).started
    assert s4 in await reap(store, time.time())
    assert ends(await store.store_segments([Segment(s4, [], end=end(1, 1))])) == ["stored"]

    # a turn never queued is aborted; a queued one stopped; a claimed one stopped
    s5 = new_session()
    assert (await store.start_turn(s5, "p", client_id="c1", user=user, max_turns_per_user=limit, now=now)).started
    await store.abort_turn(s5, 1)
    assert (await store.start_turn(s5, "p", client_id="c1", user=user, max_turns_per_user=limit, now=now)).started
    assert await store.request_stop(s5) == 2
    assert s5 in await reap(store, time.time())
    assert ends(await store.store_segments([Segment(s5, [], end=end(1, 2, user))])) == ["stored"]
    s6 = new_session()
    assert (await store.start_turn(s6, "p", user=user, max_turns_per_user=limit, now=now)).started
    assert (await store.claim_turn(s6, 1, "w6", lease_until=now + 60)).status == "claimed"
    assert await store.request_stop(s6) == 1
    assert (await store.renew_lease(s6, 1, "w6", lease_until=now + 60)).stop_requested

    # the per-user limit: s6 and s7 generate, s8 is refused until one ends; a resend still gets its turn
    s7, s8 = new_session(), new_session()
    assert (await store.start_turn(s7, "p", client_id="c7", user=user, max_turns_per_user=limit, now=now)).started
    assert (await store.start_turn(s8, "p", user=user, max_turns_per_user=limit, now=now)).too_many
    assert (await store.start_turn(s7, "p", client_id="c7", user=user, max_turns_per_user=limit, now=now)).duplicate
    assert ends(await store.store_segments([Segment(s6, [], end=end(1, 1, user))])) == ["stored"]
    assert (await store.start_turn(s8, "p", user=user, max_turns_per_user=limit, now=now)).started

    # entries a crash left behind (written by another client, so not recorded) are dropped
    s9 = new_session()
    await plain.zadd(user_turns_key(user), {f"{s9}:lost": now})
    assert (await store.start_turn(s9, "p", user=user, max_turns_per_user=limit + 1, now=now)).started
    await plain.zadd(lease_index_key(s9), {f"{s9}:lost": 1})
    assert s9 not in await reap(store, time.time())
    assert await plain.zscore(lease_index_key(s9), f"{s9}:lost") is None


def transactions(sent: list[Command]) -> list[list[tuple[Any, ...]]]:
    """The recorded calls that Redis runs atomically: each script call alone, each MULTI..EXEC block."""
    blocks: list[list[tuple[Any, ...]]] = []
    open_blocks: dict[int, list[tuple[Any, ...]]] = {}
    for connection, args in sent:
        name = args[0].upper()
        if name == b"MULTI":
            open_blocks[connection] = []
        elif name in (b"EXEC", b"DISCARD"):
            blocks.append(open_blocks.pop(connection))
        elif connection in open_blocks:
            open_blocks[connection].append(args)
        elif name in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL"):
            blocks.append([args])
    assert not open_blocks, "a MULTI without its EXEC"
    return blocks


async def keys_of(plain: aioredis.Redis, args: tuple[Any, ...]) -> list[bytes]:
    """The keys a command names, as Redis itself reads them (COMMAND GETKEYS)."""
    if args[0].upper() in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL"):
        return list(args[3 : 3 + int(args[2])])
    try:
        return [_bytes(key) for key in await plain.command_getkeys(*args)]
    except ResponseError:  # a command that names no key (MULTI, SCRIPT LOAD, ...)
        return []


async def test_every_script_and_transaction_touches_one_slot(
    recorded: tuple[SessionStore, list[Command], aioredis.Redis],
) -> None:
    store, sent, plain = recorded
    await full_flow(store, plain)
    blocks = transactions(sent)
    scripts = [block for block in blocks if block[0][0].upper().startswith(b"EVAL")]
    assert len(scripts) >= 30 and any(len(block) > 1 for block in blocks)  # the flow was recorded
    crossing = []
    for block in blocks:
        keys = [key for args in block for key in await keys_of(plain, args)]
        if len({key_slot(key) for key in keys}) > 1:
            crossing.append(sorted({key.decode() for key in keys}))
    assert not crossing, f"{len(crossing)} of {len(blocks)} atomic calls span slots: {crossing}"
    every_key = {key for _, args in sent for key in await keys_of(plain, args)}
    assert b"chat:leases" not in every_key  # nothing uses the old global lease set
