"""Every NATS subject, JetStream name and Redis key, built only from validated ids.

One file holds every prefix (as ``arq/constants.py`` does), so nothing else in
the project formats a subject or key by hand. A session id containing ``.``,
``*``, ``>`` or whitespace would let a client subscribe to another session's
stream, so :func:`validate_session_id` runs before any id is used here.
"""

from __future__ import annotations

import re
import secrets
import zlib

from .errors import ProtocolError

__all__ = [
    "SESSION_ID_PATTERN",
    "STREAM_REQUESTS",
    "STREAM_GENERATED",
    "SUBJECT_REQUESTS",
    "SUBJECT_REPLAY",
    "CONSUMER_WORKERS",
    "CONSUMER_BUFFERS",
    "validate_session_id",
    "new_session_id",
    "generated_subject",
    "generated_wildcard",
    "frame_msg_id",
    "delivery_subject",
    "control_subject",
    "session_key",
    "log_key",
    "history_key",
    "user_turns_key",
    "retired_key",
    "LEASE_SHARDS",
    "lease_index_key",
    "lease_index_keys",
]

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

PREFIX = "chat"
# JetStream: turn requests wait here until a worker with capacity pulls them.
STREAM_REQUESTS = "CHAT_REQUESTS"
SUBJECT_REQUESTS = f"{PREFIX}.requests"
CONSUMER_WORKERS = "workers"
# JetStream: frames a worker generated, until a buffer has stored them in Redis.
STREAM_GENERATED = "CHAT_GENERATED"
CONSUMER_BUFFERS = "buffers"
# Core NATS request/reply: a buffer answers replays from the Redis chunk log.
SUBJECT_REPLAY = f"{PREFIX}.replay"

KEY_PREFIX = "chat"
# The lease index is split into this many sorted sets, each in a hash slot of
# its own, so no script touches it together with a session's keys. Changing
# the number moves sessions between shards: entries in the old ones are lost.
LEASE_SHARDS = 16


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a valid session id.

    Raises:
        ProtocolError: ``value`` is not a string matching ``^[A-Za-z0-9_-]{1,64}$``.
    """
    if not isinstance(value, str) or SESSION_ID_PATTERN.fullmatch(value) is None:
        raise ProtocolError("session id must match ^[A-Za-z0-9_-]{1,64}$")
    return value


def new_session_id() -> str:
    """Return a fresh random session id (22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


def generated_subject(session: str) -> str:
    """Subject a worker publishes a session's frames to (JetStream)."""
    return f"{PREFIX}.gen.{validate_session_id(session)}"


def frame_msg_id(session: str, turn: int, seq: int) -> str:
    """``Nats-Msg-Id`` of a generated frame: JetStream keeps one message per id
    within its window, so a retried publish, or a worker and a reaper racing
    for a turn's next seq, stores one frame. The turn keeps a late reaper's
    ``done`` of an ended turn from taking the next turn's frame at that seq."""
    return f"{session}:{turn}:{seq}"


def generated_wildcard() -> str:
    """Subjects captured by the generated-frames stream."""
    return f"{PREFIX}.gen.*"


def delivery_subject(session: str) -> str:
    """Subject a buffer publishes stored frames to, for gateways (core NATS)."""
    return f"{PREFIX}.session.{validate_session_id(session)}.out"


def control_subject(session: str) -> str:
    """Subject for a session's pause, resume and stop events (core NATS)."""
    return f"{PREFIX}.session.{validate_session_id(session)}.ctl"


def session_wildcard(session: str) -> str:
    """Both of a session's core subjects: a connection needs one subscription, not two."""
    return f"{PREFIX}.session.{validate_session_id(session)}.*"


def session_key(session: str) -> str:
    """Redis hash with the session's record: seq, turns, active turn, pause flag."""
    return f"{KEY_PREFIX}:{{{validate_session_id(session)}}}:meta"


def log_key(session: str) -> str:
    """Redis sorted set of the session's frames, scored by seq."""
    return f"{KEY_PREFIX}:{{{validate_session_id(session)}}}:log"


def history_key(session: str) -> str:
    """Redis list of the session's finished turns (JSON, oldest first)."""
    return f"{KEY_PREFIX}:{{{validate_session_id(session)}}}:history"


def user_turns_key(user: str) -> str:
    """Redis sorted set of the user's turns generating (``<session>:<lease id>``), scored by start time."""
    return f"{KEY_PREFIX}:user:{{{validate_session_id(user)}}}:turns"


def retired_key(session: str) -> str:
    """Redis set of the session's lease ids that can no longer start a turn
    (their index or user entry was dropped as stale)."""
    return f"{KEY_PREFIX}:{{{validate_session_id(session)}}}:retired"


def lease_index_key(session: str) -> str:
    """Redis sorted set (one of :data:`LEASE_SHARDS`) indexing the session's
    turn lease: ``<session>:<lease id>`` scored by a time at or before its deadline."""
    shard = zlib.crc32(validate_session_id(session).encode()) % LEASE_SHARDS
    return f"{KEY_PREFIX}:leases:{{{shard}}}"


def lease_index_keys() -> list[str]:
    """Every shard of the lease index, for the reaper's scan."""
    return [f"{KEY_PREFIX}:leases:{{{shard}}}" for shard in range(LEASE_SHARDS)]
