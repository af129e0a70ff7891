"""The session record in Redis: the only module that talks to Redis.

Every script and every MULTI/EXEC here touches keys of ONE Redis Cluster
hash slot (a cluster refuses others with CROSSSLOT);
``tests/integration/test_store_slots.py`` checks it. A session has four keys
sharing its hash tag ``{<session>}``:

- ``meta`` (hash): ``hwm`` highest stored seq, ``seq`` last seq of the last
  finished turn, ``turns`` turn counter, ``active``/``prompt`` the generating
  turn, ``lid`` its lease id and ``lease`` its lease deadline (the
  authoritative one), ``tuser`` who started it, ``worker`` the worker that
  claimed it (``-`` once a reaper took its lease; ``lapsed`` then names the
  worker that held it, empty if none), ``claim`` the id of the claim call
  that won it, ``fail`` why that worker gave it up, ``cid``/``cdigest``/
  ``cturn`` the last client chat's id, prompt digest and turn, ``owner`` the
  user who owns it, ``stop`` a turn asked to stop, ``paused``, ``pv`` (pause
  version) and ``pcid`` (the call that last changed it), ``ended`` last turn
  written to history, ``floor`` highest seq trimmed by the cap, ``frames``
  how many seqs the log holds (what the cap counts), ``hbase`` how many
  history entries were trimmed;
- ``log`` (sorted set): the client frames' bytes scored by seq: the
  generating turn's ``chunk`` frames and every ``done`` one member each, and
  each finished turn's chunks ONE packed member (msgpack, scored by its last
  seq: the turn, its history entry and, per stretch of consecutive seqs, the
  first seq and each text's length in bytes; the texts are the entry's
  answer, so it is held once). When the entry is trimmed the member takes
  the texts in. :meth:`SessionStore.read_frames` encodes those chunks again
  with ``protocol.encode``, the worker's encoder: replay is byte for byte
  what was stored. The cap trims seqs, from inside a packed member if need be;
- ``history`` (list): finished turns as JSON, oldest first;
- ``retired`` (set): lease ids that can never start a turn (below), and
  those of ended turns.

Two things are cross-session, each its own keys, touched only by separate
single-slot calls, ordered so that a crash between two calls never loses a
turn's end nor a user's turn slot for good. Both name a turn by
``<session>:<lease id>``, a random id the gateway draws for each start (not
the session alone: the release after a turn's end must not remove the entry
the session's next turn may already have written):

- the lease index, :data:`~shared.subjects.LEASE_SHARDS` sorted sets
  ``chat:leases:{<n>}`` (``n`` a CRC32 of the session), is a hint for the
  reapers: an entry scored at or before the turn's deadline in ``meta``
  (early is allowed, never late). It is written before the turn starts and
  removed only after the turn's end is stored (or its start refused). A
  reaper scans every shard in one pipelined round trip and asks the
  session's ``meta`` (one script) whether the lease is really due: it takes
  it if so, moves the entry to the deadline in ``meta`` if not, and drops it
  if ``meta`` names no generating turn with that lease id. Renewals write
  ``meta`` only; a claim, an abandon and a stop before any claim move the
  entry right after their script (an entry left late by a crash there
  delays the reaper by at most one lease, or the claim deadline).
- a user's turns set ``chat:user:{<u>}:turns`` counts the turns generating
  for ``CHAT_MAX_TURNS_PER_USER``: a slot is reserved (atomically checking
  the limit) before the turn starts, given back if the start is refused,
  and released after the turn's end is stored. A user at the limit first
  drops the slots whose turn is not generating (checked in each session's
  ``meta``): slots a crash left behind cost nothing but a check.

Dropping an entry whose start is still on its way (a gateway stalled
between its calls) would leave a generating turn unindexed or uncounted, so
whoever drops one first retires its lease id in the session's ``retired``
set, in the same script that checked ``meta``; the start script refuses a
retired id and the gateway starts again with a new one. Hence every
generating turn has an index entry and a user slot, and no turn's end is
stored twice nor lost: the guarantees of the one global set, without a
script spanning slots.

Each operation is one round trip (a Lua script or a pipeline) plus, where a
turn starts or ends, the single-slot calls above; storing frames takes one
script per session per batch, never one per frame. Every write refreshes the
TTL of the session's keys, so a turn generating longer than the retention
keeps its record. Only frames of the generating turn are stored: a late
second ``done``, or a chunk after its turn ended, is refused and not published.

Every script is idempotent under redis-py's retry (it sends a command again
when the reply was lost, so a script may run twice for one call): a start
re-run finds its own lease id generating and answers ``started``; a reserve
finds its slot; a claim re-run matches its per-call claim id; renewals,
abandons, stops, retirements and rescores set what they already set; a store
re-run finds its frames and done stored as they are (published again), a
finished turn's chunks in its packed member (a chunk at one of its seqs with
other text is refused: it is not published); a take
re-run finds the lease not due, so the turn is ended at the retry deadline,
as after a reaper crash; a pause re-run matches its per-call id and answers
"changed" again (its caller broadcasts it); an abort or a store re-run does
not return the lease id it freed, so at worst a release is skipped (the
leftover entry is dropped by the reaper or the user's prune). A refused start gives its entries back only through the
retire-and-check script, never blindly, and an ended turn's lease id is
retired, so a late re-run of its start cannot start it twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from .errors import BrokerUnavailable
from .protocol import Chunk, encode
from .settings import BrokerSettings, RetentionSettings
from .subjects import (
    history_key,
    lease_index_key,
    lease_index_keys,
    log_key,
    retired_key,
    session_key,
    user_turns_key,
)

__all__ = [
    "SessionMeta",
    "Claim",
    "Renewal",
    "Segment",
    "SegmentEnd",
    "Stored",
    "StartResult",
    "HistoryTurn",
    "Lease",
    "SessionStore",
    "connect_redis",
]

log = logging.getLogger(__name__)

# How long past a lease's end a session's record is kept at least: time for a
# reaper (every few seconds, retried every REAP_RETRY_S) to end the turn.
LEASE_TTL_MARGIN_S = 60

# Every write refreshes the session's keys' TTL (docs/architecture.md): a
# turn generating longer than the retention must not lose its record. A TTL
# is shortened only as a turn ends (``exact``): until then a lease's TTL
# (SessionStore._ttl_past) outlasts a short retention. EXPIRE's GT option
# would not do: it leaves a key without a TTL (a new one) without one.
# Scripts using it name meta, log and history as KEYS[1..3].
_TOUCH = """
local function touch(ttl, exact)
  ttl = tonumber(ttl)
  for i = 1, 3 do
    if exact or redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
