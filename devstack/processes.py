"""The three services as real OS processes, started and waited for by log line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["ServiceProcess", "READY_MARKERS"]

# The line each service logs once it can do its job.
READY_MARKERS = {
    "services.gateway": "Application startup complete",
    "services.llm_worker": '"event": "ready"',
    "services.buffer": '"event": "ready"',
}


@dataclass
class ServiceProcess:
    """``python -m <module>`` with ``env``; its output is kept (and echoed to ``echo``)."""

    module: str
    env: Mapping[str, str]
    name: str = ""
    echo: TextIO | None = None
    process: subprocess.Popen[str] | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=5000))
    _ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.name = self.name or self.module.rsplit(".", 1)[-1]

    def start(self, *, timeout_s: float = 30.0) -> None:
        if self.process is not None:
            self.process.wait(10)  # a restart: reap the previous process (killed or stopped)
        self._ready = threading.Event()
        marker = READY_MARKERS[self.module]
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        process, ready = self.process, self._ready

        def pump() -> None:
            assert process.stdout is not None
            with process.stdout:  # closed at EOF, when the process exits
                for line in process.stdout:
                    self._on_line(line, marker, ready)

        threading.Thread(target=pump, daemon=True).start()

        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not become ready:\n{self.output()}")

    def _on_line(self, line: str, marker: str, ready: threading.Event) -> None:
        self.lines.append(line)
        if self.echo is not None:
            self.echo.write(f"[{self.name}] {line}")
            self.echo.flush()
        if marker in line:
            ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
