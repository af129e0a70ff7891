"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import os
import socket
import sys

import uvicorn

from shared.errors import ConfigError
from shared.logs import configure_logging

from .app import create_app
from .settings import Settings


def listening_socket(settings: Settings) -> socket.socket:
    """The gateway's listening socket; connections inherit its send buffer size.

    Bounding SO_SNDBUF keeps the kernel from buffering megabytes for a client
    that reads slowly: the send queue then fills and the client is closed
    with 1013, to catch up by replay (docs/architecture.md, bounds).
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.limits.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.limits.send_buffer_bytes)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    configure_logging("gateway", settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
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
    server.run(sockets=[listening_socket(settings)])


if __name__ == "__main__":
    main()
