"""Buffer settings (documented in docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.settings import BrokerSettings, RetentionSettings, env_choice, env_int, env_str


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    batch_size: int = 256
    replay_max_frames: int = 1000
    replay_max_bytes: int = 512 * 1024
    health_host: str = "127.0.0.1"
    health_port: int = 0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            broker=BrokerSettings.from_env(environ),
            retention=RetentionSettings.from_env(environ),
            batch_size=env_int(environ, "CHAT_BUFFER_BATCH", 256, minimum=1),
            replay_max_frames=env_int(environ, "CHAT_REPLAY_MAX_FRAMES", 1000, minimum=1),
            replay_max_bytes=env_int(environ, "CHAT_REPLAY_MAX_BYTES", 512 * 1024, minimum=1024),
            health_host=env_str(environ, "CHAT_HEALTH_HOST", "127.0.0.1"),
            health_port=env_int(environ, "CHAT_HEALTH_PORT", 0, minimum=0),
            log_level=env_choice(environ, "CHAT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        )
