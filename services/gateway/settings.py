"""Gateway settings (documented in docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.auth import AuthSettings
from shared.broker import REQUEST_MAX_AGE_S as MAX_QUEUE_TIMEOUT_S
from shared.settings import (
    BrokerSettings,
    RetentionSettings,
    env_float,
    env_int,
    env_log_level,
    env_port,
    env_str,
)

from .origins import OriginPolicy


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can make the gateway hold or do."""

    max_frame_bytes: int = 64 * 1024
    max_prompt_chars: int = 16_000
    send_queue_frames: int = 2048
    inbox_frames: int = 4096
    send_buffer_bytes: int = 0  # kernel send buffer per connection; 0 = the OS default
    max_connections: int = 10_000  # per gateway process (503 past it)
    max_connections_per_user: int = 32  # per gateway process (429 past it)
    frames_per_s: float = 20.0  # client frames, token bucket per connection
    frame_burst: int = 40
    max_turns_per_user: int = 4  # generating at once, across gateways


@dataclass(frozen=True)
class Timeouts:
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    gap_timeout_s: float = 0.25
    replay_timeout_s: float = 2.0
    sse_keepalive_s: float = 15.0
    queue_timeout_s: float = 30.0  # a turn no worker claims by then ends with done/error, code unavailable


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    auth: AuthSettings = field(default_factory=AuthSettings)
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        auth = AuthSettings.from_env(environ)
        return cls(
            broker=BrokerSettings.from_env(environ),
            retention=RetentionSettings.from_env(environ),
            limits=Limits(
                max_frame_bytes=env_int(environ, "CHAT_MAX_FRAME_BYTES", Limits.max_frame_bytes, minimum=256),
                max_prompt_chars=env_int(environ, "CHAT_MAX_PROMPT_CHARS", Limits.max_prompt_chars, minimum=1),
                send_queue_frames=env_int(environ, "CHAT_SEND_QUEUE_FRAMES", Limits.send_queue_frames, minimum=8),
                inbox_frames=env_int(environ, "CHAT_INBOX_FRAMES", Limits.inbox_frames, minimum=8),
                send_buffer_bytes=env_int(environ, "CHAT_SEND_BUFFER_BYTES", Limits.send_buffer_bytes, minimum=0),
                max_connections=env_int(environ, "CHAT_MAX_CONNECTIONS", Limits.max_connections, minimum=1),
                max_connections_per_user=env_int(
                    environ, "CHAT_MAX_CONNECTIONS_PER_USER", Limits.max_connections_per_user, minimum=1
                ),
                frames_per_s=env_float(environ, "CHAT_FRAMES_PER_S", Limits.frames_per_s, minimum=0.1),
                frame_burst=env_int(environ, "CHAT_FRAME_BURST", Limits.frame_burst, minimum=1),
                max_turns_per_user=env_int(environ, "CHAT_MAX_TURNS_PER_USER", Limits.max_turns_per_user, minimum=1),
            ),
            timeouts=Timeouts(
                ping_interval_s=env_float(environ, "CHAT_PING_INTERVAL_S", Timeouts.ping_interval_s, minimum=0.1),
                ping_timeout_s=env_float(environ, "CHAT_PING_TIMEOUT_S", Timeouts.ping_timeout_s, minimum=0.1),
                gap_timeout_s=env_float(environ, "CHAT_GAP_TIMEOUT_S", Timeouts.gap_timeout_s, minimum=0.01),
                replay_timeout_s=env_float(environ, "CHAT_REPLAY_TIMEOUT_S", Timeouts.replay_timeout_s, minimum=0.1),
                sse_keepalive_s=env_float(environ, "CHAT_SSE_KEEPALIVE_S", Timeouts.sse_keepalive_s, minimum=0.1),
                queue_timeout_s=env_float(
                    environ, "CHAT_QUEUE_TIMEOUT_S", Timeouts.queue_timeout_s, minimum=0.1, maximum=MAX_QUEUE_TIMEOUT_S
                ),
            ),
            auth=auth,
            origins=OriginPolicy.from_settings(
                tuple(o.strip().rstrip("/") for o in env_str(environ, "CHAT_ALLOWED_ORIGINS", "").split(",") if o.strip()),
                dev=not auth.required,
            ),
            host=env_str(environ, "CHAT_HOST", cls.host),
            port=env_port(environ, "CHAT_PORT", cls.port),
            log_level=env_log_level(environ),
        )
