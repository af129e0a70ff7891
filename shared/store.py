"""The session record in Redis: the only module that talks to Redis.

Every session has three keys sharing one hash tag (so a Redis Cluster keeps
them in one slot and the scripts below stay atomic):

- ``meta`` (hash): ``hwm`` highest stored seq, ``seq`` last seq of the last
  finished turn, ``turns`` turn counter, ``active``/``prompt`` the generating
  turn, ``worker`` the worker that claimed it (``-`` once a reaper took its
  lease; ``lapsed`` then names the worker that held it, empty if none),
  ``fail`` why that worker gave it up, ``cid``/``cdigest``/``cturn``
  the last client chat's id, prompt digest and turn, ``owner`` the user who
  owns it, ``stop`` a turn asked to stop, ``paused`` and ``pv`` (pause
  version), ``ended`` last turn written to history, ``floor`` highest seq
  trimmed by the cap;
- ``log`` (sorted set): encoded ``chunk``/``done`` frames scored by seq;
- ``history`` (list): finished turns as JSON, oldest first.

Each operation is one round trip (a Lua script or a pipeline); storing
frames takes one script per session per batch, never one per frame.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from .errors import BrokerUnavailable
from .settings import BrokerSettings, RetentionSettings
from .subjects import LEASES_KEY, history_key, log_key, session_key, user_turns_key

__all__ = [
    "SessionMeta",
    "Claim",
    "Renewal",
    "Segment",
    "SegmentEnd",
    "StartResult",
    "HistoryTurn",
    "SessionStore",
    "connect_redis",
]

# KEYS: meta, the user's turns set (meta again when anonymous), the leases.
# ARGV: prompt, ttl, the client's chat id ('' if none), the prompt's digest,
#       user ('' if anonymous), turns allowed per user, now, session,
#       the time by which a worker must have claimed the turn.
# A chat with the id and prompt of the turn still generating is a resend
# after a reconnect: it gets that turn back (and its frames, which the
# connection delivers from its cursor). Once the turn has ended, the same id
# and prompt is a new chat: a client whose ids restart at "c1" on every page
# load must not get an `accepted` that produces nothing.
_START_TURN = """
local cturn = redis.call('HGET', KEYS[1], 'cturn')
if ARGV[3] ~= '' and cturn and redis.call('HGET', KEYS[1], 'active') == cturn
    and redis.call('HGET', KEYS[1], 'cid') == ARGV[3] and redis.call('HGET', KEYS[1], 'cdigest') == ARGV[4] then
  return {2, tonumber(cturn), tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')}
end
local active = redis.call('HGET', KEYS[1], 'active')
if active then return {0, tonumber(active), 0} end
if ARGV[5] ~= '' then
  -- Entries older than an hour are from turns whose end was lost: let them go.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[7]) - 3600)
  local running = redis.call('ZCARD', KEYS[2])
  if running >= tonumber(ARGV[6]) then return {3, running, 0} end
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
  redis.call('EXPIRE', KEYS[2], 3600)
end
local turn = redis.call('HINCRBY', KEYS[1], 'turns', 1)
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
redis.call('HSET', KEYS[1], 'active', turn, 'prompt', ARGV[1], 'tuser', ARGV[5])
if ARGV[3] ~= '' then  -- the last chat that had an id: a chat without one cannot be resent
  redis.call('HSET', KEYS[1], 'cid', ARGV[3], 'cdigest', ARGV[4], 'cturn', turn)
end
redis.call('HDEL', KEYS[1], 'stop', 'worker', 'fail', 'lapsed')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[8])
return {1, turn, seq}
"""

# The first user to use a session owns it; anonymous callers (dev mode)
# claim nothing and may use only sessions nobody owns.
_CHECK_OWNER = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if ARGV[1] ~= '' then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1])
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  return 1
end
if owner == ARGV[1] then return 1 end
return 0
"""

