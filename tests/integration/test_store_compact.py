"""A finished turn's chunks are packed into one member of the log; replay is unchanged, byte for byte."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator

import pytest

from devstack.servers import Server
from shared.protocol import Chunk, Done, encode
from shared.settings import RetentionSettings
from shared.store import Segment, SegmentEnd, SessionStore
from shared.subjects import history_key, log_key, retired_key, session_key
from tests.integration.test_store import session_store
from tests.integration.test_store_retries import rerun
from tests.stack import new_session

# Realistic token texts: mostly short ASCII words, some accented, CJK, emoji,
# and the characters JSON escapes.
_WORDS = [" the", " model", " answer", " tokens", " streaming", "ing", " Redis", " is", " a", ",", ".", " café",
          " naïve", " 東京", " 😀", ' "quoted"', " back\\slash", "\n\n", " response", " über", " résumé",
          " because", " session", " delivered", " memory", " per", " client", " which", " of", " to"]


def tokens(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(n)]


def chunk(seq: int, turn: int, text: str) -> tuple[int, bytes]:
    return seq, encode(Chunk(seq=seq, turn=turn, text=text))


def done(seq: int, turn: int, *, force: bool = False) -> tuple[tuple[int, bytes], SegmentEnd]:
    frame = encode(Done(seq=seq, turn=turn, reason="stop"))
    return (seq, frame), SegmentEnd(turn=turn, seq=seq, frame=frame, reason="stop", force=force)


@pytest.fixture
async def store(redis_server: Server) -> AsyncIterator[SessionStore]:
    retention = RetentionSettings(retention_s=600, max_frames_per_session=10_000, max_history_turns=20)
    async with session_store(redis_server.url, retention) as opened:
        yield opened


async def replay_all(store: SessionStore, session: str) -> list[tuple[int, bytes]]:
    frames, _, _ = await store.read_frames(session, after=0, limit=100_000)
    return frames


async def assert_replays(store: SessionStore, session: str, expected: list[tuple[int, bytes]], first: int) -> None:
    """read_frames from every cursor (0, inside turns, at dones, past hwm) with limits that cut
    inside a packed turn answers what the stored frames say, byte for byte."""
    hwm = max(seq for seq, _ in expected)
    for after in range(0, hwm + 2):
        for limit in (1, 2, 3, 7, 100_000):
            got = await store.read_frames(session, after=after, limit=limit)
            assert got == ([f for f in expected if f[0] > after][:limit], first, hwm), (after, limit)


async def run_turn(store: SessionStore, session: str, texts: list[str], *, batch: int = 4) -> list[tuple[int, bytes]]:
    """Start a turn, store its chunks in batches and its done; return its frames as stored.
    Checks that replay is the same before and after the done packs the turn."""
    started = await store.start_turn(session, "p")
    base, turn = started.base_seq, started.turn
    frames = [chunk(base + 1 + i, turn, text) for i, text in enumerate(texts)]
    for i in range(0, len(frames), batch):
        assert (await store.store_segments([Segment(session, frames[i:i + batch])]))[0].refused == frozenset()
    before = await replay_all(store, session)
    end_frame, end = done(base + len(frames) + 1, turn)
    assert (await store.store_segments([Segment(session, [], end=end)]))[0].end == "stored"
    assert await replay_all(store, session) == [*before, end_frame]
    return [*frames, end_frame]


def answer(frames: list[tuple[int, bytes]], turn: int) -> str:
    """The text of the turn's chunks among ``frames``."""
    decoded = [json.loads(data) for _, data in frames]
    return "".join(f["text"] for f in decoded if f["type"] == "chunk" and f["turn"] == turn)


async def test_replay_of_packed_turns_is_unchanged_from_every_cursor(store: SessionStore) -> None:
    """Turns of several sizes (one empty) pack into one member each; replay from any cursor and
    limit answers the frames as stored, and history holds each answer."""
    session, rng = new_session(), random.Random(1)
    expected: list[tuple[int, bytes]] = []
    for n in (5, 1, 0, 9):
        expected += await run_turn(store, session, tokens(n, rng) + [""] if n else [])
    assert await store.redis.zcard(log_key(session)) == 7  # three packed members, four dones
    await assert_replays(store, session, expected, first=1)
    assert [t.answer for t in await store.history(session)] == [answer(expected, turn) for turn in (1, 2, 3, 4)]


async def test_a_forced_end_packs_the_chunks_around_its_gaps(store: SessionStore) -> None:
    """Chunks 3 and 5 never arrive: the forced done packs 1-2, 4 and 6 (three runs) and replay
    serves exactly those seqs; a gap seq arriving late is refused, not stored."""
    session, rng = new_session(), random.Random(2)
    await store.start_turn(session, "p")
    texts = tokens(6, rng)
    frames = [chunk(seq, 1, texts[seq - 1]) for seq in (1, 2, 4, 6)]
    end_frame, end = done(7, 1, force=True)
    assert (await store.store_segments([Segment(session, frames, end=end)]))[0].end == "stored"
    assert await store.redis.zcard(log_key(session)) == 2
    await assert_replays(store, session, [*frames, end_frame], first=1)
    late = chunk(3, 1, texts[2])
    assert (await store.store_segments([Segment(session, [late])]))[0].refused == {3}
    assert [seq for seq, _ in await replay_all(store, session)] == [1, 2, 4, 6, 7]
    assert (await store.history(session))[0].answer == texts[0] + texts[1] + texts[3] + texts[5]


