"""Secrets kept out of logs and error messages: one place for what a secret looks like."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

__all__ = ["SECRET_PARAMS", "redact_secrets", "remember_secret"]

# Secrets this process was configured with (keys, passwords): masked wherever
# they appear, whatever their shape. Filled by shared.settings.Secret.
_KNOWN: set[str] = set()
MIN_KNOWN_CHARS = 8  # shorter values would mask ordinary words

_CREDENTIAL = re.compile(
    r"\b((?i:bearer))\s+[\w.~+/=-]{8,}"  # a bearer token
    r"|\b(Basic)\s+(?=[A-Za-z0-9+/=]*\d)[A-Za-z0-9+/=]{12,}"  # basic credentials (base64, with a digit)
    r"|\b(sk-)[\w-]{8,}"  # an OpenAI-style key
)
# A browser can send its token only in the WebSocket URL (?token=…), so URLs in
# log lines carry it. A parameter is judged by its decoded name: "%74oken=" is
# "token=" to the gateway, so it must be to the mask too.
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#\s\"'\\]{1,64})=([^&;#\s\"'\\]*)")
SECRET_PARAMS = frozenset(
    {"token", "access_token", "id_token", "api_key", "apikey", "key", "password", "pass", "secret", "auth"}
)
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
# Up to the authority's last "@": a password may hold one. A NATS token (nats://TOKEN@host) too.
_URL_PASSWORD = re.compile(r"(://[^/\s:@\"']*):[^\s/\"']+@")
_URL_TOKEN = re.compile(r"\b((?:nats|tls)://)[^/\s:@\"']+@")


def _masked_param(match: re.Match[str]) -> str:
    separator, name, _ = match.groups()
    return f"{separator}{name}=***" if unquote_plus(name).lower() in SECRET_PARAMS else match.group(0)


def _masked(match: re.Match[str]) -> str:
    scheme, basic, prefix = match.groups()
    return f"{scheme} ***" if scheme else f"{basic} ***" if basic else f"{prefix}***"


def remember_secret(value: str) -> None:
    """Mask ``value`` in every later :func:`redact_secrets` (values under 8 characters are not)."""
    if len(value) >= MIN_KNOWN_CHARS:
        _KNOWN.add(value)


def redact_secrets(text: str) -> str:
    """``text`` with this process's configured secrets, bearer and basic
    credentials, API keys (``sk-…``), JWTs, secret query parameters
    (``?token=…``) and URL passwords replaced by ``***``."""
    for secret in _KNOWN:
        if secret in text:
            text = text.replace(secret, "***")
    text = _QUERY_PARAM.sub(_masked_param, text)
    text = _JWT.sub("***", text)
    text = _CREDENTIAL.sub(_masked, text)
    text = _URL_TOKEN.sub(r"\1***@", text)
    return _URL_PASSWORD.sub(r"\1:***@", text)
