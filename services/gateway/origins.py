"""Which browser pages may call the gateway, and CORS for those on another origin.

One policy guards both the WebSocket upgrade and every HTTP request
(docs/configuration.md, "Browser origins"):

- ``CHAT_ALLOWED_ORIGINS`` set: exactly those origins (``*`` for any).
- unset, dev mode: pages on this machine (``localhost``, ``127.0.0.1``,
  ``[::1]``, any port). Dev mode needs no token, so without this any web
  site a developer visits could start turns on their gateway with a simple
  cross-origin POST (the browser sends it without a preflight).
- unset, tokens required: any origin. Tokens travel in a header or the URL,
  never in cookies, so a foreign page has no credential to ride on.

Pages served from the gateway's own host name are always allowed. Requests
without an ``Origin`` header (curl, the Python client, probes) are not a
browser's cross-origin calls and pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

__all__ = ["OriginPolicy", "BrowserOrigins"]

_LOOPBACK = re.compile(r"https?://(?:localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?")


def _hostname(authority: str) -> str:
    """The host of a ``Host`` header value (``host[:port]``, IPv6 in brackets), lower-cased."""
    return (urlsplit(f"//{authority}").hostname or "") if authority else ""


@dataclass(frozen=True)
class OriginPolicy:
    origins: tuple[str, ...] = ("*",)  # exact origins (scheme://host[:port], no slash); "*" for any
    loopback: bool = False  # also any page on this machine

    @classmethod
    def from_settings(cls, listed: tuple[str, ...], *, dev: bool) -> OriginPolicy:
        if listed:
            return cls(origins=listed)
        return cls(origins=(), loopback=True) if dev else cls()

    @property
    def any(self) -> bool:
        return "*" in self.origins

    def allows(self, origin: str) -> bool:
        """True when a page from ``origin`` (the ``Origin`` header's value) may call cross-origin."""
        origin = origin.rstrip("/")
        return self.any or origin in self.origins or (self.loopback and _LOOPBACK.fullmatch(origin) is not None)

    def allows_request(self, origin: str | None, host: str | None) -> bool:
        """True unless a browser page from a refused origin sent the request."""
        if origin is None or self.allows(origin):
            return True
        try:
            return bool(host) and urlsplit(origin).hostname == _hostname(host or "")
        except ValueError:  # a malformed Origin or Host
            return False

    def refusal(self, origin: str) -> str:
        shown = origin[:100]
        return f"pages from {shown!r} may not call this gateway; add the origin to CHAT_ALLOWED_ORIGINS"


class BrowserOrigins(CORSMiddleware):
    """Starlette's CORS middleware answering for :class:`OriginPolicy`, and a
    403 JSON error for any HTTP request a refused page sends (a CORS header
    alone would let a simple POST run; the browser hides only the answer)."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        super().__init__(
            app,
            allow_origins=("*",) if policy.any else (),
            allow_methods=("GET", "POST"),
            allow_headers=("Authorization", "Content-Type", "Last-Event-ID", "X-API-Key"),
            expose_headers=("X-Chat-Session", "X-Chat-Turn"),
            max_age=600,
        )
        self.policy = policy

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.allows(origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self.policy.allows_request(origin, headers.get("host")):
                await error_response("forbidden", self.policy.refusal(origin))(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
