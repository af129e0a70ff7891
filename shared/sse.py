"""Server-sent events: an incremental decoder and an encoder.

:class:`SSEDecoder` follows the WHATWG event-stream parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
events split across network reads or several in one read; CRLF, CR or LF
line ends (a CRLF split between two reads included); one leading UTF-8 byte
order mark stripped; comments; ``data`` with or without the space after the
colon, on several lines joined by LF; ``event``, ``id`` (kept across events,
ignored if it holds NUL) and ``retry`` (digits only); a line without a colon
is a field with an empty value; unknown fields are ignored; an event without
``data`` lines is not dispatched.

Two departures, both for model servers that call themselves OpenAI-compatible:

- an ``error`` field (llama.cpp's server writes streaming errors as
  ``error: {...}``, ``server_sent_event(sink, "error", ...)`` in its
  ``server.cpp``) makes its event dispatch with type ``error`` and that value
  as data, even without ``data`` lines;
- :meth:`SSEDecoder.close` dispatches an event whose lines all arrived but
  whose closing blank line did not (a server that ends the body right after
  its last line), where the spec discards it. :attr:`SSEDecoder.truncated`
  then says whether the body ended inside a line: cut mid-event.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEDecoder", "encode_event"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes in, get complete events out."""

    _lf_paths = True  # False sends every read through the general loop (tests compare the two)

    def __init__(self, *, max_line_bytes: int = 1 << 20) -> None:
        self._head = b""  # the first bytes, while a BOM may still be arriving
        self._partial: list[bytes] = []  # an incomplete line's pieces, joined once its end arrives
        self._partial_bytes = 0
        self._max_line_bytes = max_line_bytes
        self._data: list[str] = []
        self._data_chars = 0  # an event of many data lines is bounded like one line
        self._error: str | None = None
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._pending_cr = False
        self._started = False  # past the first bytes, where a BOM may be
        self.truncated = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events completed by ``chunk``.

        Raises:
            ValueError: a single line, or one event's data, exceeds ``max_line_bytes``.
        """
        if not self._started:
            self._head += chunk
            if len(self._head) < len(_BOM) and _BOM.startswith(self._head):
                return []  # maybe a BOM split across reads: wait for more
            chunk, self._head = self._head.removeprefix(_BOM), b""
            self._started = True
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across reads
        self._pending_cr = False
        if b"\r" in chunk or not self._lf_paths:
            # The general loop, for reads holding a CR: CRLF, CR and LF line ends alike.
            buffered = b"".join(self._partial) + chunk
            self._partial, self._partial_bytes = [], 0
            events: list[SSEEvent] = []
            lines = buffered.splitlines(keepends=True)
            for index, line in enumerate(lines):
                if not line.endswith((b"\n", b"\r")):
                    self._keep_partial(line)  # incomplete: wait for more
                    break
                if line.endswith(b"\r") and index == len(lines) - 1:
                    self._pending_cr = True
                event = self._line(line.rstrip(b"\r\n").decode("utf-8", errors="replace"))
                if event is not None:
                    events.append(event)
            return events
        if b"\n" not in chunk:
            # Still inside a line: keep the piece, without copying what came before
            # (a long line in small reads would otherwise cost quadratic time).
            self._keep_partial(chunk)
            return []
        if (
            # The common read: one whole "data: ...\n\n" event and nothing pending. Decoding the
            # value alone equals decoding the line and cutting "data:" off (ASCII never joins a
            # UTF-8 sequence); a chunk within max_line_bytes cannot exceed the data bound.
            chunk.endswith(b"\n\n")
            and chunk.startswith(b"data:")
            and chunk.find(b"\n") == len(chunk) - 2
            and not self._partial
            and not self._data
            and self._error is None
            and not self._event
            and len(chunk) <= self._max_line_bytes
        ):
            value = chunk[6:-2] if chunk.startswith(b" ", 5) else chunk[5:-2]
            retry, self._retry = self._retry, None  # a retry field holds for one event (_dispatch)
            return [SSEEvent(value.decode("utf-8", "replace"), "message", self._id, retry)]
        # LF line ends only: split on bytes and match "data:" without decoding the field name.
        if self._partial:
            chunk = b"".join(self._partial) + chunk
            self._partial, self._partial_bytes = [], 0
        lines = chunk.split(b"\n")
        rest = lines.pop()  # after the last LF: an incomplete line, or b""
        events = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line.startswith(b"data:"):
                self._data_value((line[6:] if line.startswith(b" ", 5) else line[5:]).decode("utf-8", "replace"))
            else:
                self._line(line.decode("utf-8", "replace"))
        if rest:
            self._keep_partial(rest)
        return events

    def _keep_partial(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_bytes += len(piece)
        if self._partial_bytes > self._max_line_bytes:
            raise ValueError(f"an event-stream line exceeds {self._max_line_bytes} bytes")

    def close(self) -> list[SSEEvent]:
        """The body ended: the last event, if its lines all arrived without
        its blank line; sets :attr:`truncated` if it ended inside a line."""
        self.truncated = bool(b"".join(self._partial + [self._head]).strip())
        self._partial, self._partial_bytes, self._head = [], 0, b""
        event = None if self.truncated else self._dispatch()
        return [event] if event is not None else []

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment, used as keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_value(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value)
        elif field == "error":
            self._error = value  # llama.cpp's server (module docstring)
        return None

    def _data_value(self, value: str) -> None:
        self._data_chars += len(value) + 1
        if self._data_chars > self._max_line_bytes:
            raise ValueError(f"event-stream event of over {self._max_line_bytes} characters of data")
        self._data.append(value)

    def _dispatch(self) -> SSEEvent | None:
        if not self._data and self._error is None:
            self._event = ""
            return None
        if self._data:
            event = SSEEvent(
                data="\n".join(self._data), event=self._event or "message", id=self._id, retry=self._retry
            )
        else:
            event = SSEEvent(data=self._error or "", event="error", id=self._id, retry=self._retry)
        self._data = []
        self._data_chars = 0
        self._error = None
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
