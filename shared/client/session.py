"""The client's side of a session, without I/O.

:class:`SessionState` keeps the resume cursor, drops frames the client
already has, queues frames sent while offline, remembers chats not yet
acknowledged (resent after a reconnect unless ``ready.last_chat`` says the
server accepted it; while its turn generates the gateway also deduplicates a
resend by id) and the pause the user asked for. :func:`close_action` and
:func:`handshake_action` decide, purely, what a close code or a refused
handshake means for reconnecting.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ChatError
from ..protocol import (
    Accepted,
    Chat,
    Chunk,
    ClientFrame,
    Done,
    Error,
    Pause,
    Paused,
    Ready,
    Resume,
    Resumed,
    ServerFrame,
    decode_server_frame,
    encode,
)
from .display import clean_message

__all__ = [
    "CloseAction",
    "close_action",
    "handshake_action",
    "ClientClosed",
    "HandshakeRefused",
    "ChatRejected",
    "refusal",
    "Connected",
    "Disconnected",
    "Reconnecting",
    "GaveUp",
    "ConnectionEvent",
    "OfflineQueueFull",
    "GapDetected",
    "SessionState",
]


class CloseAction(enum.Enum):
    RECONNECT = "reconnect"
    REFRESH_TOKEN = "refresh_token"  # get a new token, then reconnect
    STOP = "stop"


def close_action(code: int | None) -> CloseAction:
    """What to do when the connection closed with ``code`` (None: no close frame).

    1012 (restarting), 1013 (try again later), going-away and network errors
    reconnect; 4001 refreshes the token first; 1008 (policy), 1009 (too big),
    4003 (forbidden) and other application codes stop.
    """
    if code is None or code in (1001, 1005, 1006, 1011, 1012, 1013, 1014):
        return CloseAction.RECONNECT
    if code == 4001:
        return CloseAction.REFRESH_TOKEN
    return CloseAction.STOP


def handshake_action(status: int, *, can_refresh: bool = True) -> CloseAction:
    """What to do when the gateway refused the upgrade with HTTP ``status``.

    401 asks for a new token when one can be had (``can_refresh``: there is a
    token provider and the token it just gave was not already refused), else
    stops: the same token, or none, is refused again however often it is sent.
    """
    if status == 401:
        return CloseAction.REFRESH_TOKEN if can_refresh else CloseAction.STOP
    if status in (408, 429) or status >= 500:
        return CloseAction.RECONNECT
    return CloseAction.STOP  # 400, 403 and other 4xx: retrying cannot help


MAX_CODE_CHARS = 64  # a refusal's code ("unauthorized"), as printed


class ClientClosed(ChatError):
    """The client was closed, or gave up reconnecting."""


class HandshakeRefused(ClientClosed):
    """The gateway refused the WebSocket upgrade with an HTTP status.

    ``status`` is the HTTP status; ``code`` and ``message`` are the server's
    reason from the refusal's body ``{"type":"error","code":…,"message":…}``
    (None when the body was not one: a proxy's page, say).
    """

    def __init__(self, status: int, code: str | None = None, message: str | None = None) -> None:
        self.status, self.code, self.message = status, code, message
        reason = f"the gateway refused the connection: HTTP {status}"
        if code:
            reason += f" {code}"
        if message:
            reason += f": {message}"
        super().__init__(reason)


class ChatRejected(ChatError):
    """The server answered a ``chat`` with an ``error`` (``busy``, ``too_big``, …)."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"the chat was refused: {code}: {message}")


def refusal(status: int, body: bytes | bytearray) -> HandshakeRefused:
    """The exception for a refused upgrade, with the server's reason read from its body.

    The body is the server's (or a proxy's) to choose: a reason is cleaned of
    control characters and escape sequences and cut to ~200 characters; JSON
    nested too deeply to read gives no reason (nor a traceback).
    """
    code = message = None
    text = bytes(body).decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text) if text else None
    except RecursionError:  # [[[[…]]]] deeper than the parser goes: nothing to show
        parsed, text = None, ""
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        message = clean_message(parsed["message"]) or None
        if isinstance(parsed.get("code"), str):
            code = clean_message(parsed["code"], MAX_CODE_CHARS) or None
    elif text and not text.startswith("<"):  # a plain-text reason; an HTML page says nothing useful
        message = clean_message(text) or None
    return HandshakeRefused(status, code, message)


# Connection events, given to the consumer beside the server's frames.


