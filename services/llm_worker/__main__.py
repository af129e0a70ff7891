"""``python -m services.llm_worker``: run one worker process."""

from __future__ import annotations

import logging
import os
import sys

from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.runner import Connections, run_service
from shared.settings import RetentionSettings
from shared.store import SessionStore

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
    unused = settings.unused_model_settings(os.environ)
    if unused:
        logging.getLogger(__name__).warning(
            f"the demo model answers, though {', '.join(unused)} is set: set CHAT_MODEL_PROVIDER=openai to use that model",
            extra={"event": "unused_settings"},
        )

    def build(connections: Connections) -> Worker:
        provider = create_provider(settings.provider, demo=settings.demo, openai=settings.openai)
        store = SessionStore(connections.redis, retention)
        return Worker(settings, nc=connections.nc, js=connections.js, store=store, provider=provider, streams=connections.streams)

    run_service(
        "llm_worker", settings.broker, build, health=settings.health
    )


if __name__ == "__main__":
    main()