"""

# KEYS: meta, log, history, retired. ARGV: prompt, ttl, the client's chat id ('' if none),
#       the prompt's digest, user ('' if anonymous), the lease id, the time by
#       which a worker must have claimed the turn, '1' to start a turn ('0':
#       the user is at the limit, only answer a resend or busy).
# A chat with the id and prompt of the turn still generating is a resend
# after a reconnect: it gets that turn back (and its frames, which the
# connection delivers from its cursor). Once the turn has ended, the same id
# and prompt is a new chat: a client whose ids restart at "c1" on every page
# load must not get an `accepted` that produces nothing.
# Status 4: a reaper or a prune dropped this lease id's entries as stale
# while the start was on its way (or its turn already ended); the caller
# starts again with a new id. A re-run of a start that ran (redis-py resends
# a command whose reply was lost) finds its own lease id generating and
# answers as the first run did.
_START_TURN = _TOUCH + """
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'lid') == ARGV[6] and redis.call('HGET', KEYS[1], 'active') then
  return {1, tonumber(redis.call('HGET', KEYS[1], 'active')), tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')}
end
local cturn = redis.call('HGET', KEYS[1], 'cturn')
if ARGV[3] ~= '' and cturn and redis.call('HGET', KEYS[1], 'active') == cturn
    and redis.call('HGET', KEYS[1], 'cid') == ARGV[3] and redis.call('HGET', KEYS[1], 'cdigest') == ARGV[4] then
  return {2, tonumber(cturn), tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')}
end
local active = redis.call('HGET', KEYS[1], 'active')
if active then return {0, tonumber(active), 0} end
if ARGV[8] ~= '1' then return {3, 0, 0} end
if redis.call('SISMEMBER', KEYS[4], ARGV[6]) == 1 then return {4, 0, 0} end
local turn = redis.call('HINCRBY', KEYS[1], 'turns', 1)
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
redis.call('HSET', KEYS[1], 'active', turn, 'prompt', ARGV[1], 'tuser', ARGV[5], 'lid', ARGV[6], 'lease', ARGV[7])
if ARGV[3] ~= '' then  -- the last chat that had an id: a chat without one cannot be resent
  redis.call('HSET', KEYS[1], 'cid', ARGV[3], 'cdigest', ARGV[4], 'cturn', turn)
end
redis.call('HDEL', KEYS[1], 'stop', 'worker', 'claim', 'fail', 'lapsed')
touch(ARGV[2])
return {1, turn, seq}
"""

# A user's turn slot, taken before the turn starts.
# KEYS: the user's turns set. ARGV: member, turns allowed, now, ttl.
_RESERVE_USER_TURN = """
local running = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, running} end  -- a re-run: reserved already
if running >= tonumber(ARGV[2]) then return {0, running} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, running + 1}
"""

# Whether a lease id names the session's generating turn (0); if not, it is
# retired (1): no start still on its way can use it, so its index and user
# entries may be dropped without losing a live turn.
# KEYS: meta, retired. ARGV: lease id, ttl.
_RETIRE_LEASE = """
if redis.call('HGET', KEYS[1], 'active') and redis.call('HGET', KEYS[1], 'lid') == ARGV[1] then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# The first user to use a session owns it; anonymous callers (dev mode)
# claim nothing and may use only sessions nobody owns.
_CHECK_OWNER = _TOUCH + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if ARGV[1] ~= '' then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1])
    touch(ARGV[2])
  end
  return 1
end
if owner == ARGV[1] then return 1 end
return 0
"""

# A request may be delivered twice (JetStream is at-least-once); only the
# first worker to claim the active turn generates it. ``claim`` is drawn per
# delivery: a re-run of the same call, or the worker's retry of a call whose
# outcome it could not know, is answered as the first run, while a second
# delivery to the same worker is refused like any other.
# KEYS: meta, log, history. ARGV: turn, worker, lease deadline, claim id, ttl.
# Returns status, stop, lease id.
_CLAIM_TURN = _TOUCH + """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] then return {-1, 0, ''} end
local worker = redis.call('HGET', KEYS[1], 'worker')
if worker and (worker ~= ARGV[2] or redis.call('HGET', KEYS[1], 'claim') ~= ARGV[4]) then return {0, 0, ''} end
if not worker then redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'claim', ARGV[4], 'lease', ARGV[3]) end
touch(ARGV[5])
local stop = redis.call('HGET', KEYS[1], 'stop') == ARGV[1]
return {1, stop and 1 or 0, redis.call('HGET', KEYS[1], 'lid') or ''}
"""

# The claiming worker extends its lease; 0 means the turn is no longer its
# (it ended, or a reaper ended it after the lease ran out): stop generating.
# 2 means a stop was asked for: the worker obeys it even if it missed the
# broadcast (core NATS drops messages while a connection is away).
# KEYS: meta, log, history. ARGV: turn, worker, lease deadline, ttl.
_RENEW_LEASE = _TOUCH + """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease', ARGV[3])
touch(ARGV[4])
if redis.call('HGET', KEYS[1], 'stop') == ARGV[1] then return 2 end
return 1
"""

# A reaper takes an expired lease by pushing its deadline to ARGV[3], not by
# removing it: if the reaper dies or cannot publish the turn's done, the lease
# expires again and another reaper retries. Only storing the done removes it.
# The turn's worker becomes '-': no late claim starts the turn and no late
# renewal revives it ('lapsed' keeps who held it, for the done's message).
# Returns {1, new deadline, turn} (taken), {0, deadline, 0} (not due: the
# index entry was early) or {-1, '', 0}: the lease id is not the generating
# turn's (it ended, the record is gone, or the start never ran), and is
# retired. A re-run (its reply was lost) finds the lease not due: the turn is
# ended when it comes due again at the retry deadline, as after a reaper crash.
# KEYS: meta, log, history, retired. ARGV: lease id, now, retry deadline, ttl.
_TAKE_EXPIRED_LEASE = _TOUCH + """
local active = redis.call('HGET', KEYS[1], 'active')
if not active or redis.call('HGET', KEYS[1], 'lid') ~= ARGV[1] then
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  return {-1, '', 0}
end
local deadline = redis.call('HGET', KEYS[1], 'lease') or '0'
local worker = redis.call('HGET', KEYS[1], 'worker')
if tonumber(deadline) > tonumber(ARGV[2]) then return {0, deadline, 0} end
redis.call('HSET', KEYS[1], 'lease', ARGV[3])
if worker ~= '-' then redis.call('HSET', KEYS[1], 'worker', '-', 'lapsed', worker or '') end
touch(ARGV[4])
return {1, ARGV[3], tonumber(active)}
"""

# Move an index entry to the deadline read from the record (drop it for
# ''), unless someone moved it since it was read (an abandon or a stop made
# it due now).
# KEYS: an index shard. ARGV: member, score as read, new score or ''.
_RESCORE_LEASE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"""

