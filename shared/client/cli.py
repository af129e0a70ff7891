"""``chatrelay``: chat from the terminal through the reconnecting client.

    chatrelay chat "Tell me about rivers"            # stream one answer
    chatrelay chat --session abc "and the sea?"      # continue a conversation
    chatrelay chat                                   # interactive; p/r/s pause, resume, stop

The answer goes to stdout and nothing else does, so it can be piped; the
session id, connection trouble ("cannot reach …; retrying in 2.0 s"),
reconnects and errors go to stderr on lines of their own. Ctrl-C while an
answer streams stops it; a second Ctrl-C, or one at the idle prompt, quits.
The p/r/s keys need stdin to be a terminal (piped prompts are just lines).

What the server sends is printed cleaned: the answer without escape sequences
and control characters (newlines and tabs kept), messages as one short line.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import math
import os
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import NoReturn, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from ..backoff import Backoff
from ..errors import ProtocolError
from ..protocol import Accepted, AuthOk, Chunk, Done, Error, Paused, Pong, Ready, Resumed
from ..redact import redact_secrets
from ..subjects import validate_session_id
from .connection import ChatClient, ClientClosed, Event
from .display import clean_message, clean_text
from .session import Connected, Disconnected, GaveUp, HandshakeRefused, Reconnecting

__all__ = ["main", "run_turn"]

EXIT_OK, EXIT_ERROR, EXIT_GAVE_UP, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_USAGE = 2  # a bad argument, as argparse
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, as other pipe writers
MAX_HISTORY_BYTES = 64 * 1024 * 1024  # a history body past this is not read (a long session's is MBs)
MAX_SEQ = 2**63 - 1
DEFAULT_URL = "ws://127.0.0.1:8000/ws"
DEFAULT_CONNECT_TIMEOUT_S = 30.0

Inbox = asyncio.Queue[Event | None]  # the client's events for the running turn; None: the client stopped


class Terminal:
    """Writes the answer to ``out`` and notices to ``err``, each notice on its own line."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.mid_line = False  # the answer's last character was not a newline

    def text(self, text: str) -> None:
        """Print the answer's text (the model's, so cleaned of escape sequences)."""
        text = clean_text(text)
        self.out.write(text)
        self.out.flush()
        if text:
            self.mid_line = not text.endswith("\n")

    def notice(self, message: str) -> None:
        """Print a notice on a line of its own: parts from the server were cut
        already; here control characters go (whatever their source), and
        credentials (a URL's password) are masked."""
        message = redact_secrets(clean_message(message, limit=None))
        # On a terminal, start the notice on a fresh line; a pipe gets none of it.
        prefix = "\n" if self.mid_line and self.out.isatty() and self.err.isatty() else ""
        self.err.write(f"{prefix}[{message}]\n")
        self.err.flush()

    def end_answer(self) -> None:
        if self.mid_line:
            self.text("\n")


def describe(event: Event) -> str | None:
    """A one-line notice for connection events and errors, or None; the
    server's words in it cleaned and cut (:func:`clean_message`)."""
    match event:
        case Reconnecting(delay_s=delay, attempt=attempt, reason=reason) if reason:
            return f"{reason}; retrying in {delay:.1f} s (attempt {attempt})"
        case Reconnecting(delay_s=delay, attempt=attempt):
            return f"reconnecting in {delay:.1f} s, attempt {attempt}"
        case Disconnected(code=code, reason=reason):
            reason = clean_message(reason)
            return f"disconnected ({code or 'network'}{': ' + reason if reason else ''})"
        case GaveUp(reason=reason, error=error):
            hint = ""
            if isinstance(error, HandshakeRefused) and error.status == 401:
                hint = " (pass a valid token with --token or CHAT_TOKEN)"
            return f"{reason}{hint}" if reason.startswith("gave up") else f"gave up: {reason}{hint}"
        case Error(code=code, message=message):
            return f"error {clean_message(code)}: {clean_message(message)}"
        case Paused():
            return "paused"
        case Resumed():
            return "resumed"
    return None


