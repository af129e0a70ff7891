"""Typed settings from the environment, shared by every service.

Each service has one frozen dataclass built by ``Settings.from_env(environ)``;
tests pass a dict. ``os.environ`` is read only by the services' ``__main__``.
A bad value is rejected at start-up naming the variable and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigError
from .redact import SECRET_PARAMS, redact_secrets, remember_secret

__all__ = [
    "Secret",
    "BrokerSettings",
    "RetentionSettings",
    "env_str",
    "env_int",
    "env_float",
    "env_bool",
    "env_choice",
    "env_log_level",
    "HealthSettings",
    "masked_url",
]


class Secret:
    """A string that never shows in ``repr`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str, *, mask_everywhere: bool = True) -> None:
        self._value = value
        if mask_everywhere:  # in every log line and error, whatever its shape
            remember_secret(value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def env_str(environ: Mapping[str, str], name: str, default: str) -> str:
    return environ.get(name, default)


def env_url(environ: Mapping[str, str], name: str, default: str, *, schemes: tuple[str, ...]) -> str:
    """An absolute URL with one of ``schemes`` and a host; ConfigError naming the variable otherwise."""
    raw = environ.get(name, default)
    try:
        parts = urlsplit(raw)
        valid = parts.scheme in schemes and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port out of range or not a number
        valid = False
    if not valid:
        expected = " or ".join(f"{scheme}://host[:port]/…" for scheme in schemes)
        raise ConfigError(f"Config '{name}' has value '{redact_secrets(raw)}'. Expected a URL like {expected}.")
    return raw


def env_int(
    environ: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Not a valid int.") from None
    if value < minimum:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Must be at least {minimum}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Must be at most {maximum}.")
    return value


def env_port(environ: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, 0 to 65535 (0: none, or any free one)."""
    return env_int(environ, name, default, minimum=0, maximum=65535)


def env_float(
    environ: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None
) -> float:
    """``name`` as a finite number in [``minimum``, ``maximum``], else ``default`` if unset;
    raises ConfigError naming the setting ("inf" and "nan" parse as floats but are refused)."""
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Not a valid float.") from None
    if not math.isfinite(value):
        raise ConfigError(f"Config '{name}' has value '{raw}'. Must be a finite number.")
    if value < minimum:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Must be at least {minimum:g}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Must be at most {maximum:g}.")
    return value


def env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Config '{name}' has value '{raw}'. Not a valid bool.")


def env_choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = environ.get(name, default)
    if raw not in choices:
        raise ConfigError(f"Config '{name}' has value '{raw}'. Expected one of {', '.join(choices)}.")
    return raw


def env_log_level(environ: Mapping[str, str]) -> str:
    return env_choice(environ, "CHAT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class HealthSettings:
    """Where a service without a web framework serves /healthz and /readyz (port 0: nowhere)."""

    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HealthSettings:
        return cls(
            host=env_str(environ, "CHAT_HEALTH_HOST", cls.host),
            port=env_port(environ, "CHAT_HEALTH_PORT", cls.port),
        )


_TOKEN_SCHEMES = ("nats", "tls", "ws", "wss")  # nats://TOKEN@host: a user name alone is a token


def masked_url(url: str) -> str:
    """``url`` (or comma-separated URLs) fit for a log: no password, no NATS token
    (``nats://TOKEN@host``), no ``?password=``; a URL that cannot be parsed is
    masked by :func:`~shared.redact.redact_secrets` instead."""
    return ",".join(_masked_one(one.strip()) for one in url.split(","))


def _masked_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")  # the last "@": a password may hold one
        if at:
            user, colon, _ = userinfo.partition(":")
            if colon:
                userinfo = f"{user}:***"
            elif parts.scheme in _TOKEN_SCHEMES:
                userinfo = "***"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hostport}", query=query))
    except ValueError:
        return redact_secrets(url)


def _broker_url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with a NATS or Redis URL, or None: caught here rather than as a
    client library's traceback (or, for a Redis database that is not a number, silently db 0)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        return f"Not a valid URL ({exc})."
    if parts.scheme not in schemes:
        return f"Expected a URL with scheme {' or '.join(schemes)}."
    if parts.scheme in ("redis", "rediss") and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "The database after the last '/' must be a number (redis://host:6379/0)."
    return None


@dataclass(frozen=True)
class BrokerSettings:
    """Where NATS and Redis are, and how big the Redis pool may grow."""

    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0", mask_everywhere=False)
    # 32 starved a worker holding a thousand turns: claims waited out the pool's
    # 5 s and their leases lapsed (bench, 1,000 x 30); 128 served it without loss.
    redis_max_connections: int = 128
    # JetStream storage of the generated-frames stream: "file" survives a
    # nats-server restart; "memory" loses what no buffer has stored yet
    # (docs/configuration.md).
    generated_storage: str = "file"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BrokerSettings:
        nats_url = env_str(environ, "CHAT_NATS_URL", cls.nats_url)
        redis_url = env_str(environ, "CHAT_REDIS_URL", str(cls.redis_url))
        for name, url, schemes in (
            ("CHAT_NATS_URL", nats_url, ("nats", "tls", "ws", "wss")),
            ("CHAT_REDIS_URL", redis_url, ("redis", "rediss", "unix")),
        ):
            for one in url.split(","):
                if problem := _broker_url_problem(one.strip(), schemes):
                    raise ConfigError(f"Config '{name}' has value '{masked_url(one)}'. {problem}")
        return cls(
            nats_url=nats_url,
            redis_url=Secret(redis_url, mask_everywhere=False),  # its password is masked as a URL's
            redis_max_connections=env_int(environ, "CHAT_REDIS_MAX_CONNECTIONS", cls.redis_max_connections, minimum=1),
            generated_storage=env_choice(environ, "CHAT_JS_STORAGE", cls.generated_storage, ("file", "memory")),
        )

    def describe(self) -> dict[str, str]:
        """The locations, safe to log."""
        return {"nats": masked_url(self.nats_url), "redis": masked_url(str(self.redis_url))}


@dataclass(frozen=True)
class RetentionSettings:
    """How long and how much of a session Redis keeps (docs/protocol.md, guarantee 1)."""

    retention_s: int = 86_400
    max_frames_per_session: int = 100_000
    max_history_turns: int = 500

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RetentionSettings:
        return cls(
            retention_s=env_int(environ, "CHAT_RETENTION_S", cls.retention_s, minimum=1),
            max_frames_per_session=env_int(
                environ, "CHAT_MAX_FRAMES_PER_SESSION", cls.max_frames_per_session, minimum=1
            ),
            max_history_turns=env_int(environ, "CHAT_MAX_HISTORY_TURNS", cls.max_history_turns, minimum=1),
        )
