"""Gateway settings (documented in docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.settings import (
    BrokerSettings,
    RetentionSettings,
    env_float,
    env_int,
    env_log_level,
    env_str,
)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can make the gateway hold or do."""

    max_frame_bytes: int = 64 * 1024
    max_prompt_chars: int = 16_000
    send_queue_frames: int = 2048
    inbox_frames: int = 4096
    send_buffer_bytes: int = 0  # kernel send buffer per connection; 0 = the OS default


@dataclass(frozen=True)
class Timeouts:
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    gap_timeout_s: float = 0.25
    replay_timeout_s: float = 2.0
    sse_keepalive_s: float = 15.0


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            broker=BrokerSettings.from_env(environ),
            retention=RetentionSettings.from_env(environ),
            limits=Limits(
                max_frame_bytes=env_int(environ, "CHAT_MAX_FRAME_BYTES", Limits.max_frame_bytes, minimum=256),
                max_prompt_chars=env_int(environ, "CHAT_MAX_PROMPT_CHARS", Limits.max_prompt_chars, minimum=1),
                send_queue_frames=env_int(environ, "CHAT_SEND_QUEUE_FRAMES", Limits.send_queue_frames, minimum=8),
                inbox_frames=env_int(environ, "CHAT_INBOX_FRAMES", Limits.inbox_frames, minimum=8),
                send_buffer_bytes=env_int(environ, "CHAT_SEND_BUFFER_BYTES", Limits.send_buffer_bytes, minimum=0),
            ),
            timeouts=Timeouts(
                ping_interval_s=env_float(environ, "CHAT_PING_INTERVAL_S", Timeouts.ping_interval_s, minimum=0.1),
                ping_timeout_s=env_float(environ, "CHAT_PING_TIMEOUT_S", Timeouts.ping_timeout_s, minimum=0.1),
                gap_timeout_s=env_float(environ, "CHAT_GAP_TIMEOUT_S", Timeouts.gap_timeout_s, minimum=0.01),
                replay_timeout_s=env_float(environ, "CHAT_REPLAY_TIMEOUT_S", Timeouts.replay_timeout_s, minimum=0.1),
                sse_keepalive_s=env_float(environ, "CHAT_SSE_KEEPALIVE_S", Timeouts.sse_keepalive_s, minimum=0.1),
            ),
            host=env_str(environ, "CHAT_HOST", cls.host),
            port=env_int(environ, "CHAT_PORT", cls.port, minimum=0),
            log_level=env_log_level(environ),
        )