# A worker that cannot finish its turn (it could not publish for minutes)
# records why and lets its lease expire at once, so a reaper ends the turn
# now, numbering its done after what the stream really holds.
# KEYS: meta, log, history. ARGV: turn, worker, message, ttl.
# Returns the lease id ('' if not its turn).
_ABANDON_TURN = _TOUCH + """
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return ''
end
redis.call('HSET', KEYS[1], 'fail', ARGV[3], 'lease', 0)
touch(ARGV[4])
return redis.call('HGET', KEYS[1], 'lid') or ''
"""

# A turn that never reached a worker: free the session, and forget its chat
# id so the client's resend starts a turn instead of waiting for this one.
# Its lease id is retired: a late re-run of its start cannot start it again.
# KEYS: meta, log, history, retired. ARGV: turn, ttl.
# Returns the lease id and user to release ('' none).
_ABORT_TURN = _TOUCH + """
if redis.call('HGET', KEYS[1], 'active') == ARGV[1] then
  local lid, user = redis.call('HGET', KEYS[1], 'lid') or '', redis.call('HGET', KEYS[1], 'tuser') or ''
  redis.call('HDEL', KEYS[1], 'active', 'prompt', 'stop', 'worker', 'claim', 'lid', 'lease')
  if lid ~= '' then
    redis.call('SADD', KEYS[4], lid)
    redis.call('EXPIRE', KEYS[4], ARGV[2])
  end
  touch(ARGV[2], true)
  if redis.call('HGET', KEYS[1], 'cturn') == ARGV[1] then redis.call('HDEL', KEYS[1], 'cid', 'cdigest', 'cturn') end
  return {lid, user}
end
return {'', ''}
"""