async def test_a_store_rerun_after_packing_answers_as_the_first_run(store: SessionStore,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py resends a store whose reply was lost: the rerun finds the done stored and the
    turn's chunks stored packed as they are (to be published again); nothing is stored twice.
    A chunk at a packed seq with other text, or of another turn, is refused."""
    session, rng = new_session(), random.Random(3)
    await store.start_turn(session, "p")
    frames = [chunk(seq, 1, text) for seq, text in enumerate(tokens(5, rng), start=1)]
    end_frame, end = done(6, 1)
    monkeypatch.setattr(store, "_evalsha_all", rerun(store._evalsha_all))
    [result] = await store.store_segments([Segment(session, frames, end=end)])
    monkeypatch.undo()
    assert (result.end, result.refused) == ("stored", frozenset())
    [again] = await store.store_segments([Segment(session, frames[1:3], end=end)])
    assert (again.end, again.refused) == ("stored", frozenset())
    assert await store.redis.zcard(log_key(session)) == 2 and len(await store.history(session)) == 1
    await assert_replays(store, session, [*frames, end_frame], first=1)
    others = [chunk(2, 1, "not what was said"), chunk(3, 2, frames[2][1].decode())]
    assert (await store.store_segments([Segment(session, others)]))[0].refused == {2, 3}
    assert await replay_all(store, session) == [*frames, end_frame]


@pytest.mark.parametrize("cap", [1, 4, 10, 13, 100])
@pytest.mark.parametrize("turns_kept", [1, 2, 20])
async def test_the_cap_trims_packed_turns_seq_by_seq(redis_server: Server, cap: int, turns_kept: int) -> None:
    """The cap counts seqs, not members: past it the oldest seqs go, from inside a packed turn
    if need be, and replay reports exactly those as lost (first = highest trimmed + 1). A packed
    turn whose history entry is trimmed (it held its texts) still replays."""
    retention = RetentionSettings(retention_s=600, max_frames_per_session=cap, max_history_turns=turns_kept)
    async with session_store(redis_server.url, retention) as store:
        session, rng = new_session(), random.Random(cap)
        stored: list[tuple[int, bytes]] = []
        for n in (6, 3, 12, 0, 2):
            started = await store.start_turn(session, "p")
            base, turn = started.base_seq, started.turn
            frames = [chunk(base + 1 + i, turn, text) for i, text in enumerate(tokens(n, rng))]
            for i in range(0, n, 4):
                await store.store_segments([Segment(session, frames[i:i + 4])])
                stored += frames[i:i + 4]
                await assert_replays(store, session, stored[-cap:], first=stored[-cap:][0][0])
            end_frame, end = done(base + n + 1, turn, force=True)
            assert (await store.store_segments([Segment(session, [], end=end)]))[0].end == "stored"
            stored.append(end_frame)
            await assert_replays(store, session, stored[-cap:], first=stored[-cap:][0][0])
        assert int(await store.redis.hget(session_key(session), "frames") or 0) == min(cap, len(stored))
        assert [t.turn for t in await store.history(session)] == [1, 2, 3, 4, 5][-turns_kept:]


async def test_a_turn_with_a_chunk_of_another_form_stays_loose(store: SessionStore) -> None:
    """A chunk frame not exactly as protocol.encode writes it cannot be encoded again from its
    text: its turn is not packed, and replays as stored."""
    session = new_session()
    await store.start_turn(session, "p")
    odd = (2, b'{"type":"chunk","turn":1,"seq":2,"text":" odd"}')
    frames = [chunk(1, 1, " first"), odd, chunk(3, 1, " 東京\n")]
    end_frame, end = done(4, 1)
    assert (await store.store_segments([Segment(session, frames, end=end)]))[0].end == "stored"
    assert await store.redis.zcard(log_key(session)) == 4
    await assert_replays(store, session, [*frames, end_frame], first=1)
    assert (await store.history(session))[0].answer == " first odd 東京\n"
    assert (await store.store_segments([Segment(session, frames)]))[0].refused == frozenset()


async def test_five_turns_take_at_most_three_times_their_text(store: SessionStore) -> None:
    """5 turns of 300 tokens: the session's keys (MEMORY USAGE, every element counted)
    take at most 3x the answers' characters."""
    session, rng = new_session(), random.Random(5)
    text = 0
    for _ in range(5):
        texts = tokens(300, rng)
        text += len("".join(texts))
        await run_turn(store, session, texts, batch=8)
    keys = (session_key(session), log_key(session), history_key(session), retired_key(session))
    used = sum([await store.redis.memory_usage(key, samples=0) or 0 for key in keys])
    print(f"memory: {used} bytes for {text} characters of answer = {used / text:.2f}x")
    assert used <= 3 * text


async def ttls(store: SessionStore, session: str) -> list[int]:
    return [await store.redis.ttl(key(session)) for key in (session_key, log_key, history_key)]


async def test_ttls_never_shrink_under_a_live_turn_and_are_the_retention_once_it_ends(redis_server: Server) -> None:
    """Retention 1 s, a lease of 30 s: the claim keeps the record past the lease; a batch, and a
    redelivered done of the turn before, do not cut it back; the turn's own end does."""
    async with session_store(redis_server.url, RetentionSettings(retention_s=1)) as store:
        session = new_session()
        await run_turn(store, session, ["first"])  # turn 1, ended
        started = await store.start_turn(session, "p", now=time.time())
        await store.claim_turn(session, started.turn, "w", lease_until=time.time() + 30)
        assert min(await ttls(store, session)) > 30
        await store.store_segments([Segment(session, [chunk(started.base_seq + 1, started.turn, "x")])])
        _, old_end = done(started.base_seq, 1)  # turn 1's done, delivered again
        assert (await store.store_segments([Segment(session, [], end=old_end)]))[0].end == "stored"
        assert min(await ttls(store, session)) > 30
        _, end = done(started.base_seq + 2, started.turn)
        assert (await store.store_segments([Segment(session, [], end=end)]))[0].end == "stored"
        assert max(await ttls(store, session)) <= 1
