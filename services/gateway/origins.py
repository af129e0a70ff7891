"""Which browser pages may call the gateway, and CORS for those on another origin.

One policy guards both the WebSocket upgrade and every HTTP request
(docs/configuration.md, "Browser origins and CORS"):

- ``CHAT_ALLOWED_ORIGINS`` set: exactly those origins (``*`` for any).
- unset, dev mode: pages on this machine (``localhost``, ``127.0.0.1``,
  ``[::1]``, any port). Dev mode needs no token, so without this any web
  site a developer visits could start turns on their gateway with a simple
  cross-origin POST (the browser sends it without a preflight).
- unset, tokens required: any origin. Tokens travel in a header or the URL,
  never in cookies, so a foreign page has no credential to ride on.

Pages served from the gateway's own host name are allowed. Requests without
an ``Origin`` header (curl, the Python client, probes) are not a browser's
cross-origin calls and pass. In dev mode the ``Host`` must also be a name no
web site controls (``localhost``, an IP address, a listed origin's host), or
DNS rebinding would make a foreign page same-origin.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

__all__ = ["OriginPolicy", "BrowserOrigins"]

_LOOPBACK = re.compile(r"https?://(?:localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?")


def _hostname(authority: str) -> str:
    """The host of a ``Host`` header value (``host[:port]``, IPv6 in brackets), lower-cased."""
    return (urlsplit(f"//{authority}").hostname or "") if authority else ""


def _rebindable(hostname: str) -> bool:
    """True for a DNS name a foreign site could point at this machine (DNS
    rebinding); false for IP literals and ``localhost``, which no site controls."""
    if hostname == "localhost" or hostname.endswith(".localhost"):  # browsers resolve these to loopback themselves
        return False
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return True
    return False


@dataclass(frozen=True)
class OriginPolicy:
    origins: tuple[str, ...] = ("*",)  # exact origins (scheme://host[:port], no slash); "*" for any
    loopback: bool = False  # also any page on this machine
    # No token protects dev mode, so a request must also name this machine by a
    # name no foreign site controls (or a listed origin's): a site that rebinds
    # its DNS name to 127.0.0.1 sends its own name as Host, and its pages look
    # same-origin to the browser (no Origin on their GETs).
    check_host: bool = False

    @classmethod
    def from_settings(cls, listed: tuple[str, ...], *, dev: bool) -> OriginPolicy:
        if listed:
            return cls(origins=listed, check_host=dev)
        return cls(origins=(), loopback=True, check_host=True) if dev else cls()

    @property
    def any(self) -> bool:
        return "*" in self.origins

    def allows(self, origin: str) -> bool:
        """True when a page from ``origin`` (the ``Origin`` header's value) may call cross-origin."""
        origin = origin.rstrip("/")
        return self.any or origin in self.origins or (self.loopback and _LOOPBACK.fullmatch(origin) is not None)

    def allows_host(self, host: str | None) -> bool:
        """True unless dev mode's check refuses the ``Host`` header (a DNS name not listed)."""
        if not self.check_host or not host:
            return True
        try:
            hostname = _hostname(host)
            listed = {urlsplit(origin).hostname for origin in self.origins}
        except ValueError:  # a malformed Host (or port)
            return False
        return not _rebindable(hostname) or hostname in listed

    def allows_request(self, origin: str | None, host: str | None) -> bool:
        """True unless a browser page from a refused origin sent the request, or
        (dev mode) it names this machine by a name a foreign site could control.
        A page served by the gateway itself (its origin's host is the request's)
        is allowed."""
        if not self.allows_host(host):
            return False
        if origin is None or self.allows(origin):
            return True
        try:
            return bool(host) and urlsplit(origin).hostname == _hostname(host or "")
        except ValueError:  # a malformed Origin or Host
            return False

    def refusal(self, origin: str | None, host: str | None) -> str:
        """Why :meth:`allows_request` said no, for the error message."""
        if not self.allows_host(host):
            return (
                "in dev mode the gateway answers only to localhost or an IP address (a site could point another "
                "name at this machine); use one, or list the page's origin in CHAT_ALLOWED_ORIGINS"
            )
        return f"pages from {(origin or '')[:100]!r} may not call this gateway; add the origin to CHAT_ALLOWED_ORIGINS"


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

    def preflight_response(self, request_headers: Headers) -> Response:
        """Starlette's answer, with a refused preflight (a method or header not
        allowed) in the documented JSON error shape instead of plain text."""
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith(("access-control-", "vary"))}
        return error_response("invalid", f"{bytes(response.body).decode()} (allowed: GET, POST; headers "
                              "Authorization, Content-Type, Last-Event-ID, X-API-Key)", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if not self.policy.allows_request(origin, headers.get("host")):
                await error_response("forbidden", self.policy.refusal(origin, headers.get("host")))(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