# KEYS: meta, log, history, retired.
# ARGV: ttl, cap, max_turns, n, seq1, frame1, ..., seqn, framen,
#       [turn, done_seq, done_frame, reason, force] when the batch ends a turn.
# Returns {end, lease id, user, refused seq...}. Only frames of the
# generating turn are stored: a frame of another turn, or of one already
# ended (a late second done, a chunk after a forced end), is refused (neither
# stored nor to be published), unless that very frame is stored already (a
# redelivered batch, a re-run of this call): that one is published again.
# ``end``: 2 no end in this call, 1 the done is stored, -1 it is refused, 0 it
# must wait: some of its chunks are not stored yet (another buffer holds
# them), and the history entry is built from the stored chunks, so the done
# is stored, and the session freed, only once they all are; ``force`` stores
# it anyway with what is there. The lease id and user ('' if none) are those
# of the turn this call freed, for the caller to drop their index and user
# entries; that lease id is retired, so no late re-run of its start reuses it.
_STORE_FRAMES = _TOUCH + """
local meta, log, hist = KEYS[1], KEYS[2], KEYS[3]
local ttl, cap, max_turns, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- The hot path, once per batch: one read of meta, one write of hwm and frames, the TTLs.
local state = redis.call('HMGET', meta, 'hwm', 'active', 'ended', 'frames')
local stored_hwm = tonumber(state[1] or '0')
local hwm, active, ended = stored_hwm, tonumber(state[2] or '0'), tonumber(state[3] or '0')
-- frames: how many seqs the log holds (a packed member holds many); a record
-- older than the count holds only loose members.
local stored_count = tonumber(state[4] or '')
local count = stored_count or redis.call('ZCARD', log)
local live = active > ended  -- a turn is generating (and its end not stored)
local refused = {}
local function int(x) return string.format('%d', x) end
-- Whether a frame is a chunk exactly as protocol.encode writes it (from its
-- seq, turn and text, which read_frames encodes again): only those are packed.
local function canonical(data, seq, turn)
  local s, t = string.match(data, '^{"type":"chunk","seq":(%d+),"turn":(%d+),"text":".*"}$')
  return s == int(seq) and t == int(turn)
end
local function decoded(data)
  local ok, frame = pcall(cjson.decode, data)
  if ok and type(frame) == 'table' then return frame end
  return {}
end
local function is_packed(data) return string.byte(data, 1) ~= 123 end  -- not '{': not a JSON frame
-- A packed turn (msgpack) is {turn, run...}, a run being {first seq, text...}
-- for a stretch of consecutive seqs; or, while its history entry holds the
-- answer, {turn, entry, skip, run...}, a run then {first seq, length...}: the
-- texts are the answer's bytes from skip on. entry numbers history entries
-- from the session's first (meta's hbase: how many were trimmed).
local function first_run(p) return type(p[2]) == 'number' and 4 or 2 end
local function hbase() return tonumber(redis.call('HGET', meta, 'hbase') or '0') end
local function answer_of(p)
  local entry = decoded(redis.call('LINDEX', hist, p[2] - hbase()) or '')
  return entry.turn == p[1] and entry.answer or nil
end
-- The packed turn with every text in the member, for a turn whose entry goes.
local function standalone(p, answer)
  local out, offset = {p[1]}, p[3]
  for r = 4, #p do
    local run = {p[r][1]}
    for j = 2, #p[r] do
      run[j], offset = string.sub(answer, offset + 1, offset + p[r][j]), offset + p[r][j]
    end
    out[#out + 1] = run
  end
  return out
end
-- Whether a chunk of a finished turn is stored, packed, as this very frame.
local function packed_as(seq, data)
  local member = redis.call('ZRANGEBYSCORE', log, seq, '+inf', 'LIMIT', 0, 1)[1]
  if not member or not is_packed(member) then return false end
  local p = cmsgpack.unpack(member)
  if not canonical(data, seq, p[1]) then return false end
  local r0 = first_run(p)
  if r0 == 4 then
    local answer = answer_of(p)
    if not answer then return false end
    p = standalone(p, answer)
  end
  for r = 2, #p do
    local i = seq - p[r][1] + 2
    if i >= 2 and i <= #p[r] then return decoded(data).text == p[r][i] end
  end
  return false
end
local function stored_as(seq, data)
  return tonumber(redis.call('ZSCORE', log, data)) == seq or packed_as(seq, data)
end
for i = 0, n - 1 do
  local seq, data = tonumber(ARGV[5 + 2 * i]), ARGV[6 + 2 * i]
  local turn = tonumber(decoded(data).turn) or 0
  if live and turn == active then
    count = count + redis.call('ZADD', log, seq, data)
    if seq > hwm then hwm = seq end
  elseif not stored_as(seq, data) then
    refused[#refused + 1] = seq
  end
end
local rest = 5 + 2 * n
local status = 2
local ended_now = false  -- this call stored the turn's done (not a redelivered one's re-run)
local freed, user = '', ''
if ARGV[rest] then
  local turn, done_seq, done = tonumber(ARGV[rest]), tonumber(ARGV[rest + 1]), ARGV[rest + 2]
  if stored_as(done_seq, done) then
    status = 1
  elseif not live or turn ~= active then
    status = -1
  else
    local base = tonumber(redis.call('HGET', meta, 'seq') or '0')
    local low = math.max(base, tonumber(redis.call('HGET', meta, 'floor') or '0'))
    local rows = redis.call('ZRANGEBYSCORE', log, '(' .. low, '(' .. done_seq, 'WITHSCORES')
    if #rows / 2 < done_seq - 1 - low and ARGV[rest + 4] ~= '1' then
      status = 0
    else
      status, ended_now = 1, true
      -- The turn's chunks become one packed member scored by its last seq.
      -- A turn with any other frame keeps them all loose (never seen: the
      -- worker encodes every chunk with protocol.encode).
      local parts, runs, loose, last = {}, {}, {}, nil
      for i = 1, #rows, 2 do
        local data, seq = rows[i], tonumber(rows[i + 1])
        local frame = decoded(data)
        if frame.type == 'chunk' and frame.turn == turn and type(frame.text) == 'string' then
          parts[#parts + 1] = frame.text
          if seq ~= last and canonical(data, seq, turn) then
            if seq ~= (last or -1) + 1 then runs[#runs + 1] = {seq} end
            runs[#runs][#runs[#runs] + 1] = frame.text
            loose[#loose + 1], last = data, seq
          end
        end
      end
      local entries = redis.call('RPUSH', hist, cjson.encode({turn = turn, prompt = redis.call('HGET', meta, 'prompt') or '',
        answer = table.concat(parts), reason = ARGV[rest + 3], last_seq = done_seq}))
      -- Packed only if every frame in its range is (a member's range holds
      -- no other): the answer is then its texts, and it keeps their lengths.
      if last and #loose == #rows / 2 then
        local packed = {turn, hbase() + entries - 1, 0}
        for _, run in ipairs(runs) do
          for j = 2, #run do run[j] = #run[j] end
          packed[#packed + 1] = run
        end
        for i = 1, #loose, 1000 do redis.call('ZREM', log, unpack(loose, i, math.min(i + 999, #loose))) end
        redis.call('ZADD', log, last, cmsgpack.pack(packed))
        if #loose > 9 * redis.call('ZCARD', log) then
          -- Redis shrinks the hash table sized for the loose chunks only step
          -- by step as the key is used: rebuild the few members left instead
          -- (at most a ninth of the work done packing).
          local all = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
          redis.call('DEL', log)
          for i = 1, #all, 1000 do
            local args = {}
            for j = i, math.min(i + 998, #all - 1), 2 do args[#args + 1], args[#args + 2] = all[j + 1], all[j] end
            redis.call('ZADD', log, unpack(args))
          end
        end
      end
      if entries > max_turns then
        -- The oldest entries go: their turns' packed members take their texts back.
        local first = hbase()
        for i, entry in ipairs(redis.call('LRANGE', hist, 0, entries - max_turns - 1)) do
          local e = decoded(entry)
          local row = redis.call('ZREVRANGEBYSCORE', log, '(' .. (tonumber(e.last_seq) or 0), '-inf',
                                 'WITHSCORES', 'LIMIT', 0, 1)
          if row[1] and is_packed(row[1]) then
            local p = cmsgpack.unpack(row[1])
            if first_run(p) == 4 and p[1] == e.turn and p[2] == first + i - 1 and type(e.answer) == 'string' then
              redis.call('ZREM', log, row[1])
              redis.call('ZADD', log, row[2], cmsgpack.pack(standalone(p, e.answer)))
            end
          end
        end
        redis.call('LTRIM', hist, -max_turns, -1)
        redis.call('HSET', meta, 'hbase', first + entries - max_turns)
      end
      redis.call('EXPIRE', hist, ttl)
      count = count + redis.call('ZADD', log, done_seq, done)
      if done_seq > hwm then hwm = done_seq end
      if tonumber(redis.call('HGET', meta, 'seq') or '0') < done_seq then
        redis.call('HSET', meta, 'seq', done_seq)
      end
      freed, user = redis.call('HGET', meta, 'lid') or '', redis.call('HGET', meta, 'tuser') or ''
      redis.call('HSET', meta, 'ended', turn)
      redis.call('HDEL', meta, 'active', 'prompt', 'stop', 'worker', 'claim', 'fail', 'lapsed', 'lid', 'lease')
      if freed ~= '' then
        redis.call('SADD', KEYS[4], freed)
        redis.call('EXPIRE', KEYS[4], ttl)
      end
    end
  end
end
if count > cap then
  -- Trim the oldest seqs past the cap, from inside a packed member if need
  -- be. Remember the highest trimmed seq: replays below it report the loss,
  -- while a lower seq merely not stored yet (another buffer) is waited for.
  local excess, floor, writes = count - cap, 0, {}
  local rows = redis.call('ZRANGE', log, 0, excess - 1, 'WITHSCORES')
  for i = 1, #rows, 2 do
    if excess == 0 then break end
    local data, score = rows[i], tonumber(rows[i + 1])
    writes[#writes + 1] = data
    if not is_packed(data) then
      excess, floor = excess - 1, score
    else
      local p = cmsgpack.unpack(data)
      local r0 = first_run(p)
      local kept = {unpack(p, 1, r0 - 1)}
      for r = r0, #p do
        local run, k = p[r], #p[r] - 1
        local cut = math.min(excess, k)
        if cut > 0 then
          if r0 == 4 then
            for j = 2, cut + 1 do kept[3] = kept[3] + run[j] end  -- skip the trimmed texts' bytes
          end
          excess, floor = excess - cut, run[1] + cut - 1
        end
        if cut < k then
          local left = {run[1] + cut}
          for j = cut + 2, #run do left[#left + 1] = run[j] end
          kept[#kept + 1] = left
        end
      end
      if #kept >= r0 then writes[#writes + 1] = {score, cmsgpack.pack(kept)} end
    end
  end
  for _, w in ipairs(writes) do
    if type(w) == 'table' then redis.call('ZADD', log, w[1], w[2]) else redis.call('ZREM', log, w) end
  end
  count = cap + excess
  if floor > tonumber(redis.call('HGET', meta, 'floor') or '0') then
    redis.call('HSET', meta, 'floor', floor)
  end
end
if hwm > stored_hwm or count ~= stored_count then redis.call('HSET', meta, 'hwm', hwm, 'frames', count) end
-- All three, live turn or not: a packed turn reads its texts from its history
-- entry, so history must never expire before the log member that needs it.
-- Exact (shortened to the retention) only as this call ends the turn: a
-- redelivered done may come while the next turn is generating.
touch(ttl, ended_now)
return {status, freed, user, unpack(refused)}
"""