# A request may be delivered twice (JetStream is at-least-once); only the
# first worker to claim the active turn generates it.
# KEYS: meta, leases. ARGV: turn, worker, lease deadline, session.
_CLAIM_TURN = """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] then return {-1, 0} end
if redis.call('HGET', KEYS[1], 'worker') then return {0, 0} end
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local stop = redis.call('HGET', KEYS[1], 'stop') == ARGV[1]
return {1, stop and 1 or 0}
"""

# The claiming worker extends its lease; 0 means the turn is no longer its
# (it ended, or a reaper ended it after the lease ran out): stop generating.
# 2 means a stop was asked for: the worker obeys it even if it missed the
# broadcast (core NATS drops messages while a connection is away).
_RENEW_LEASE = """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('HGET', KEYS[1], 'stop') == ARGV[1] then return 2 end
return 1
"""

# A reaper takes an expired lease by pushing its deadline to ARGV[3], not by
# removing it: if the reaper dies or cannot publish the turn's done, the lease
# expires again and another reaper retries. Only storing the done removes it.
# The turn's worker becomes '-': no late claim starts the turn and no late
# renewal revives it ('lapsed' keeps who held it, for the done's message).
# KEYS: meta, leases. ARGV: session, now, retry deadline.
_TAKE_EXPIRED_LEASE = """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) > tonumber(ARGV[2]) then return 0 end
if not redis.call('HGET', KEYS[1], 'active') then
  redis.call('ZREM', KEYS[2], ARGV[1])  -- the record is gone (expired or lost): nothing to end
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local worker = redis.call('HGET', KEYS[1], 'worker')
if worker ~= '-' then redis.call('HSET', KEYS[1], 'worker', '-', 'lapsed', worker or '') end
return 1
"""

# A worker that cannot finish its turn (it could not publish for minutes)
# records why and lets its lease expire at once, so a reaper ends the turn
# now, numbering its done after what the stream really holds.
# KEYS: meta, leases. ARGV: turn, worker, session, message.
_ABANDON_TURN = """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'fail', ARGV[4])
redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[3])
return 1
"""

# A turn that never reached a worker: free the session, and forget its chat
# id so the client's resend starts a turn instead of waiting for this one.
_ABORT_TURN = """
if redis.call('HGET', KEYS[1], 'active') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'active', 'prompt', 'stop', 'worker')
  if KEYS[2] ~= KEYS[1] then redis.call('ZREM', KEYS[2], ARGV[2]) end
  redis.call('ZREM', KEYS[3], ARGV[2])
  if redis.call('HGET', KEYS[1], 'cturn') == ARGV[1] then redis.call('HDEL', KEYS[1], 'cid', 'cdigest', 'cturn') end
  return 1
end
return 0
"""

