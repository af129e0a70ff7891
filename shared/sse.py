"""Server-sent events: an incremental decoder and an encoder.

:class:`SSEDecoder` follows the WHATWG event-stream parsing rules: it accepts
events split across network reads or several in one read, CRLF/CR/LF line
ends, comments (keep-alives) and multi-line ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEDecoder", "encode_event"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes in, get complete events out."""

    def __init__(self, *, max_line_bytes: int = 1 << 20) -> None:
        self._buffer = b""
        self._max_line_bytes = max_line_bytes
        self._data: list[str] = []
        self._data_chars = 0  # an event of many data lines is bounded like one line
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events completed by ``chunk``.

        Raises:
            ValueError: a single line, or one event's data, exceeds ``max_line_bytes``.
        """
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across reads
        self._pending_cr = False
        self._buffer += chunk
        events: list[SSEEvent] = []
        lines = self._buffer.splitlines(keepends=True)
        self._buffer = b""
        for index, line in enumerate(lines):
            if not line.endswith((b"\n", b"\r")):
                self._buffer = line  # incomplete: wait for more
                if len(line) > self._max_line_bytes:
                    raise ValueError(
                        f"event-stream line of {len(line)} bytes exceeds {self._max_line_bytes}"
                    )
                break
            if line.endswith(b"\r") and index == len(lines) - 1:
                self._pending_cr = True
            event = self._line(line.rstrip(b"\r\n").decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment, used as keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_line_bytes:
                raise ValueError(f"event-stream event of over {self._max_line_bytes} characters of data")
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(
            data="\n".join(self._data), event=self._event or "message", id=self._id, retry=self._retry
        )
        self._data = []
        self._data_chars = 0
        self._event = ""
        self._retry = None
        return event


def encode_event(data: str | bytes, *, event: str | None = None, id: int | str | None = None) -> bytes:
    """Encode one event; ``data`` must not contain a bare CR (JSON never does)."""
    if isinstance(data, bytes):
        data = data.decode()
    parts = []
    if id is not None:
        parts.append(f"id: {id}\n")
    if event is not None:
        parts.append(f"event: {event}\n")
    for line in data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()