class Chat:
    """The CLI's side of one client: notices as events happen, the running turn, Ctrl-C."""

    def __init__(self, client: ChatClient, term: Terminal) -> None:
        self.client, self.term = client, term
        self.inbox: Inbox = asyncio.Queue()
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()  # the client gave up (or stopped): nothing more will come
        self.turn_running = False  # a chat was sent and its done has not come
        self.stop_sent = False  # Ctrl-C already stopped the running turn
        self._tasks: set[asyncio.Task[None]] = set()

    async def pump(self) -> None:
        """Print notices the moment events happen (also between turns, and
        before the first connection) and pass the rest to the running turn."""
        async for event in self.client.events():
            if isinstance(event, Connected):
                if not self.connected.is_set():
                    self.term.notice(f"session {event.session} (continue with --session {event.session})")
                    self.connected.set()
                else:
                    self.term.notice("reconnected")
            elif (notice := describe(event)) is not None:
                self.term.notice(notice)
            if not isinstance(event, (Pong, Ready, AuthOk)):
                self.inbox.put_nowait(event)
            if isinstance(event, GaveUp):
                self.finished.set()
        self.finished.set()
        self.inbox.put_nowait(None)

    def interrupt(self, quit: Callable[[], None]) -> None:
        """Ctrl-C: the first while an answer streams stops it; any other quits."""
        if self.turn_running and not self.stop_sent:
            self.stop_sent = True
            self.term.notice("stopping the answer (Ctrl-C again to quit)")
            task = asyncio.get_running_loop().create_task(self._stop())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            quit()

    async def _stop(self) -> None:
        with contextlib.suppress(ClientClosed):
            await self.client.stop()


async def run_turn(chat: Chat, prompt: str) -> int:
    """Send one prompt and stream its answer; return an exit code."""
    term = chat.term
    chat.turn_running, chat.stop_sent = True, False
    try:
        while not chat.inbox.empty():  # what came between turns (notices were printed already)
            chat.inbox.get_nowait()
        try:
            chat_id = await chat.client.chat(prompt)
        except ClientClosed:
            return EXIT_GAVE_UP
        turn: int | None = None
        while (event := await chat.inbox.get()) is not None:
            match event:
                case Accepted(id=accepted_id, turn=number) if accepted_id == chat_id:
                    turn = number
                case Error(id=error_id) if error_id == chat_id:
                    return EXIT_ERROR
                case Chunk(turn=number, text=text) if number == turn:
                    term.text(text)
                case Done(turn=number, reason=reason, message=message) if number == turn:
                    term.end_answer()
                    if reason == "error":
                        term.notice(f"the answer failed: {clean_message(message)}" if message else "the answer failed")
                        return EXIT_ERROR
                    if reason == "stopped":
                        term.notice("stopped")
                    return EXIT_OK
                case GaveUp():
                    return EXIT_GAVE_UP
        return EXIT_GAVE_UP
    finally:
        chat.turn_running = False


