"""``chatrelay``: chat from the terminal through the reconnecting client.

    chatrelay chat "Tell me about rivers"            # stream one answer
    chatrelay chat --session abc "and the sea?"      # continue a conversation
    chatrelay chat                                   # interactive; p/r/s pause, resume, stop

The answer goes to stdout and nothing else does, so it can be piped; the
session id, reconnects and errors go to stderr on lines of their own.
Ctrl-C stops the running turn; a second Ctrl-C quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import AsyncIterator, Iterator
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from ..backoff import Backoff
from ..protocol import Accepted, Chunk, Done, Error, Paused, Resumed
from .connection import ChatClient, Event
from .session import Connected, Disconnected, GaveUp, Reconnecting

__all__ = ["main", "run_turn"]

EXIT_OK, EXIT_ERROR, EXIT_GAVE_UP, EXIT_INTERRUPTED = 0, 1, 2, 130


class Terminal:
    """Writes the answer to ``out`` and notices to ``err``, each notice on its own line."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.mid_line = False  # the answer's last character was not a newline

    def text(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        if text:
            self.mid_line = not text.endswith("\n")

    def notice(self, message: str) -> None:
        # On a terminal, start the notice on a fresh line; a pipe gets none of it.
        prefix = "\n" if self.mid_line and self.out.isatty() and self.err.isatty() else ""
        self.err.write(f"{prefix}[{message}]\n")
        self.err.flush()

    def end_answer(self) -> None:
        if self.mid_line:
            self.text("\n")


def describe(event: Event) -> str | None:
    """A one-line notice for connection events and errors, or None."""
    match event:
        case Reconnecting(delay_s=delay, attempt=attempt):
            return f"reconnecting in {delay:.1f} s, attempt {attempt}"
        case Disconnected(code=code, reason=reason):
            return f"disconnected ({code or 'network'}{': ' + reason if reason else ''})"
        case Connected(attempt=attempt) if attempt:
            return "reconnected"
        case GaveUp(reason=reason):
            return f"gave up: {reason}"
        case Error(code=code, message=message):
            return f"error {code}: {message}"
        case Paused():
            return "paused"
        case Resumed():
            return "resumed"
    return None


async def run_turn(client: ChatClient, events: AsyncIterator[Event], prompt: str, term: Terminal) -> int:
    """Send one prompt and stream its answer; return an exit code."""
    chat_id = await client.chat(prompt)
    turn: int | None = None
    async for event in events:
        if (notice := describe(event)) is not None:
            term.notice(notice)
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
                    term.notice(f"the answer failed: {message}")
                    return EXIT_ERROR
                if reason == "stopped":
                    term.notice("stopped")
                return EXIT_OK
            case GaveUp():
                return EXIT_GAVE_UP
    return EXIT_GAVE_UP


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


async def interactive(client: ChatClient, events: AsyncIterator[Event], term: Terminal) -> int:
    """Read prompts from stdin; while an answer streams, p/r/s pause, resume and stop."""
    loop = asyncio.get_running_loop()
    while True:
        term.err.write("> ")
        term.err.flush()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return EXIT_OK
        if not line.strip():
            continue
        with single_keys(sys.stdin) as keys:
            if keys:

                def on_key() -> None:
                    key = sys.stdin.read(1).lower()
                    action = {"p": client.pause, "r": client.resume, "s": client.stop}.get(key)
                    if action is not None:
                        loop.create_task(action())

                loop.add_reader(sys.stdin.fileno(), on_key)
            try:
                code = await run_turn(client, events, line.rstrip("\n"), term)
            finally:
                if keys:
                    loop.remove_reader(sys.stdin.fileno())
        if code == EXIT_GAVE_UP:
            return code


async def chat_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    term = Terminal(out, err)
    backoff = Backoff(initial_s=args.backoff_initial, cap_s=args.backoff_cap, max_attempts=args.max_attempts)
    client = ChatClient(args.url, session=args.session, last_seq=args.last_seq, backoff=backoff)
    loop = asyncio.get_running_loop()
    interrupts = 0
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            term.notice("stopping the answer (Ctrl-C again to quit)")
            loop.create_task(client.stop())
        else:
            main_task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        async with client:
            events = client.events()
            async for event in events:  # wait for the session before announcing it
                if isinstance(event, Connected):
                    term.notice(f"session {event.session} (continue with --session {event.session})")
                    break
                if isinstance(event, GaveUp):
                    term.notice(f"gave up: {event.reason}")
                    return EXIT_GAVE_UP
            if args.prompt:
                return await run_turn(client, events, " ".join(args.prompt), term)
            return await interactive(client, events, term)
    except asyncio.CancelledError:
        term.end_answer()
        return EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="chatrelay", description="Chat with a chatrelay gateway.")
    commands = root.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="send a prompt (or, without one, chat interactively)")
    chat.add_argument("prompt", nargs="*", help="the prompt; none for interactive mode")
    chat.add_argument("--url", default=os.environ.get("CHAT_URL", "ws://127.0.0.1:8000/ws"), help="the gateway's WebSocket URL (env CHAT_URL)")
    chat.add_argument("--session", help="continue this session")
    chat.add_argument("--last-seq", type=int, default=None, help="resume after this seq (default: only new frames)")
    chat.add_argument("--max-attempts", type=int, default=None, help="reconnect attempts before giving up (default: forever)")
    chat.add_argument("--backoff-initial", type=float, default=0.5, help="first reconnect delay ceiling, seconds")
    chat.add_argument("--backoff-cap", type=float, default=30.0, help="largest reconnect delay, seconds")
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.last_seq is None:
        # An existing session's finished turns were seen already: start after them.
        args.last_seq = _last_seq(args.url, args.session) if args.session else 0
    sys.exit(asyncio.run(chat_command(args, sys.stdout, sys.stderr)))


def _last_seq(url: str, session: str) -> int:
    """Where to resume the session: after its last finished turn (history's
    ``resume_from``), so an answer still generating is shown from its start."""
    import json
    import urllib.error
    import urllib.request

    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    history = urlunsplit((scheme, parts.netloc, f"/api/sessions/{session}/history", "", ""))
    try:
        with urllib.request.urlopen(history, timeout=10) as response:
            return int(json.load(response)["resume_from"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return 0  # replay the whole session instead


if __name__ == "__main__":
    main()