# KEYS: meta, log, history, the turn's user's turns set (meta when none), leases.
# ARGV: ttl, cap, max_turns, n, seq1, frame1, ..., seqn, framen,
#       [turn, done_seq, done_frame, reason, session, force] when the batch ends a turn.
# Returns 1, or 0 when the turn's end must wait: some of its chunks are not
# stored yet (another buffer holds them), and the history entry is built from
# the stored chunks, so the done is stored, and the session freed, only once
# they all are; ``force`` stores it anyway with what is there.
_STORE_FRAMES = """
local meta, log, hist = KEYS[1], KEYS[2], KEYS[3]
local ttl, cap, max_turns, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hwm = tonumber(redis.call('HGET', meta, 'hwm') or '0')
for i = 0, n - 1 do
  local seq = tonumber(ARGV[5 + 2 * i])
  redis.call('ZADD', log, seq, ARGV[6 + 2 * i])
  if seq > hwm then hwm = seq end
end
local rest = 5 + 2 * n
local stored = 1
if ARGV[rest] then
  local turn, done_seq = tonumber(ARGV[rest]), tonumber(ARGV[rest + 1])
  if tonumber(redis.call('HGET', meta, 'ended') or '0') < turn then
    local base = tonumber(redis.call('HGET', meta, 'seq') or '0')
    local low = math.max(base, tonumber(redis.call('HGET', meta, 'floor') or '0'))
    local frames = redis.call('ZRANGEBYSCORE', log, '(' .. low, '(' .. done_seq)
    if #frames < done_seq - 1 - low and ARGV[rest + 5] ~= '1' then
      stored = 0
    else
      local parts = {}
      for _, data in ipairs(frames) do
        local ok, frame = pcall(cjson.decode, data)
        if ok and type(frame) == 'table' and frame.type == 'chunk' and frame.turn == turn then
          parts[#parts + 1] = frame.text
        end
      end
      local prompt = ''
      if tonumber(redis.call('HGET', meta, 'active') or '0') == turn then
        prompt = redis.call('HGET', meta, 'prompt') or ''
      end
      redis.call('RPUSH', hist, cjson.encode({turn = turn, prompt = prompt, answer = table.concat(parts),
        reason = ARGV[rest + 3], last_seq = done_seq}))
      redis.call('LTRIM', hist, -max_turns, -1)
      redis.call('HSET', meta, 'ended', turn)
    end
  end
  if stored == 1 then
    redis.call('ZADD', log, done_seq, ARGV[rest + 2])
    if done_seq > hwm then hwm = done_seq end
    if tonumber(redis.call('HGET', meta, 'seq') or '0') < done_seq then
      redis.call('HSET', meta, 'seq', done_seq)
    end
    if tonumber(redis.call('HGET', meta, 'active') or '0') == turn then
      redis.call('HDEL', meta, 'active', 'prompt', 'stop', 'worker', 'fail', 'lapsed')
    end
    if KEYS[4] ~= meta then redis.call('ZREM', KEYS[4], ARGV[rest + 4]) end
    redis.call('ZREM', KEYS[5], ARGV[rest + 4])
    redis.call('EXPIRE', hist, ttl)
  end
end
redis.call('HSET', meta, 'hwm', hwm)
local size = redis.call('ZCARD', log)
if size > cap then
  -- Remember the highest trimmed seq: replays below it report the loss,
  -- while a lower seq merely not stored yet (another buffer) is waited for.
  local last = redis.call('ZRANGE', log, size - cap - 1, size - cap - 1, 'WITHSCORES')
  local floor = tonumber(last[2])
  if floor > tonumber(redis.call('HGET', meta, 'floor') or '0') then
    redis.call('HSET', meta, 'floor', floor)
  end
  redis.call('ZREMRANGEBYRANK', log, 0, size - cap - 1)
end
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', log, ttl)
return stored
"""

_SET_PAUSED = """
local was = redis.call('HGET', KEYS[1], 'paused') == '1'
local want = ARGV[1] == '1'
if was == want then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'pv') or '0')}
end
redis.call('HSET', KEYS[1], 'paused', ARGV[1])
local version = redis.call('HINCRBY', KEYS[1], 'pv', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, version}
"""

# A turn no worker has claimed yet is ended by a reaper at once (its lease
# expires now); a claimed one by its worker, which reads the flag when it
# claims, hears the broadcast, and reads it again at every lease renewal.
# KEYS: meta, leases. ARGV: session.
_REQUEST_STOP = """
local active = redis.call('HGET', KEYS[1], 'active')
if not active then return 0 end
redis.call('HSET', KEYS[1], 'stop', active)
if not redis.call('HGET', KEYS[1], 'worker') then redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[1]) end
return tonumber(active)
"""


_META_FIELDS = [
    "hwm", "paused", "pv", "active", "prompt", "stop", "seq", "worker", "tuser", "fail", "lapsed", "cid", "cturn",
]


@dataclass(frozen=True, slots=True)
class SessionMeta:
    hwm: int
    paused: bool
    pause_version: int
    active_turn: int | None
    active_prompt: str | None
    stop_turn: int | None
    base_seq: int = 0  # the last seq of the last finished turn
    worker: str | None = None  # the worker that claimed the active turn
    turn_user: str | None = None  # the user who started it
    failure: str | None = None  # why its worker gave it up, for the done a reaper sends
    lapsed_worker: str | None = None  # once a reaper took the lease: who held it ('' nobody)
    last_chat_id: str | None = None  # the last accepted chat that had an id ...
    last_chat_turn: int | None = None  # ... and its turn


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """The turn's ``done`` closing a segment: stored with the turn's history
    entry, which the store builds from the turn's stored chunks."""

    turn: int
    seq: int
    frame: bytes  # the encoded ``done`` frame
    reason: str
    user: str | None = None  # whose turn count is released
    force: bool = False  # store it even if some of the turn's chunks are missing