# Frames with seq > after: up to ``limit`` members of the log with their
# scores, each packed one whose texts are its history entry's answer followed
# by that entry ('' for any other member), after the floor and hwm.
# KEYS: meta, log, history. ARGV: after, limit.
_READ_FRAMES = """
local state = redis.call('HMGET', KEYS[1], 'floor', 'hwm', 'hbase')
local rows = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {state[1] or '0', state[2] or '0'}
for i = 1, #rows, 2 do
  local entry = ''
  if string.byte(rows[i], 1) ~= 123 then
    local p = cmsgpack.unpack(rows[i])
    if type(p[2]) == 'number' then
      entry = redis.call('LINDEX', KEYS[3], p[2] - tonumber(state[3] or '0')) or ''
    end
  end
  out[#out + 1], out[#out + 2], out[#out + 3] = rows[i], rows[i + 1], entry
end
return out
"""

# ``pcid`` is drawn per call: a re-run of the call that changed the flag
# answers "changed" again, so its caller still broadcasts the change.
# KEYS: meta, log, history. ARGV: '1' to pause ('0' resume), ttl, call id.
_SET_PAUSED = _TOUCH + """
local was = redis.call('HGET', KEYS[1], 'paused') == '1'
local want = ARGV[1] == '1'
if was == want then
  local changed = redis.call('HGET', KEYS[1], 'pcid') == ARGV[3] and 1 or 0
  return {changed, tonumber(redis.call('HGET', KEYS[1], 'pv') or '0')}
end
redis.call('HSET', KEYS[1], 'paused', ARGV[1], 'pcid', ARGV[3])
local version = redis.call('HINCRBY', KEYS[1], 'pv', 1)
touch(ARGV[2])
return {1, version}
"""

# A turn no worker has claimed yet is ended by a reaper at once (its lease
# expires now); a claimed one by its worker, which reads the flag when it
# claims, hears the broadcast, and reads it again at every lease renewal.
# KEYS: meta, log, history. ARGV: ttl. Returns the turn (0 if idle) and, when
# its lease was made due, its lease id ('' otherwise).
_REQUEST_STOP = _TOUCH + """
local active = redis.call('HGET', KEYS[1], 'active')
if not active then return {0, ''} end
redis.call('HSET', KEYS[1], 'stop', active)
touch(ARGV[1])
if redis.call('HGET', KEYS[1], 'worker') then return {tonumber(active), ''} end
redis.call('HSET', KEYS[1], 'lease', 0)
return {tonumber(active), redis.call('HGET', KEYS[1], 'lid') or ''}
"""


