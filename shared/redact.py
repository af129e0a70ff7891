"""Secrets kept out of logs and error messages: one place for what a secret looks like."""

from __future__ import annotations

import re

__all__ = ["redact_secrets"]

_CREDENTIAL = re.compile(
    r"\b((?i:bearer))\s+[\w.~+/=-]{8,}"  # a bearer token
    r"|\b(Basic)\s+(?=[A-Za-z0-9+/=]*\d)[A-Za-z0-9+/=]{12,}"  # basic credentials (base64, with a digit)
    r"|\b(sk-)[\w-]{8,}"  # an OpenAI-style key
)
# A browser can send its token only in the WebSocket URL (?token=…), so URLs in
# access lines carry it; other credential-like query parameters are masked too.
_QUERY_SECRET = re.compile(r"([?&](?i:token|access_token|id_token|api_key|apikey|key|password|secret)=)[^&#\s\"'\\]+")
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_URL_PASSWORD = re.compile(r"(://[^/\s:@\"']*):[^@\s/\"']+@")


def _masked(match: re.Match[str]) -> str:
    scheme, basic, prefix = match.groups()
    return f"{scheme} ***" if scheme else f"{basic} ***" if basic else f"{prefix}***"


def redact_secrets(text: str) -> str:
    """``text`` with bearer and basic credentials, API keys (``sk-…``), JWTs,
    secret query parameters (``?token=…``) and URL passwords replaced by ``***``."""
    text = _QUERY_SECRET.sub(r"\1***", text)
    text = _JWT.sub("***", text)
    text = _CREDENTIAL.sub(_masked, text)
    return _URL_PASSWORD.sub(r"\1:***@", text)
