"""``python -m services.buffer``: run one buffer process."""

from __future__ import annotations

import os
import sys

from shared.broker import connect_nats, ensure_streams
from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.runner import run_until_signal
from shared.store import SessionStore, connect_redis

from .service import Buffer
from .settings import Settings


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"buffer: {exc}")
    configure_logging("buffer", settings.log_level)

    async def build():  # type: ignore[no-untyped-def]
        nc = await connect_nats(settings.broker.nats_url, name="buffer")
        js = nc.jetstream()
        await ensure_streams(js)
        redis = connect_redis(settings.broker)
        buffer = Buffer(settings, nc=nc, js=js, store=SessionStore(redis, settings.retention))

        async def cleanup() -> None:
            await nc.drain()
            await redis.aclose()

        return buffer, cleanup

    run_until_signal(build)


if __name__ == "__main__":
    main()
