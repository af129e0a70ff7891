"""``python -m services.llm_worker``: run one worker process."""

from __future__ import annotations

import os
import sys

from shared.broker import connect_nats, ensure_streams
from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.runner import run_until_signal
from shared.settings import RetentionSettings
from shared.store import SessionStore, connect_redis

from .providers import create_provider
from .service import Worker
from .settings import Settings


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
        retention = RetentionSettings.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"llm_worker: {exc}")
    configure_logging("llm_worker", settings.log_level)

    async def build():  # type: ignore[no-untyped-def]
        nc = await connect_nats(settings.broker.nats_url, name="llm_worker")
        js = nc.jetstream()
        await ensure_streams(js)
        redis = connect_redis(settings.broker)
        provider = create_provider(settings.provider, demo=settings.demo, openai=settings.openai)
        worker = Worker(settings, nc=nc, js=js, store=SessionStore(redis, retention), provider=provider)

        async def cleanup() -> None:
            await provider.aclose()
            await nc.drain()
            await redis.aclose()

        return worker, cleanup

    run_until_signal(build)


if __name__ == "__main__":
    main()