_META_FIELDS = [
    "hwm", "paused", "pv", "active", "prompt", "stop", "seq", "worker", "tuser", "fail", "lapsed", "cid", "cturn",
    "lid",
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
    lease_id: str | None = None  # the active turn's lease id


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """The turn's ``done`` closing a segment: stored with the turn's history
    entry, which the store builds from the turn's stored chunks."""

    turn: int
    seq: int
    frame: bytes  # the encoded ``done`` frame
    reason: str
    user: str | None = None  # who started it (the store releases the user recorded with the turn)
    force: bool = False  # store it even if some of the turn's chunks are missing


@dataclass(frozen=True, slots=True)
class Stored:
    """What storing a segment did: ``end`` is ``stored`` (publish the done),
    ``waiting`` (some of its turn's chunks are not stored yet: offer it
    again), ``refused`` (its turn is not the generating one: drop it) or
    ``none`` (the segment has no end); ``refused`` holds the seqs of frames
    refused likewise, which must not be published."""

    end: str
    refused: frozenset[int] = frozenset()


_END_STATUS = {2: "none", 1: "stored", 0: "waiting", -1: "refused"}


@dataclass(slots=True)
class Segment:
    """Frames of one session to store, in order; ``end`` when the segment ends a turn."""

    session: str
    frames: list[tuple[int, bytes]]
    end: SegmentEnd | None = None
    trace: str = ""  # the ended turn's trace id, for the log


_CLAIM_STATUS = {1: "claimed", 0: "taken", -1: "inactive"}


@dataclass(frozen=True, slots=True)
class Lease:
    """An entry of the lease index: a turn of ``session`` whose lease may be due at ``due``;
    ``turn`` is known once a reaper took the lease (:meth:`SessionStore.take_expired_leases`)."""

    session: str
    lease_id: str
    due: float
    turn: int | None = None


def _member(session: str, lease_id: str) -> str:
    """The lease index's and the user's turns set's member for one turn."""
    return f"{session}:{lease_id}"


def _parse_member(raw: Any) -> tuple[str, str] | None:
    """(session, lease id) of a :func:`_member`; None for anything else (the old layout's entries)."""
    session, _, lease_id = (_str(raw) or "").rpartition(":")
    return (session, lease_id) if session and lease_id else None


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


def _unpack_chunks(session: str, data: bytes, entry: bytes) -> list[tuple[int, bytes]]:
    """(seq, chunk frame) of a packed turn of the log (_STORE_FRAMES), in seq
    order, encoded as the worker encoded them; ``entry`` is the turn's history
    entry when the member holds only the texts' lengths (b'' otherwise).
    Raises msgspec.DecodeError on a member of no known form."""
    packed = msgspec.msgpack.decode(data)
    turn = packed[0]
    if not isinstance(packed[1], int):
        return [(first + i, encode(Chunk(seq=first + i, turn=turn, text=text)))
                for first, *texts in packed[1:] for i, text in enumerate(texts)]
    held = _history_decoder.decode(entry) if entry else None
    if held is None or held.turn != turn:  # the TTLs keep them together: not seen
        log.error("a packed turn's history entry is gone: its chunks are lost", extra={"session": session})
        return []
    answer, frames, offset = held.answer.encode(), [], packed[2]
    for first, *lengths in packed[3:]:
        for i, length in enumerate(lengths):
            text = answer[offset:offset + length].decode()
            frames.append((first + i, encode(Chunk(seq=first + i, turn=turn, text=text))))
            offset += length
    return frames


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
    hwm, paused, version, active, prompt, stop, base, worker, turn_user, failure, lapsed, chat_id, chat_turn, lid = raw
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
        lease_id=_str(lid),
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
        self._reserve = redis.register_script(_RESERVE_USER_TURN)
        self._retire = redis.register_script(_RETIRE_LEASE)
        self._claim = redis.register_script(_CLAIM_TURN)
        self._owner = redis.register_script(_CHECK_OWNER)
        self._renew = redis.register_script(_RENEW_LEASE)
        self._take = redis.register_script(_TAKE_EXPIRED_LEASE)
        self._rescore = redis.register_script(_RESCORE_LEASE)
        self._abandon = redis.register_script(_ABANDON_TURN)
        self._abort = redis.register_script(_ABORT_TURN)
        self._store = redis.register_script(_STORE_FRAMES)
        self._pause = redis.register_script(_SET_PAUSED)
        self._stop = redis.register_script(_REQUEST_STOP)
        self._read = redis.register_script(_READ_FRAMES)

    @staticmethod
    def _keys(session: str) -> list[str]:
        return [session_key(session), log_key(session), history_key(session)]

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
        with ``max_turns_per_user`` turns generating gets ``too_many``.

        Three single-slot calls, in this order: the user's turn slot is
        reserved, the lease index entry written, then the turn started; a
        refused start gives both back. A crash between them leaves entries
        that name no turn, which the reaper and the user's prune drop."""
        digest = hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()
        deadline = now + claim_within_s
        limited = user if user and max_turns_per_user > 0 else None  # the user whose turns are counted
        for _ in range(3):
            lid = secrets.token_hex(8)
            member = _member(session, lid)
            if limited:
                reserved, running = await self._reserve_user_turn(limited, member, max_turns_per_user, now)
                if not reserved:
                    # A resend of the chat generating gets its turn back, a busy session says busy.
                    status, turn, base = await self._start_script(session, prompt, client_id, digest, user, "", 0, False)
                    if status == 3:
                        return StartResult(started=False, turn=running, base_seq=0, too_many=True)
                    return StartResult(started=False, turn=int(turn), base_seq=int(base), duplicate=status == 2)
            with _redis_errors():
                await self.redis.zadd(lease_index_key(session), {member: deadline})
            status, turn, base = await self._start_script(session, prompt, client_id, digest, user, lid, deadline, True)
            if status != 1:
                await self._release_refused(session, lid, limited)
            if status != 4:  # 4: this lease id was retired while the start was on its way
                return StartResult(started=status == 1, turn=int(turn), base_seq=int(base), duplicate=status == 2)
        raise BrokerUnavailable("the session store kept retiring the turn's lease")

    async def _start_script(
        self, session: str, prompt: str, client_id: str | None, digest: str, user: str | None,
        lid: str, deadline: float, may_start: bool,
    ) -> tuple[int, int, int]:
        args: list[Any] = [
            prompt, self._ttl_past(deadline), client_id or "", digest, user or "", lid, deadline,
            "1" if may_start else "0",
        ]
        with _redis_errors():
            status, turn, base = await self._start(keys=[*self._keys(session), retired_key(session)], args=args)
        return int(status), int(turn), int(base)

    async def _reserve_user_turn(self, user: str, member: str, limit: int, now: float) -> tuple[bool, int]:
        """Take one of the user's turn slots; at the limit, drop the slots of
        turns no longer generating (their end's release was lost) and try once more."""
        args: list[Any] = [member, limit, now, self.retention.retention_s]
        with _redis_errors():
            reserved, running = await self._reserve(keys=[user_turns_key(user)], args=args)
            if not reserved and await self._prune_user_turns(user):
                reserved, running = await self._reserve(keys=[user_turns_key(user)], args=args)
        return bool(reserved), int(running)

    async def _prune_user_turns(self, user: str) -> int:
        """Drop the user's slots whose turn is not generating (checked, and
        retired, in each session's record); return how many were dropped."""
        key = user_turns_key(user)
        members = [(_str(row) or "", _parse_member(row)) for row in await self.redis.zrange(key, 0, -1)]
        named = [(member, parsed) for member, parsed in members if parsed is not None]
        results = await self._eval_each(
            self._retire,
            [(2, session_key(s), retired_key(s), lid, self.retention.retention_s) for _, (s, lid) in named],
        )
        stale = [member for (member, _), retired in zip(named, results, strict=True) if retired]
        stale += [member for member, parsed in members if parsed is None]  # the old layout's entries
        if stale:
            await self.redis.zrem(key, *stale)
        return len(stale)

    async def _release_refused(self, session: str, lid: str, user: str | None) -> None:
        """Give back the entries of a start that was refused, once its lease id
        is retired: never those of a turn its start did begin (a lost reply's
        re-run answers for it), nor of a start still on its way."""
        try:
            retired = await self._retire(keys=[session_key(session), retired_key(session)],
                                         args=[lid, self.retention.retention_s])
        except (RedisError, OSError) as exc:  # leftovers name no turn: the reaper or the user's prune drops them
            log.warning("could not release a refused start's entries: %s", exc, extra={"session": session})
            return
        if retired:
            await self._release(session, lid, user)

    async def _release(self, session: str, lid: str, user: str | None) -> None:
        """Drop a lease id's index entry and user slot, once its turn is over
        or never started. Best effort: a leftover names no generating turn,
        and the reaper or the user's prune drops it."""
        member = _member(session, lid)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(lease_index_key(session), member)
                if user:
                    pipe.zrem(user_turns_key(user), member)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not release a turn's lease entries: %s", exc, extra={"session": session})

    async def _hint_due(self, session: str, lid: str, due: float, *, earlier_only: bool = True) -> None:
        """Move the lease's index entry to ``due`` (never recreating it), by
        default only earlier. Best effort: the record holds the deadline, and
        an entry left later than it only delays the reaper by up to one lease
        (or, after a claim, up to the claim deadline)."""
        try:
            member = {_member(session, lid): due}
            await self.redis.zadd(lease_index_key(session), member, xx=True, lt=earlier_only)
        except (RedisError, OSError) as exc:
            log.warning("could not move a lease's index entry: %s", exc, extra={"session": session})

    def _ttl_past(self, deadline: float) -> int:
        """The session's TTL (s) while a turn is leased until ``deadline`` (epoch s): the
        retention, but never ending before the lease does (plus :data:`LEASE_TTL_MARGIN_S`
        for a reaper to end it), so a retention shorter than a silent model's pause
        between lease renewals cannot delete a generating turn's record."""
        return max(self.retention.retention_s, math.ceil(deadline - time.time()) + LEASE_TTL_MARGIN_S)

    async def check_owner(self, session: str, user: str | None) -> bool:
        """Whether ``user`` may use the session; the first user to use it owns it."""
        return bool(await self._run(self._owner, session, [user or "", self.retention.retention_s]))

    async def claim_turn(
        self, session: str, turn: int, worker: str, *, lease_until: float, claim_id: str | None = None
    ) -> Claim:
        """Claim the active turn for one worker, leased until ``lease_until``;
        any later claim of it is refused, but one with the same ``claim_id`` (a
        retry whose first reply was lost) answers ``claimed`` again. Without a
        ``claim_id`` every call is a new claim."""
        args: list[Any] = [turn, worker, lease_until, claim_id or secrets.token_hex(8), self._ttl_past(lease_until)]
        with _redis_errors():
            status, stop, lid = await self._claim(keys=self._keys(session), args=args)
        if int(status) == 1 and lid:
            # The index entry still says the claim deadline: move it to the lease's end.
            await self._hint_due(session, _str(lid) or "", lease_until, earlier_only=False)
        return Claim(status=_CLAIM_STATUS[int(status)], stop_requested=bool(stop))

    async def renew_lease(self, session: str, turn: int, worker: str, *, lease_until: float) -> Renewal:
        """Extend the worker's lease on its turn, and report a stop asked for meanwhile.
        Only the record changes: the index entry, now early, is moved by the reaper."""
        return (await self.renew_leases([(session, turn, worker, lease_until)]))[0]

    async def renew_leases(self, leases: Sequence[tuple[str, int, str, float]]) -> list[Renewal]:
        """:meth:`renew_lease` for many turns, each ``(session, turn, worker, lease_until)``,
        in one round trip (a pipeline of single-session scripts); raises BrokerUnavailable."""
        calls = [
            (3, *self._keys(session), turn, worker, until, self._ttl_past(until))
            for session, turn, worker, until in leases
        ]
        with _redis_errors():
            results = await self._eval_each(self._renew, calls)
        return [Renewal(ours=bool(int(r)), stop_requested=int(r) == 2) for r in results]

    async def abandon_turn(self, session: str, turn: int, worker: str, *, reason: str) -> None:
        """Give up a claimed turn: its lease expires now and a reaper ends it with ``reason``."""
        with _redis_errors():
            lid = _str(await self._abandon(
                keys=self._keys(session), args=[turn, worker, reason, self.retention.retention_s]
            ))
        if lid:
            await self._hint_due(session, lid, 0)

    async def expired_leases(self, now: float, *, limit: int = 100) -> list[Lease]:
        """Lease index entries due before ``now``, from every shard in one
        round trip (up to ``limit`` per shard). An entry may be early: only
        :meth:`take_expired_lease` decides, from the session's record."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in lease_index_keys():
                    pipe.zrangebyscore(key, "-inf", now, start=0, num=limit, withscores=True)
                shards = await pipe.execute()
        leases = []
        for rows in shards:
            for member, due in rows:
                if (parsed := _parse_member(member)) is not None:
                    leases.append(Lease(session=parsed[0], lease_id=parsed[1], due=float(due)))
        return leases

    async def take_expired_leases(self, leases: Sequence[Lease], *, now: float, retry_at: float) -> list[Lease]:
        """Take the leases that expired before ``now``; return those this caller
        took (one caller takes a given lease), each with the turn it names:
        the caller ends that turn only (:meth:`lease_still_taken`). A taken
        lease stays, due again at ``retry_at``, until the turn's ``done`` is
        stored: a reaper that fails is retried.

        Each session's record decides (one script per lease, all in one
        round trip); then, in a second, each index entry is moved to the
        record's deadline, or dropped if it names no generating turn."""
        calls = [
            (4, *self._keys(lease.session), retired_key(lease.session), lease.lease_id, now, retry_at,
             self.retention.retention_s)
            for lease in leases
        ]
        with _redis_errors():
            results = await self._eval_each(self._take, calls)
            moves = [
                (1, lease_index_key(lease.session), _member(lease.session, lease.lease_id), lease.due,
                 "" if int(status) == -1 else deadline)
                for lease, (status, deadline, _) in zip(leases, results, strict=True)
            ]
            await self._eval_each(self._rescore, moves)
        return [
            replace(lease, turn=int(turn))
            for lease, (status, _, turn) in zip(leases, results, strict=True) if int(status) == 1
        ]

    async def take_expired_lease(self, lease: Lease, *, now: float, retry_at: float) -> bool:
        """:meth:`take_expired_leases` for one lease: True if this caller took it."""
        return bool(await self.take_expired_leases([lease], now=now, retry_at=retry_at))

    @staticmethod
    def lease_still_taken(meta: SessionMeta, lease: Lease) -> bool:
        """Whether ``meta`` still shows the turn of a lease a reaper took as
        generating, under that lease, with no worker: only then may the reaper
        end it (meanwhile its own done may have ended it, and the next turn begun)."""
        return (
            lease.turn is not None and meta.active_turn == lease.turn
            and meta.lease_id == lease.lease_id and meta.worker == "-"
        )

    async def abort_turn(self, session: str, turn: int) -> None:
        """Release a turn that was never handed to a worker."""
        with _redis_errors():
            lid, user = await self._abort(
                keys=[*self._keys(session), retired_key(session)], args=[turn, self.retention.retention_s]
            )
        if lid:
            await self._release(session, _str(lid) or "", _str(user))

    async def set_paused(self, session: str, paused: bool) -> tuple[bool, int]:
        """Set the pause flag; return (whether it changed, the flag's version)."""
        changed, version = await self._run(
            self._pause, session, ["1" if paused else "0", self.retention.retention_s, secrets.token_hex(8)]
        )
        return bool(changed), int(version)

    async def request_stop(self, session: str) -> int | None:
        """Mark the generating turn as stopped; return it, or None if idle.

        A turn no worker has claimed yet has its lease expire now, so a
        reaper ends it with ``stopped`` without waiting for a worker.
        """
        with _redis_errors():
            turn, lid = await self._stop(keys=self._keys(session), args=[self.retention.retention_s])
        if lid:
            await self._hint_due(session, _str(lid) or "", 0)
        return int(turn) or None

    async def store_segments(self, segments: Sequence[Segment]) -> list[Stored]:
        """Store frames of one or more sessions in one round trip; return, per
        segment, what was stored and what refused (:class:`Stored`).

        Frames are stored idempotently by seq, so a redelivered batch changes
        nothing. A segment's ``end`` (the turn's ``done``) is stored only once
        every chunk of its turn is: then, atomically, the history entry is
        built from those chunks, the turn's last seq recorded and the session
        freed for the next turn; the lease's index entry and the user's turn
        slot are released after, in a second round trip. If some chunks are
        still on their way (another buffer holds them) the segment's frames
        are stored but not its end, which is to be offered again shortly.
        Frames and ends of a turn that is not generating (a late second done,
        a chunk after its turn ended) are refused: neither stored nor to be
        published; one stored already (a redelivered batch) is to be published again.
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
                args += (end.turn, end.seq, end.frame, end.reason, "1" if end.force else "0")
            keys = [*self._keys(segment.session), retired_key(segment.session)]
            calls.append((len(keys), *keys, *args))
        with _redis_errors():
            results = await self._eval_each(self._store, calls)
        for segment, (_, lid, user, *_) in zip(segments, results, strict=True):
            if lid:
                await self._release(segment.session, _str(lid) or "", _str(user))
        return [Stored(_END_STATUS[int(end)], frozenset(int(seq) for seq in refused)) for end, _, _, *refused in results]

    async def _eval_each(self, script: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA each call (numkeys, keys..., args...) in one pipeline. Not
        through the Script object: in a pipeline it first asks SCRIPT EXISTS,
        a second round trip per batch. Redis restarted or flushed its scripts:
        load, then redo (every script here is safe to run twice)."""
        if not calls:
            return []
        try:
            return await self._evalsha_all(script.sha, calls)
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await self._evalsha_all(script.sha, calls)

    async def _evalsha_all(self, sha: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(sha, *call)
            return list(await pipe.execute())

    async def read_frames(self, session: str, *, after: int, limit: int) -> tuple[list[tuple[int, bytes]], int, int]:
        """Return (frames with seq > after, lowest seq still deliverable, hwm), one round trip.

        Frames are (seq, the client frame's bytes), at most ``limit``, in seq
        order; a finished turn's packed chunks are encoded again exactly as
        stored. The lowest deliverable seq is one above the highest seq
        trimmed by the cap: a lower seq that is merely not stored yet does not
        count as lost.
        """
        with _redis_errors():
            floor, hwm, *rows = await self._run(self._read, session, [after, limit])
        frames: list[tuple[int, bytes]] = []
        for i in range(0, len(rows), 3):
            data, score, entry = rows[i:i + 3]
            if data[:1] == b"{":
                frames.append((int(score), data))
            else:  # a packed turn: each member holds at least one seq > after
                frames += [frame for frame in _unpack_chunks(session, data, entry) if frame[0] > after]
        return frames[:limit], int(floor) + 1, int(hwm)

    async def history(self, session: str, *, last: int | None = None) -> list[HistoryTurn]:
        """The session's finished turns, oldest first (the last ``last`` of them)."""
        start = -last if last else 0
        with _redis_errors():
            rows = await self.redis.lrange(history_key(session), start, -1)
        return [_history_decoder.decode(row) for row in rows]
