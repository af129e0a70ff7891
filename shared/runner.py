"""Run a NATS+Redis service until SIGTERM/SIGINT (the worker's and buffer's ``__main__``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["Stoppable", "run_until_signal"]


class Stoppable(Protocol):
    def stop(self) -> None: ...

    async def run(self) -> None: ...


def run_until_signal(build: Callable[[], Awaitable[tuple[Stoppable, Callable[[], Awaitable[None]]]]]) -> None:
    """Build the service, run it, stop it on the first signal, then clean up."""

    async def main() -> None:
        service, cleanup = await build()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        try:
            await service.run()
        finally:
            await cleanup()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(main())
