"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.runner import Startup, listen_error

from .app import create_app
from .errors import error_response
from .settings import Settings
from .websocket import websocket_endpoint

# What the gateway answers while it waits for its brokers.
STARTUP_PATHS = frozenset({"/healthz", "/readyz"})
# The WebSocket endpoint's paths (app.py routes them too).
WEBSOCKET_PATHS = frozenset({"/", "/ws"})


def listening_socket(settings: Settings) -> socket.socket:
    """The gateway's listening socket; connections inherit its send buffer size.

    Bounding SO_SNDBUF keeps the kernel from buffering megabytes for a client
    that reads slowly: the send queue then fills and the client is closed
    with 1013, to catch up by replay (docs/architecture.md, bounds).
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.limits.send_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.limits.send_buffer_bytes)
        sock.bind((settings.host, settings.port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _served_while_starting(scope: Scope) -> bool:
    """Health, and the page with its files (it then shows that it is connecting)."""
    path = scope["path"]
    return path in STARTUP_PATHS or (scope["type"] == "http" and (path == "/" or path.startswith("/static/")))


class StartupGate:
    """Until the gateway's brokers answer, only /healthz (200), /readyz (503,
    saying what is awaited) and the page reach the app; other requests, WebSocket upgrades
    included, get 503 ``unavailable`` with ``Retry-After`` instead of failing on
    connections that do not exist yet.

    Once they answer, a WebSocket on /ws (or /) goes straight to its endpoint:
    Starlette's middleware and router add nothing to it (CORS and their error
    pages are HTTP's; the endpoint checks the origin and answers its own
    errors), and each of their frames would stay suspended for the
    connection's life (5 KiB per idle connection).
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not _served_while_starting(scope):
            startup: Startup | None = getattr(self.app.state, "startup", None)
            if startup is None or startup.connections is None:
                refusal = error_response(
                    "unavailable", "the gateway is starting; try again shortly", headers={"Retry-After": "2"}
                )
                if scope["type"] == "websocket":
                    await WebSocket(scope, receive, send).send_denial_response(refusal)
                else:
                    await refusal(scope, receive, send)
                return
        if scope["type"] == "websocket" and scope["path"] in WEBSOCKET_PATHS:
            scope["app"] = self.app  # as Starlette sets it: the endpoint reads app.state
            await websocket_endpoint(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    configure_logging("gateway", settings.log_level)
    try:
        sock = listening_socket(settings)
    except socket.gaierror as exc:
        sys.exit(f"gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror}; set CHAT_HOST")
    except OSError as exc:
        sys.exit(
            "gateway: " + listen_error(exc, settings.host, settings.port, port_setting="CHAT_PORT", host_setting="CHAT_HOST")
        )
    app = create_app(settings)
    config = uvicorn.Config(
        StartupGate(app),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=settings.limits.max_frame_bytes,
        ws_ping_interval=settings.timeouts.ping_interval_s,
        ws_ping_timeout=settings.timeouts.ping_timeout_s,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again
    # to the handler it found: these end the process quietly (no traceback
    # for Ctrl-C) once it has.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    startup: Startup | None = getattr(app.state, "startup", None)
    if startup is not None and startup.fatal:
        sys.exit(f"gateway: {startup.fatal}")


if __name__ == "__main__":
    main()
