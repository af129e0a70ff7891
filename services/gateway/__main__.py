"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import os
import sys

import uvicorn

from shared.errors import ConfigError
from shared.logs import configure_logging

from .app import create_app
from .settings import Settings


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
    server.run()


if __name__ == "__main__":
    main()
