"""The gateway's ASGI application: routes, and the process's connections opened
once in the lifespan and passed to every endpoint through ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from shared.auth import TokenService
from shared.runner import Startup, StartupFailed, open_connections, stop_process
from shared.store import SessionStore

from . import errors, http
from .controls import Gateway
from .feed import SessionFeed, resync
from .origins import BrowserOrigins
from .settings import Settings
from .websocket import websocket_endpoint

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The port opens at once; the brokers are awaited in the background:
        # meanwhile /healthz answers, /readyz says what is awaited, the rest
        # gets 503 (StartupGate, __main__) and a signal stops the gateway.
        feeds: set[SessionFeed] = set()
        startup = Startup()
        app.state.startup = startup

        async def start() -> None:
            try:
                connections = await open_connections(
                    settings.broker, name="gateway", on_reconnect=lambda: resync(feeds), startup=startup
                )
            except StartupFailed as exc:
                startup.fatal = str(exc)  # __main__ exits with it
                stop_process()
                return
            except Exception as exc:
                log.exception("gateway start-up failed", extra={"event": "startup_failed"})
                startup.fatal = f"start-up failed: {exc!r}"
                stop_process()
                return
            app.state.gateway = Gateway(
                settings=settings,
                nc=connections.nc,
                js=connections.js,
                store=SessionStore(connections.redis, settings.retention),
                tokens=TokenService(settings.auth),
                streams=connections.streams,
                feeds=feeds,
            )
            app.state.connections = connections
            startup.connections = connections  # ready: /readyz runs the same checks as every service
            log.info("gateway ready", extra={"event": "ready", "auth": settings.auth.mode, **settings.broker.describe()})

        starting = asyncio.create_task(start(), name="gateway-startup")
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if startup.connections is not None:
                await startup.connections.close()

    h = http.routes_handlers
    routes = [
        Route("/", h["page"]),
        WebSocketRoute("/", websocket_endpoint),
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/ws", errors.websocket_only),
        Route("/api/chat", h["chat"], methods=["POST"]),
        Route("/api/token", h["issue_token"], methods=["POST"]),
        Route("/api/token/refresh", h["refresh_token"], methods=["POST"]),
        Route("/api/sessions/{session}/events", h["events"]),
        Route("/api/sessions/{session}/pause", h["pause"], methods=["POST"]),
        Route("/api/sessions/{session}/resume", h["resume"], methods=["POST"]),
        Route("/api/sessions/{session}/stop", h["stop"], methods=["POST"]),
        Route("/api/sessions/{session}/history", h["history"]),
        Route("/healthz", h["healthz"]),
        Route("/readyz", h["readyz"]),
        Route("/metrics", h["metrics"]),
        WebSocketRoute("/static/{path:path}", errors.unknown_socket),  # StaticFiles would refuse it bare
        Mount("/static", StaticFiles(directory=http.STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(BrowserOrigins, policy=settings.origins)],
        exception_handlers={HTTPException: errors.http_exception},
    )
    app.router.default = errors.not_found
    errors.quiet_denials()
    return app