@dataclass(frozen=True, slots=True)
class Connected:
    session: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The client will try again in ``delay_s`` (attempt counts from 1).

    ``reason`` says why the last attempt to connect failed ("cannot reach
    ws://…: connection refused", a refused handshake); it is empty after a
    connection that ended, which :class:`Disconnected` reports.
    """

    delay_s: float
    attempt: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class GaveUp:
    """The client stopped for good; ``reason`` says why.

    ``code`` is the close code that ended it, if one did; ``error`` the
    exception the client raises from now on (a :class:`HandshakeRefused`
    with the HTTP status and the server's code and message for a refused
    upgrade).
    """

    reason: str
    code: int | None = None
    error: ClientClosed | None = None

    @property
    def exception(self) -> ClientClosed:
        return self.error if self.error is not None else ClientClosed(self.reason)


ConnectionEvent = Connected | Disconnected | Reconnecting | GaveUp


class OfflineQueueFull(ChatError):
    """More frames were sent while offline than the queue holds."""


class GapDetected(ChatError):
    """The server skipped a seq: the connection is dropped and resumed."""


class SessionState:
    """Everything the client remembers across connections.

    Args:
        session: the session to join, or None for a new one.
        last_seq: the highest seq the caller already has.
        max_queue: frames held while offline.
    """

    def __init__(self, *, session: str | None = None, last_seq: int = 0, max_queue: int = 100) -> None:
        self.session = session
        self.last_seq = last_seq
        self.max_queue = max_queue
        self.ready = False
        self.paused = False
        self.queue: deque[ClientFrame] = deque()
        self.unacknowledged: dict[str, Chat] = {}
        self.sent: set[str] = set()  # ids of unacknowledged chats written to some connection
        self.want_paused: bool | None = None
        self._to_send: list[str] = []

    def url(self, base: str, *, token: str | None = None) -> str:
        """The WebSocket URL to (re)connect to, carrying session and cursor."""
        parts = urlsplit(base)
        # Parsed and encoded once: a percent-encoded value in the base URL keeps its meaning.
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if self.session is not None:
            query["session"] = self.session
        query["last_seq"] = str(self.last_seq)
        if token:
            query["token"] = token
        return urlunsplit(parts._replace(query=urlencode(query)))

    # Sending -------------------------------------------------------------

    def send(self, frame: ClientFrame) -> ClientFrame:
        """Send now if connected and ready, else queue; return the frame sent.

        A ``chat`` without an id gets one, so a resend cannot start a second turn.

        Raises:
            OfflineQueueFull: offline, with ``max_queue`` frames already queued.
        """
        if isinstance(frame, Chat):
            if frame.id is None:
                frame = Chat(prompt=frame.prompt, id=uuid.uuid4().hex)
            assert frame.id is not None
            self.unacknowledged[frame.id] = frame
        elif isinstance(frame, Pause):
            self.want_paused = True
        elif isinstance(frame, Resume):
            self.want_paused = False
        if self.ready:
            self._to_send.append(encode(frame).decode())
            if isinstance(frame, Chat):
                self.sent.add(frame.id)  # type: ignore[arg-type]
        elif isinstance(frame, Chat):
            pass  # resent from ``unacknowledged`` once ready
        elif isinstance(frame, (Pause, Resume)):
            pass  # reconciled from ``want_paused`` once ready
        else:
            if len(self.queue) >= self.max_queue:
                raise OfflineQueueFull(f"{len(self.queue)} frames are already queued while offline (the limit)")
            self.queue.append(frame)
        return frame

    def data_to_send(self) -> list[str]:
        """Frames to write to the socket now, in order."""
        out, self._to_send = self._to_send, []
        return out

    # Receiving -----------------------------------------------------------

    def receive(self, data: str) -> list[ServerFrame]:
        """Take one server frame; return it, or nothing if it is a duplicate.

        Raises:
            ProtocolError: the data is not a server frame.
            GapDetected: the server skipped a seq (reconnect and resume).
        """
        frame = decode_server_frame(data)
        match frame:
            case Ready():
                return [frame, *self._on_ready(frame)]
            case Chunk() | Done():
                if frame.seq <= self.last_seq:
                    return []  # already delivered before a reconnect
                if frame.seq != self.last_seq + 1:
                    raise GapDetected(f"got seq {frame.seq} after {self.last_seq}")
                self.last_seq = frame.seq
            case Accepted(id=chat_id) | Error(id=chat_id):
                if chat_id is not None:
                    self.unacknowledged.pop(chat_id, None)
                    self.sent.discard(chat_id)
            case Paused():
                self.paused = True
                if self.want_paused:
                    self.want_paused = None
            case Resumed():
                self.paused = False
                if self.want_paused is False:
                    self.want_paused = None
            case _:
                pass
        return [frame]

    def _on_ready(self, ready: Ready) -> list[ServerFrame]:
        """Reconcile with the session as the server has it; return frames to
        report after ``ready`` (the ``accepted`` of a chat the connection lost)."""
        self.session = ready.session
        self.paused = ready.paused
        self.ready = True
        answered: list[ServerFrame] = []
        last = ready.last_chat
        if last is not None and last.id in self.sent:
            # Sent, and accepted before the connection dropped: resending it would
            # start a second turn once this one has ended (protocol.md, resent
            # chats). A chat never sent cannot be it, whatever its id.
            del self.unacknowledged[last.id]
            self.sent.discard(last.id)
            answered.append(Accepted(id=last.id, turn=last.turn))
        # Chats the server has not seen, then the pause the user wants,
        # then what was queued offline, in the order it was sent.
        for chat in self.unacknowledged.values():
            self._to_send.append(encode(chat).decode())
            self.sent.add(chat.id)  # type: ignore[arg-type]
        if self.want_paused is not None and self.want_paused != ready.paused:
            self._to_send.append(encode(Pause() if self.want_paused else Resume()).decode())
        else:
            self.want_paused = None
        while self.queue:
            self._to_send.append(encode(self.queue.popleft()).decode())
        return answered

    def connection_lost(self) -> None:
        """The socket is gone: queue from now on until the next ``ready``."""
        self.ready = False
        self._to_send.clear()
