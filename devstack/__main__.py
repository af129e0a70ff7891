"""``make run``: NATS, Redis and the services on this machine, with the demo model.

Uses NATS on 127.0.0.1:4222 and Redis on 127.0.0.1:6379 when they already
answer (or ``CHAT_NATS_URL`` / ``CHAT_REDIS_URL`` when set); otherwise starts
the local binaries there, keeping their data in ``.run/`` (it says which,
with the URL, passwords masked). Then starts one buffer, ``CHAT_WORKERS``
workers (default 2) and a gateway, prints the chat page's URL, restarts a
service that dies, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.settings import masked_url

from .processes import ServiceProcess, defer_while_spawning
from .servers import LocalNats, LocalRedis, LocalServer, Server, port_open

RUN_DIR = Path(".run")


def _say(line: str) -> None:
    print(line, flush=True)


def _infra(
    env: dict[str, str],
    *,
    nats_port: int = 4222,
    redis_port: int = 6379,
    run_dir: Path = RUN_DIR,
    say: Callable[[str], None] = _say,
    started: list[Server] | None = None,
) -> list[Server]:
    """Reuse NATS and Redis where they answer; start the local binaries where
    not; say which (without passwords) either way. Returns the servers started
    (also appended to ``started`` as each starts, so a signal cannot orphan one)."""
    started = [] if started is None else started
    wanted: list[tuple[str, str, LocalServer]] = [
        ("CHAT_NATS_URL", "NATS", LocalNats(port=nats_port)),
        ("CHAT_REDIS_URL", "Redis", LocalRedis(port=redis_port)),
    ]
    for variable, label, server in wanted:
        if variable in env:
            say(f"using {label} at {masked_url(env[variable])} (from {variable})")
            continue
        if port_open("127.0.0.1", server.port):
            say(f"reusing the {label} already running at {server.url} (set {variable} to use another)")
        else:
            server.data_dir = str(run_dir / server.binary)
            Path(server.data_dir).mkdir(parents=True, exist_ok=True)
            say(f"starting {server.binary} at {server.url} (data in {server.data_dir})")
            started.append(server)  # first: stopped even if a signal comes while it starts
            server.start()
        env[variable] = server.url
    return started


def health_ports(env: dict[str, str], names: list[str], say: Callable[[str], None] = _say) -> dict[str, dict[str, str]]:
    """With ``CHAT_HEALTH_PORT`` set, one port each from it up (the buffer first, then
    the workers), said once; otherwise none. Returns each process's own settings."""
    first = int(env.get("CHAT_HEALTH_PORT") or 0)
    if not first:
        return {name: {} for name in names}
    host = env.get("CHAT_HEALTH_HOST", "127.0.0.1")
    ports = {name: first + index for index, name in enumerate(names)}
    say("health and metrics: " + ", ".join(f"{name} http://{host}:{port}/" for name, port in ports.items()))
    return {name: {"CHAT_HEALTH_PORT": str(port)} for name, port in ports.items()}


class _Stop(Exception):
    """SIGTERM or SIGINT: end the run."""


def _on_signal(signum: int, frame: object) -> None:
    # Raise in the main thread, wherever it waits (a service starting, the
    # watch loop), and ignore further signals while everything stops: a
    # handler that set a threading.Event could deadlock when a second signal
    # (make forwards the one it gets) arrived inside the first's set().
    # Ignored by a handler that does nothing, not SIG_IGN: a child started
    # meanwhile would inherit SIG_IGN and shrug off the SIGTERM that stops it.
    signal.signal(signal.SIGTERM, _after_stop)
    signal.signal(signal.SIGINT, _after_stop)
    if not defer_while_spawning(_Stop()):  # else raised once the child being started is recorded
        raise _Stop


def _after_stop(signum: int, frame: object) -> None:
    """Further signals while the run stops: nothing more to do."""


def main() -> None:
    env = dict(os.environ)
    # Dev mode: tokens optional, anonymous users; one secret shared by this run's gateways.
    env.setdefault("CHAT_AUTH_MODE", "dev")
    env.setdefault("CHAT_AUTH_SECRET", secrets.token_urlsafe(32))
    host, port = env.get("CHAT_HOST", "127.0.0.1"), env.get("CHAT_PORT", "8000")
    if port.isdigit() and port_open(host, int(port)):  # before anything starts, not after
        sys.exit(f"make run: {host}:{port} is already in use (another make run?); set CHAT_PORT to another port")
    servers: list[Server] = []
    services: list[ServiceProcess] = []
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        _infra(env, started=servers)
        workers = int(env.get("CHAT_WORKERS", "2"))
        names = ["buffer", *(f"worker{i + 1}" for i in range(workers))]
        own = health_ports(env, names)
        services.append(ServiceProcess("services.buffer", {**env, **own["buffer"]}, echo=sys.stdout))
        services += [
            ServiceProcess("services.llm_worker", {**env, **own[name]}, name=name, echo=sys.stdout)
            for name in names[1:]
        ]
        services.append(ServiceProcess("services.gateway", env, echo=sys.stdout))
        for service in services:
            service.start()
        print(f"\nchat page: http://{host}:{port}/\n", flush=True)
        while True:
            time.sleep(1.0)
            for service in services:
                if not service.alive:
                    print(f"{service.name} exited; restarting", flush=True)
                    time.sleep(1.0)
                    service.start()
    except _Stop:
        print("stopping", flush=True)
    except RuntimeError:  # a service did not start: its own lines (echoed above) say why
        failed = next((s.name for s in services if s.process is not None and not s.alive), "a service")
        print(f"make run: {failed} did not start; its last lines above say why", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        for service in reversed(services):
            service.stop()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