@dataclass(slots=True)
class Segment:
    """Frames of one session to store, in order; ``end`` when the segment ends a turn."""

    session: str
    frames: list[tuple[int, bytes]]
    end: SegmentEnd | None = None
    trace: str = ""  # the ended turn's trace id, for the log


_CLAIM_STATUS = {1: "claimed", 0: "taken", -1: "inactive"}


@dataclass(frozen=True, slots=True)
class Renewal:
    """``ours``: the lease was extended (else stop generating); ``stop_requested``: a stop is pending."""

    ours: bool
    stop_requested: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """``claimed`` (generate it), ``taken`` (another worker has it) or
    ``inactive`` (the turn ended or was aborted)."""

    status: str
    stop_requested: bool


@dataclass(frozen=True, slots=True)
class StartResult:
    """``started`` a new turn; else ``duplicate`` (the same chat resent while
    its ``turn`` still generates) or busy (``turn`` is still generating).
    ``base_seq``: the turn's frames are numbered after it."""

    started: bool
    turn: int  # with too_many: how many turns the user has generating
    base_seq: int
    duplicate: bool = False
    too_many: bool = False


class HistoryTurn(msgspec.Struct, frozen=True):
    """One finished turn; ``last_seq`` is the seq of its ``done``."""

    turn: int
    prompt: str
    answer: str
    reason: str
    last_seq: int = 0


_history_decoder = msgspec.json.Decoder(HistoryTurn)


