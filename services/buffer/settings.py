"""Buffer settings (documented in docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.settings import BrokerSettings, HealthSettings, RetentionSettings, env_float, env_int, env_log_level

# A frame waits at most the linger: past this it is latency, not batching.
MAX_LINGER_MS = 100.0


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    batch_size: int = 256
    # After a fetch that brought frames, wait this long before the next one, so
    # it finds a fuller batch (one Redis round trip and one publish per session
    # for all of it); after an empty one, fetch at once. 0: never wait.
    linger_s: float = 0.002
    replay_max_frames: int = 1000
    replay_max_bytes: int = 512 * 1024
    reap_interval_s: float = 1.0
    health: HealthSettings = field(default_factory=HealthSettings)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            broker=BrokerSettings.from_env(environ),
            retention=RetentionSettings.from_env(environ),
            batch_size=env_int(environ, "CHAT_BUFFER_BATCH", 256, minimum=1),
            linger_s=env_float(environ, "CHAT_BUFFER_LINGER_MS", cls.linger_s * 1000, maximum=MAX_LINGER_MS) / 1000,
            replay_max_frames=env_int(environ, "CHAT_REPLAY_MAX_FRAMES", 1000, minimum=1),
            replay_max_bytes=env_int(environ, "CHAT_REPLAY_MAX_BYTES", 512 * 1024, minimum=1024),
            reap_interval_s=env_float(environ, "CHAT_REAP_INTERVAL_S", 1.0, minimum=0.05),
            health=HealthSettings.from_env(environ),
            log_level=env_log_level(environ),
        )
