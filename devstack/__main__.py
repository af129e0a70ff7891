"""``make run``: NATS, Redis and the services on this machine, with the demo model.

Uses NATS on 127.0.0.1:4222 and Redis on 127.0.0.1:6379 when they already
answer (or ``CHAT_NATS_URL`` / ``CHAT_REDIS_URL`` when set); otherwise starts
the local binaries there, keeping their data in ``.run/``. Then starts one
buffer, ``CHAT_WORKERS`` workers (default 2) and a gateway, prints the chat
page's URL, restarts a service that dies, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from .processes import ServiceProcess
from .servers import LocalNats, LocalRedis, Server, port_open

RUN_DIR = Path(".run")


def _infra(env: dict[str, str]) -> list[Server]:
    """Reuse NATS and Redis where they answer; start the local binaries where not."""
    started: list[Server] = []
    for variable, server in (("CHAT_NATS_URL", LocalNats(port=4222)), ("CHAT_REDIS_URL", LocalRedis(port=6379))):
        if variable in env:
            continue
        if not port_open("127.0.0.1", server.port):
            server.data_dir = str(RUN_DIR / server.binary)
            Path(server.data_dir).mkdir(parents=True, exist_ok=True)
            server.start()
            started.append(server)
            print(f"started {server.binary} on 127.0.0.1:{server.port}", flush=True)
        env[variable] = server.url
    return started


def main() -> None:
    env = dict(os.environ)
    # Dev mode: tokens optional, anonymous users; one secret shared by this run's gateways.
    env.setdefault("CHAT_AUTH_MODE", "dev")
    env.setdefault("CHAT_AUTH_SECRET", secrets.token_urlsafe(32))
    servers = _infra(env)
    workers = int(env.get("CHAT_WORKERS", "2"))
    services = [ServiceProcess("services.buffer", env, echo=sys.stdout)]
    services += [ServiceProcess("services.llm_worker", env, name=f"worker{i + 1}", echo=sys.stdout) for i in range(workers)]
    services.append(ServiceProcess("services.gateway", env, echo=sys.stdout))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        for service in services:
            service.start()
        host = env.get("CHAT_HOST", "127.0.0.1")
        port = env.get("CHAT_PORT", "8000")
        print(f"\nchat page: http://{host}:{port}/\n", flush=True)
        while not stopping.wait(1.0):
            for service in services:
                if not service.alive:
                    print(f"{service.name} exited; restarting", flush=True)
                    time.sleep(1.0)
                    service.start()
    finally:
        for service in reversed(services):
            service.stop()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