@contextlib.contextmanager
def single_keys(stream: TextIO) -> Iterator[bool]:
    """Put a terminal in cbreak mode (keys arrive unbuffered); yield whether it is one."""
    if not stream.isatty():
        yield False
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class LineReader:
    """Lines from a file descriptor, read on the event loop (no thread), so a
    Ctrl-C at the prompt ends the program at once: a thread blocked in
    ``readline`` would keep it alive until Enter."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = ""
        self.eof = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _take(self, data: bytes) -> None:
        self.buffer += self.decoder.decode(data, final=not data)
        self.eof = not data

    async def readline(self) -> str:
        """The next line with its newline; the rest at end of input; "" after it."""
        loop = asyncio.get_running_loop()
        while "\n" not in self.buffer and not self.eof:
            ready: asyncio.Future[None] = loop.create_future()

            def wake(ready: asyncio.Future[None] = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            try:
                loop.add_reader(self.fd, wake)
            except (PermissionError, ValueError, OSError):  # a regular file: reading never blocks
                self._take(os.read(self.fd, 65536))
                continue
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)
            self._take(os.read(self.fd, 65536))
        line, newline, self.buffer = self.buffer.partition("\n")
        return line + newline


async def interactive(chat: Chat) -> int:
    """Read prompts from stdin; while an answer streams, p/r/s pause, resume and stop."""
    loop = asyncio.get_running_loop()
    client, term = chat.client, chat.term
    lines = LineReader(sys.stdin.fileno())
    while True:
        term.err.write("> ")
        term.err.flush()
        reading = asyncio.ensure_future(lines.readline())
        ending = asyncio.ensure_future(chat.finished.wait())
        try:
            await asyncio.wait({reading, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
            if not reading.done():
                reading.cancel()
        if not reading.done() or reading.cancelled():
            term.err.write("\n")
            return EXIT_GAVE_UP  # the client gave up while the prompt waited; the notice said why
        line = reading.result()
        if not line:
            if term.err.isatty():
                term.err.write("\n")  # end of input (Ctrl-D): leave the prompt's line
            return EXIT_OK
        if not line.strip():
            continue
        with single_keys(sys.stdin) as keys:
            if keys:

                def on_key() -> None:
                    for key in os.read(sys.stdin.fileno(), 64).decode(errors="replace").lower():
                        action = {"p": client.pause, "r": client.resume, "s": client.stop}.get(key)
                        if action is not None:
                            loop.create_task(action())

                loop.add_reader(sys.stdin.fileno(), on_key)
            try:
                code = await run_turn(chat, line.rstrip("\n"))
            finally:
                if keys:
                    loop.remove_reader(sys.stdin.fileno())
        if code == EXIT_GAVE_UP:
            return code


async def chat_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    term = Terminal(out, err)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def quit() -> None:
        main_task.cancel()

    chat: Chat | None = None  # until it exists (the history request), Ctrl-C quits

    def interrupt() -> None:
        if chat is not None:
            chat.interrupt(quit)
        else:
            quit()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        last_seq = args.last_seq
        if last_seq is None:
            # An existing session's finished turns were seen already: start after them.
            last_seq = await resume_point(args, term) if args.session else 0
        backoff = Backoff(initial_s=args.backoff_initial, cap_s=args.backoff_cap, max_attempts=args.max_attempts)
        client = ChatClient(
            args.url,
            session=args.session,
            last_seq=last_seq,
            token=args.token or None,
            backoff=backoff,
            connect_timeout_s=args.connect_timeout or None,
        )
        chat = Chat(client, term)
        async with client:
            pumping = asyncio.create_task(chat.pump())
            try:
                # Wait for the session before sending anything; the pump reports
                # every failed attempt meanwhile, and the client gives up after
                # --connect-timeout.
                while not chat.connected.is_set():
                    event = await chat.inbox.get()
                    if event is None or isinstance(event, GaveUp):
                        return EXIT_GAVE_UP
                if args.prompt:
                    return await run_turn(chat, " ".join(args.prompt))
                return await interactive(chat)
            finally:
                pumping.cancel()
    except asyncio.CancelledError:
        term.end_answer()
        if term.err.isatty():
            term.err.write("\n")  # leave the prompt's line
        return EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)


# Arguments ---------------------------------------------------------------


def _session_id(value: str) -> str:
    try:
        return validate_session_id(value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(f"invalid session id {value!r}: {exc}") from None


def _websocket_url(value: str) -> str:
    shown = redact_secrets(value)  # ws://user:pw@host: not the password
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a ws:// or wss:// URL (e.g. {DEFAULT_URL})")
    if port == 0:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a valid URL: port 0 cannot be connected to")
    return value


def _number(kind: type[int] | type[float], *, positive: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if number < 0 or (positive and number == 0):
            raise argparse.ArgumentTypeError(f"{value!r} must be {'positive' if positive else '0 or more'}")
        return number

    parse.__name__ = kind.__name__
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line ("chatrelay chat: error: …"), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    root = ArgumentParser(prog="chatrelay", description="Chat with a chatrelay gateway.")
    commands = root.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="send a prompt (or, without one, chat interactively)")
    chat.set_defaults(parser=chat)
    chat.add_argument("prompt", nargs="*", help="the prompt; none for interactive mode (p/r/s keys when stdin is a terminal)")
    chat.add_argument("--url", type=_websocket_url, default=os.environ.get("CHAT_URL", DEFAULT_URL), help=f"the gateway's WebSocket URL (env CHAT_URL, default {DEFAULT_URL})")
    chat.add_argument("--token", default=os.environ.get("CHAT_TOKEN"), help="a token for a gateway that requires one, sent as Authorization: Bearer (env CHAT_TOKEN, which keeps it out of the process list)")
    chat.add_argument("--session", type=_session_id, help="continue this session (letters, digits, _ and -, at most 64)")
    chat.add_argument("--last-seq", type=_number(int, positive=False), default=None, help="resume after this seq (default: after the session's last finished turn)")
    chat.add_argument(
        "--connect-timeout",
        type=_number(float, positive=False),
        default=_env_float("CHAT_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S),
        help=f"give up if the first connection does not succeed within this many seconds; 0: keep trying (env CHAT_CONNECT_TIMEOUT, default {DEFAULT_CONNECT_TIMEOUT_S:g})",
    )
    chat.add_argument("--max-attempts", type=_number(int, positive=False), default=None, help="reconnect attempts before giving up (default: no limit once connected)")
    chat.add_argument("--backoff-initial", type=_number(float, positive=True), default=0.5, help="first reconnect delay ceiling, seconds")
    chat.add_argument("--backoff-cap", type=_number(float, positive=True), default=30.0, help="largest reconnect delay, seconds")
    return root


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:  # also nan
        print(f"chatrelay: error: {name}={raw!r} must be a number of seconds, 0 or more", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return value


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)
        if args.backoff_initial > args.backoff_cap:
            args.parser.error(f"--backoff-initial ({args.backoff_initial:g}) must not exceed --backoff-cap ({args.backoff_cap:g})")
        code = asyncio.run(chat_command(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # before the handler was in place, or after it was gone
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read stdout (or stderr) went away, as `| head -c 10` does: stop
        # quietly. Both point at /dev/null from now on, so flushing what is left
        # at exit cannot fail again ("Exception ignored … BrokenPipeError").
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


async def resume_point(args: argparse.Namespace, term: Terminal) -> int:
    """Where to resume ``args.session``: after its last finished turn (history's
    ``resume_from``), so an answer still generating is shown from its start.

    0 (replay the whole session) when that cannot be read: the gateway does
    not answer (the connection reports it), refuses (401, 403: so does the
    connection), or answers with something else than a seq, or too slowly.
    The request as a whole, dripped bytes too, is bounded by
    ``--connect-timeout`` (30 s when that is 0).
    """
    limit = args.connect_timeout or DEFAULT_CONNECT_TIMEOUT_S
    try:
        async with asyncio.timeout(limit):
            body = await _history_body(args.url, args.session, args.token or None, limit)
    except (TimeoutError, httpx.TimeoutException):
        why = f"no answer within {limit:g} s"
    except httpx.HTTPStatusError:
        return 0
    except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL):
        return 0
    except (httpx.HTTPError, OSError, ValueError) as exc:
        why = clean_message(str(exc)) or type(exc).__name__
    else:
        try:
            value = json.loads(body)["resume_from"]
        except (ValueError, RecursionError, KeyError, TypeError, IndexError):
            value = None
        if type(value) is int and 0 <= value <= MAX_SEQ:  # not a bool, a float (1e400), a string
            return value
        why = "its answer has no resume_from that is a seq"
    term.notice(f"could not read where session {args.session} left off ({why}): replaying it from the start")
    return 0


async def _history_body(url: str, session: str, token: str | None, io_timeout_s: float) -> bytes:
    """The body of the session's history, at most MAX_HISTORY_BYTES of it."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    host = parts.netloc.rpartition("@")[2]  # credentials go in a header, as websockets sends them
    history = urlunsplit((scheme, host, f"/api/sessions/{session}/history", "", ""))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or "")) if parts.username and not token else None
    async with httpx.AsyncClient(timeout=io_timeout_s) as http, http.stream("GET", history, headers=headers, auth=auth) as response:
        response.raise_for_status()
        body = bytearray()
        async for data in response.aiter_bytes():
            body += data
            if len(body) > MAX_HISTORY_BYTES:
                raise ValueError(f"the history is larger than {MAX_HISTORY_BYTES} bytes")
        return bytes(body)


if __name__ == "__main__":
    main()
