"""Worker settings (documented in docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from shared.broker import REQUEST_MAX_AGE_S as MAX_QUEUE_TIMEOUT_S
from shared.settings import (
    BrokerSettings,
    HealthSettings,
    Secret,
    env_choice,
    env_float,
    env_int,
    env_log_level,
    env_str,
    env_url,
    masked_url,
)


@dataclass(frozen=True)
class DemoModelSettings:
    tokens_per_s: float = 20.0
    answer_tokens: int = 300


@dataclass(frozen=True)
class OpenAISettings:
    base_url: str = "https://api.openai.com/v1"
    api_key: Secret = Secret("")
    api_key_header: str = "authorization"  # "api-key" for Azure OpenAI
    model: str = "gpt-4o-mini"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_connections: int = 100
    retries: int = 3  # more attempts for a failure before the first token (refused, reset, 408/429/5xx)
    retry_initial_s: float = 1.0  # the first retry's delay ceiling; it doubles, up to 8 s


def base_url(environ: Mapping[str, str]) -> str:
    """``CHAT_OPENAI_BASE_URL`` without a trailing slash, and without ``/chat/completions``
    when the whole endpoint was given (the path is appended to the base)."""
    url = env_url(environ, "CHAT_OPENAI_BASE_URL", OpenAISettings.base_url, schemes=("http", "https"))
    parts = urlsplit(url)
    path = parts.path.rstrip("/").removesuffix("/chat/completions")
    return urlunsplit(parts._replace(path=path))


MAX_FRAME_INTERVAL_MS = 1000.0  # beyond, a stream would read as stalled, not smoothed


# A dead worker's turn is ended at most this long after its last renewal.
MAX_LEASE_S = 3600.0


def frame_interval_s(environ: Mapping[str, str]) -> float:
    """``CHAT_FRAME_INTERVAL_MS`` in seconds (0 to 1,000 ms)."""
    return env_float(environ, "CHAT_FRAME_INTERVAL_MS", Settings.frame_interval_s * 1000, maximum=MAX_FRAME_INTERVAL_MS) / 1000


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    provider: str = "demo"
    demo: DemoModelSettings = field(default_factory=DemoModelSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    concurrency: int = 16
    context_turns: int = 20
    queue_timeout_s: float = 30.0
    lease_s: float = 10.0  # a turn whose worker stops renewing for this long is ended by a buffer
    max_answer_bytes: int = 2 * 1024 * 1024  # a longer answer ends with done reason "length"
    drain_timeout_s: float = 20.0
    # The frame-rate cap per stream: text arriving sooner than this after the
    # turn's last frame waits for the window's end and goes out with what else
    # arrived (0: every model event is its own frame). 10 ms, not 20: at 50
    # tokens/s (20 ms apart) a 20 ms window held nearly every token without
    # merging any (p99 31.5 vs 18.3 ms), while at 500/s both merge. bench/analysis.md.
    frame_interval_s: float = 0.01
    health: HealthSettings = field(default_factory=HealthSettings)
    log_level: str = "INFO"

    @property
    def upstream_url(self) -> str:
        """Where the model is, for the log: no password, no query (a key may hide there); ``demo``."""
        return masked_url(self.openai.base_url).split("?", 1)[0] if self.provider == "openai" else "demo"

    def describe_model(self) -> dict[str, str]:
        """Which model answers, safe to log (no key): provider, and for ``openai`` the URL and model."""
        if self.provider != "openai":
            return {"provider": self.provider}
        return {"provider": "openai", "upstream": self.upstream_url, "model": self.openai.model}

    def unused_model_settings(self, environ: Mapping[str, str]) -> list[str]:
        """``CHAT_OPENAI_*`` variables set to something other than their default while
        the demo model answers: most likely ``CHAT_MODEL_PROVIDER=openai`` was forgotten."""
        if self.provider != "demo":
            return []
        defaults = OpenAISettings()
        default_of = {
            "CHAT_OPENAI_BASE_URL": defaults.base_url,
            "CHAT_OPENAI_MODEL": defaults.model,
            "CHAT_OPENAI_API_KEY_HEADER": defaults.api_key_header,
        }
        return sorted(
            name
            for name, value in environ.items()
            if name.startswith("CHAT_OPENAI_") and value and value.rstrip("/") != default_of.get(name, "")
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            broker=BrokerSettings.from_env(environ),
            provider=env_choice(environ, "CHAT_MODEL_PROVIDER", "demo", ("demo", "openai")),
            demo=DemoModelSettings(
                tokens_per_s=env_float(environ, "CHAT_DEMO_TOKENS_PER_S", 20.0, minimum=0.1),
                answer_tokens=env_int(environ, "CHAT_DEMO_ANSWER_TOKENS", 300, minimum=1),
            ),
            openai=OpenAISettings(
                base_url=base_url(environ),
                api_key=Secret(env_str(environ, "CHAT_OPENAI_API_KEY", "")),
                api_key_header=env_str(environ, "CHAT_OPENAI_API_KEY_HEADER", OpenAISettings.api_key_header).lower(),
                model=env_str(environ, "CHAT_OPENAI_MODEL", OpenAISettings.model),
                connect_timeout_s=env_float(environ, "CHAT_UPSTREAM_CONNECT_TIMEOUT_S", 10.0, minimum=0.1),
                read_timeout_s=env_float(environ, "CHAT_UPSTREAM_READ_TIMEOUT_S", 60.0, minimum=0.1),
                max_connections=env_int(environ, "CHAT_UPSTREAM_MAX_CONNECTIONS", 100, minimum=1),
                retries=env_int(environ, "CHAT_UPSTREAM_RETRIES", OpenAISettings.retries, minimum=0),
                retry_initial_s=env_float(
                    environ, "CHAT_UPSTREAM_RETRY_INITIAL_S", OpenAISettings.retry_initial_s, minimum=0.01
                ),
            ),
            concurrency=env_int(environ, "CHAT_WORKER_CONCURRENCY", 16, minimum=1),
            context_turns=env_int(environ, "CHAT_CONTEXT_TURNS", 20, minimum=0),
            queue_timeout_s=env_float(environ, "CHAT_QUEUE_TIMEOUT_S", 30.0, minimum=0.1, maximum=MAX_QUEUE_TIMEOUT_S),
            lease_s=env_float(environ, "CHAT_LEASE_S", 10.0, minimum=0.3, maximum=MAX_LEASE_S),
            max_answer_bytes=env_int(environ, "CHAT_MAX_ANSWER_BYTES", cls.max_answer_bytes, minimum=1),
            drain_timeout_s=env_float(environ, "CHAT_DRAIN_TIMEOUT_S", 20.0, minimum=0.0),
            frame_interval_s=frame_interval_s(environ),
            health=HealthSettings.from_env(environ),
            log_level=env_log_level(environ),
        )
