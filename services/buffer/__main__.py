"""``python -m services.buffer``: run one buffer process."""

from __future__ import annotations

import os
import sys

from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.runner import Connections, run_service
from shared.store import SessionStore

from .service import Buffer
from .settings import Settings


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"buffer: {exc}")
    configure_logging("buffer", settings.log_level)

    def build(connections: Connections) -> Buffer:
        store = SessionStore(connections.redis, settings.retention)
        return Buffer(settings, nc=connections.nc, js=connections.js, store=store, streams=connections.streams)

    run_service("buffer", settings.broker, build, health=settings.health)


if __name__ == "__main__":
    main()
