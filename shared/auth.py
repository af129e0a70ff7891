"""Access tokens: settings, issuing and verifying (PyJWT), without I/O.

Two modes (``CHAT_AUTH_MODE``):

- ``required``: every API call and WebSocket needs a valid token; only the
  page, health, metrics and static files answer without one. Tokens come
  from ``POST /api/token`` with an API key, or from the deployment's own
  identity provider (RS256/ES256, verified with its public key).
- ``dev`` (what ``make run`` uses): a token is optional; requests without
  one are anonymous, and ``POST /api/token`` issues one to anyone.

A token carries the user (``sub``) and an expiry (``exp``); sessions belong to
the first user that uses them.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt

from .errors import ConfigError, ProtocolError
from .settings import Secret, env_choice, env_int, env_str
from .subjects import SESSION_ID_PATTERN

__all__ = ["AuthSettings", "Principal", "TokenService", "ANONYMOUS"]

ALGORITHMS = ("HS256", "RS256", "ES256")


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``user`` is None for an anonymous caller (dev mode)."""

    user: str | None
    exp: int | None = None


ANONYMOUS = Principal(user=None)


def _key(environ: Mapping[str, str], name: str) -> str:
    """A PEM key given inline or as ``@/path/to/key.pem``."""
    raw = env_str(environ, name, "")
    if raw.startswith("@"):
        try:
            return Path(raw[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"Config '{name}' names '{raw[1:]}', which cannot be read: {exc.strerror}.") from None
    return raw.replace("\\n", "\n")


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "required"
    algorithm: str = "HS256"
    secret: Secret = Secret("")
    public_key: str = ""
    private_key: Secret = Secret("")
    api_keys: tuple[Secret, ...] = ()
    token_ttl_s: int = 900
    grace_s: int = 10
    leeway_s: int = 30  # clock skew tolerated on exp, nbf and iat (RFC 7519 section 4.1.4)
    audience: str = ""
    issuer: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthSettings:
        mode = env_choice(environ, "CHAT_AUTH_MODE", cls.mode, ("required", "dev"))
        algorithm = env_choice(environ, "CHAT_AUTH_ALGORITHM", cls.algorithm, ALGORITHMS)
        secret = env_str(environ, "CHAT_AUTH_SECRET", "")
        public_key = _key(environ, "CHAT_AUTH_PUBLIC_KEY")
        if algorithm == "HS256" and not secret:
            if mode == "required":
                raise ConfigError("Config 'CHAT_AUTH_SECRET' is missing. It is required when CHAT_AUTH_MODE=required.")
            secret = secrets.token_urlsafe(32)  # dev: tokens valid on this process only
        if algorithm == "HS256" and len(secret) < 16:
            raise ConfigError("Config 'CHAT_AUTH_SECRET' is too short. Use at least 16 characters.")
        if algorithm != "HS256" and not public_key:
            raise ConfigError(f"Config 'CHAT_AUTH_PUBLIC_KEY' is missing. It is required with {algorithm}.")
        keys = tuple(Secret(k.strip()) for k in env_str(environ, "CHAT_API_KEYS", "").split(",") if k.strip())
        return cls(
            mode=mode,
            algorithm=algorithm,
            secret=Secret(secret),
            public_key=public_key,
            private_key=Secret(_key(environ, "CHAT_AUTH_PRIVATE_KEY")),
            api_keys=keys,
            token_ttl_s=env_int(environ, "CHAT_TOKEN_TTL_S", cls.token_ttl_s, minimum=1),
            grace_s=env_int(environ, "CHAT_AUTH_GRACE_S", cls.grace_s, minimum=0),
            leeway_s=env_int(environ, "CHAT_AUTH_LEEWAY_S", cls.leeway_s, minimum=0),
            audience=env_str(environ, "CHAT_AUTH_AUDIENCE", ""),
            issuer=env_str(environ, "CHAT_AUTH_ISSUER", ""),
        )

    @property
    def required(self) -> bool:
        return self.mode == "required"


def _unauthorized(message: str) -> ProtocolError:
    return ProtocolError(message, code="unauthorized")


class TokenService:
    """Issues and verifies access tokens.

    Raises (from every method): :class:`ProtocolError` with code
    ``unauthorized`` for a missing, malformed, expired or foreign token.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        hs = settings.algorithm == "HS256"
        self._verify_key = str(settings.secret) if hs else settings.public_key
        self._sign_key = str(settings.secret) if hs else str(settings.private_key)

    @property
    def can_issue(self) -> bool:
        return bool(self._sign_key)

    def issue(self, user: str, *, now: float | None = None) -> tuple[str, int]:
        """A new token for ``user``; returns (token, exp)."""
        if SESSION_ID_PATTERN.fullmatch(user) is None:
            raise ProtocolError("user must match ^[A-Za-z0-9_-]{1,64}$")
        issued = int(time.time() if now is None else now)
        exp = issued + self.settings.token_ttl_s
        claims: dict[str, object] = {"sub": user, "iat": issued, "exp": exp}
        if self.settings.audience:
            claims["aud"] = self.settings.audience
        if self.settings.issuer:
            claims["iss"] = self.settings.issuer
        return jwt.encode(claims, self._sign_key, algorithm=self.settings.algorithm), exp

    def verify(self, token: str) -> Principal:
        """The principal a token proves; ``exp``, ``nbf`` and ``iat`` are checked
        with ``CHAT_AUTH_LEEWAY_S`` of clock skew either way."""
        options = {"require": ["exp", "sub"], "verify_aud": bool(self.settings.audience)}
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.settings.algorithm],
                options=options,  # type: ignore[arg-type]
                audience=self.settings.audience or None,
                issuer=self.settings.issuer or None,
                # Hosts' clocks differ: a token minted a second "in the future"
                # by another gateway or an identity provider is still good.
                leeway=self.settings.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("the token is not valid yet; check the clocks of its issuer and this server") from None
        except jwt.InvalidTokenError:
            raise _unauthorized("the token is not valid") from None
        user = claims.get("sub")
        if not isinstance(user, str) or SESSION_ID_PATTERN.fullmatch(user) is None:
            raise _unauthorized("the token's subject is not a valid user id")
        return Principal(user=user, exp=int(claims["exp"]))

    def principal(self, token: str | None) -> Principal:
        """The caller of a request carrying ``token`` (None when it carries none)."""
        if token:
            return self.verify(token)
        if self.settings.required:
            raise _unauthorized("a token is required: get one from POST /api/token")
        return ANONYMOUS

    def api_key_valid(self, key: str | None) -> bool:
        return key is not None and any(hmac.compare_digest(key, str(k)) for k in self.settings.api_keys)