@contextmanager
def _redis_errors() -> Iterator[None]:
    """Translate redis-py's failures into :class:`BrokerUnavailable`, in one place."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable("the session store is unavailable") from exc


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _str(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _parse_meta(raw: Sequence[Any]) -> SessionMeta:
    hwm, paused, version, active, prompt, stop, base, worker, turn_user, failure, lapsed, chat_id, chat_turn = raw
    return SessionMeta(
        hwm=_int(hwm) or 0,
        paused=paused == b"1",
        pause_version=_int(version) or 0,
        active_turn=_int(active),
        active_prompt=_str(prompt),
        stop_turn=_int(stop),
        base_seq=_int(base) or 0,
        worker=_str(worker),
        turn_user=_str(turn_user) or None,
        failure=_str(failure),
        lapsed_worker=_str(lapsed),
        last_chat_id=_str(chat_id) or None,
        last_chat_turn=_int(chat_turn),
    )


def connect_redis(broker: BrokerSettings) -> aioredis.Redis:
    """One bounded connection pool per process. A burst past the bound waits
    (up to 5 s) for a free connection instead of failing: a thousand clients
    connecting at once must queue, not get 503s."""
    pool = aioredis.BlockingConnectionPool.from_url(
        str(broker.redis_url),
        max_connections=broker.redis_max_connections,
        timeout=5,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


class SessionStore:
    """Typed operations on the session record.

    Every method raises :class:`BrokerUnavailable` when Redis fails.
    """

    def __init__(self, redis: aioredis.Redis, retention: RetentionSettings) -> None:
        self.redis = redis
        self.retention = retention
        self._start = redis.register_script(_START_TURN)
        self._claim = redis.register_script(_CLAIM_TURN)
        self._owner = redis.register_script(_CHECK_OWNER)
        self._renew = redis.register_script(_RENEW_LEASE)
        self._take = redis.register_script(_TAKE_EXPIRED_LEASE)
        self._abandon = redis.register_script(_ABANDON_TURN)
        self._abort = redis.register_script(_ABORT_TURN)
        self._store = redis.register_script(_STORE_FRAMES)
        self._pause = redis.register_script(_SET_PAUSED)
        self._stop = redis.register_script(_REQUEST_STOP)

    @staticmethod
    def _keys(session: str) -> list[str]:
        return [session_key(session), log_key(session), history_key(session)]

    @staticmethod
    def _user_key(session: str, user: str | None) -> str:
        # Scripts take the meta key again for "no user" (a key must be named, not built in Lua).
        return user_turns_key(user) if user else session_key(session)

    async def meta(self, session: str) -> SessionMeta:
        with _redis_errors():
            raw = await self.redis.hmget(session_key(session), _META_FIELDS)
        return _parse_meta(raw)

    async def transcript(self, session: str) -> tuple[list[HistoryTurn], SessionMeta]:
        """The finished turns and the record, read in one transaction, so
        ``meta.base_seq`` is exactly the ``done`` of the last turn listed
        (or of one trimmed before it)."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrange(history_key(session), 0, -1)
                pipe.hmget(session_key(session), _META_FIELDS)
                rows, raw = await pipe.execute()
        return [_history_decoder.decode(row) for row in rows], _parse_meta(raw)

    async def _run(self, script: Any, session: str, args: Sequence[Any]) -> Any:
        with _redis_errors():
            return await script(keys=self._keys(session), args=list(args))

    async def start_turn(
        self,
        session: str,
        prompt: str,
        *,
        client_id: str | None = None,
        user: str | None = None,
        max_turns_per_user: int = 0,
        now: float = 0.0,
        claim_within_s: float = 3600.0,
    ) -> StartResult:
        """Claim the session for a new turn unless one is generating, or
        return the turn of the same chat (same client id and prompt: a
        resend after a reconnect) while that turn still generates. A user
        with ``max_turns_per_user`` turns generating gets ``too_many``."""
        digest = hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()
        keys = [session_key(session), self._user_key(session, user), LEASES_KEY]
        args: list[Any] = [
            prompt, self.retention.retention_s, client_id or "", digest, user or "", max_turns_per_user, now, session,
            now + claim_within_s,
        ]
        with _redis_errors():
            status, turn, base = await self._start(keys=keys, args=args)
        return StartResult(
            started=status == 1, turn=int(turn), base_seq=int(base), duplicate=status == 2, too_many=status == 3
        )

    async def check_owner(self, session: str, user: str | None) -> bool:
        """Whether ``user`` may use the session; the first user to use it owns it."""
        return bool(await self._run(self._owner, session, [user or "", self.retention.retention_s]))

    async def claim_turn(self, session: str, turn: int, worker: str, *, lease_until: float) -> Claim:
        """Claim the active turn for one worker, leased until ``lease_until``;
        any later claim of it is refused."""
        with _redis_errors():
            status, stop = await self._claim(
                keys=[session_key(session), LEASES_KEY], args=[turn, worker, lease_until, session]
            )
        return Claim(status=_CLAIM_STATUS[int(status)], stop_requested=bool(stop))

    async def renew_lease(self, session: str, turn: int, worker: str, *, lease_until: float) -> Renewal:
        """Extend the worker's lease on its turn, and report a stop asked for meanwhile."""
        with _redis_errors():
            renewed = await self._renew(keys=[session_key(session), LEASES_KEY], args=[turn, worker, lease_until, session])
        return Renewal(ours=bool(renewed), stop_requested=int(renewed) == 2)

    async def abandon_turn(self, session: str, turn: int, worker: str, *, reason: str) -> None:
        """Give up a claimed turn: its lease expires now and a reaper ends it with ``reason``."""
        with _redis_errors():
            await self._abandon(keys=[session_key(session), LEASES_KEY], args=[turn, worker, session, reason])

    async def expired_leases(self, now: float, *, limit: int = 100) -> list[str]:
        """Sessions whose turn lease ended before ``now``."""
        with _redis_errors():
            rows = await self.redis.zrangebyscore(LEASES_KEY, "-inf", now, start=0, num=limit)
        return [row.decode() if isinstance(row, bytes) else str(row) for row in rows]

    async def take_expired_lease(self, session: str, *, now: float, retry_at: float) -> bool:
        """Take a lease that expired before ``now``; True for the one caller that
        took it, which ends the turn. The lease stays, due again at ``retry_at``,
        until the turn's ``done`` is stored: a reaper that fails is retried."""
        with _redis_errors():
            taken = await self._take(keys=[session_key(session), LEASES_KEY], args=[session, now, retry_at])
        return bool(taken)

    async def abort_turn(self, session: str, turn: int, *, user: str | None = None) -> None:
        """Release a turn that was never handed to a worker."""
        with _redis_errors():
            await self._abort(
                keys=[session_key(session), self._user_key(session, user), LEASES_KEY], args=[turn, session]
            )

    async def set_paused(self, session: str, paused: bool) -> tuple[bool, int]:
        """Set the pause flag; return (whether it changed, the flag's version)."""
        changed, version = await self._run(
            self._pause, session, ["1" if paused else "0", self.retention.retention_s]
        )
        return bool(changed), int(version)

    async def request_stop(self, session: str) -> int | None:
        """Mark the generating turn as stopped; return it, or None if idle.

        A turn no worker has claimed yet has its lease expire now, so a
        reaper ends it with ``stopped`` without waiting for a worker.
        """
        with _redis_errors():
            turn = await self._stop(keys=[session_key(session), LEASES_KEY], args=[session])
        return int(turn) or None

    async def store_segments(self, segments: Sequence[Segment]) -> list[bool]:
        """Store frames of one or more sessions in one round trip; return, per
        segment, whether all of it was stored.

        Frames are stored idempotently by seq, so a redelivered batch changes
        nothing. A segment's ``end`` (the turn's ``done``) is stored only once
        every chunk of its turn is: then, atomically, the history entry is
        built from those chunks, the turn's last seq recorded, the session
        freed for the next turn and the user's turn slot and the lease
        released. If some are still on their way (another buffer holds them)
        the segment's frames are stored but not its end, and False says to
        offer the end again shortly.
        """
        calls = []
        for segment in segments:
            args: list[Any] = [
                self.retention.retention_s,
                self.retention.max_frames_per_session,
                self.retention.max_history_turns,
                len(segment.frames),
            ]
            for seq, data in segment.frames:
                args += (seq, data)
            end = segment.end
            if end is not None:
                args += (end.turn, end.seq, end.frame, end.reason, segment.session, "1" if end.force else "0")
            user = end.user if end is not None else None
            keys = [*self._keys(segment.session), self._user_key(segment.session, user), LEASES_KEY]
            calls.append((len(keys), *keys, *args))
        with _redis_errors():
            try:
                results = await self._evalsha_all(self._store.sha, calls)
            except NoScriptError:  # Redis restarted or flushed its scripts: load, then redo (idempotent)
                await self.redis.script_load(_STORE_FRAMES)
                results = await self._evalsha_all(self._store.sha, calls)
        return [bool(result) for result in results]

    async def _evalsha_all(self, sha: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA each call in one pipeline. Not through the Script object:
        in a pipeline it first asks SCRIPT EXISTS, a second round trip per batch."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(sha, *call)
            return list(await pipe.execute())

    async def read_frames(self, session: str, *, after: int, limit: int) -> tuple[list[tuple[int, bytes]], int, int]:
        """Return (frames with seq > after, lowest seq still deliverable, hwm), one round trip.

        The lowest deliverable seq is one above the highest seq trimmed by the
        cap: a lower seq that is merely not stored yet does not count as lost.
        """
        key = log_key(session)
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(key, f"({after}", "+inf", start=0, num=limit, withscores=True)
                pipe.hmget(session_key(session), ["floor", "hwm"])
                rows, (floor, hwm) = await pipe.execute()
        frames = [(int(score), data) for data, score in rows]
        return frames, (_int(floor) or 0) + 1, _int(hwm) or 0

    async def history(self, session: str, *, last: int | None = None) -> list[HistoryTurn]:
        """The session's finished turns, oldest first (the last ``last`` of them)."""
        start = -last if last else 0
        with _redis_errors():
            rows = await self.redis.lrange(history_key(session), start, -1)
        return [_history_decoder.decode(row) for row in rows]
