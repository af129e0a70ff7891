"""The three services as real OS processes, started and waited for by log line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["ServiceProcess", "READY_MARKERS", "spawning", "defer_while_spawning"]


class _Spawn:
    active = False
    deferred: BaseException | None = None


@contextmanager
def spawning() -> Iterator[None]:
    """Around starting a child process and recording its ``Popen``: an
    exception a signal handler defers meanwhile (:func:`defer_while_spawning`)
    is raised once the child is recorded, so a stop that follows finds it.
    Raised inside ``Popen``, after the fork, it would leave the child running,
    known to nobody (``make run`` stopped while a service started)."""
    _Spawn.active = True
    try:
        yield
    finally:
        _Spawn.active = False
        deferred, _Spawn.deferred = _Spawn.deferred, None
        if deferred is not None:
            raise deferred


def defer_while_spawning(exc: BaseException) -> bool:
    """For a signal handler that raises: True if a child is being started and
    ``exc`` will be raised when :func:`spawning` ends; False: raise it now."""
    if _Spawn.active:
        _Spawn.deferred = exc
        return True
    return False

# The line each service logs once it can do its job (the gateway's port opens
# before that, to answer /healthz while it waits for NATS and Redis).
READY_MARKERS = {
    "services.gateway": '"event": "ready"',
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
    _new_line: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.name = self.name or self.module.rsplit(".", 1)[-1]

    def start(self, *, timeout_s: float = 30.0, wait: bool = True) -> None:
        """Start the process; unless ``wait`` is False, wait for its ready line."""
        if self.process is not None:
            self.process.wait(10)  # a restart: reap the previous process (killed or stopped)
        self._ready = threading.Event()
        marker = READY_MARKERS[self.module]
        with spawning():
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
        if not wait:
            return

        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not become ready:\n{self.output()}")

    def _on_line(self, line: str, marker: str, ready: threading.Event) -> None:
        with self._new_line:
            self.lines.append(line)
            self._new_line.notify_all()
        if self.echo is not None:
            self.echo.write(f"[{self.name}] {line}")
            self.echo.flush()
        if marker in line:
            ready.set()

    def output(self) -> str:
        with self._new_line:
            return "".join(self.lines)

    def wait_for_line(self, text: str, *, timeout_s: float = 30.0, after: int = 0) -> str:
        """The first output line containing ``text`` (from line number ``after``
        on), waiting up to ``timeout_s`` for it; RuntimeError if it does not
        come or the process ends first."""
        deadline = time.monotonic() + timeout_s
        with self._new_line:
            while True:
                for line in list(self.lines)[after:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.process is not None and self.process.poll() is not None and not self._pumping()):
                    raise RuntimeError(f"{self.name}: no line with {text!r}:\n{''.join(self.lines)}")
                self._new_line.wait(min(left, 0.2))

    def _pumping(self) -> bool:
        """Whether output may still arrive (the process's pipe is not closed yet)."""
        return self.process is not None and self.process.stdout is not None and not self.process.stdout.closed

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end; its exit code (RuntimeError if it does not end in time)."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name} did not exit within {timeout_s} s:\n{self.output()}") from None
        with self._new_line:  # let the pump read the last lines
            deadline = time.monotonic() + 5
            while self._pumping() and time.monotonic() < deadline:
                self._new_line.wait(0.05)
        return code

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
