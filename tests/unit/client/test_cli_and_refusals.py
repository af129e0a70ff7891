"""The CLI's arguments and notices, the reading of refused handshakes, and the
401 decision, without sockets or services."""

from __future__ import annotations

import asyncio
import os

import pytest

from shared.client import GaveUp, HandshakeRefused, Reconnecting
from shared.client.cli import LineReader, describe, parser
from shared.client.session import CloseAction, handshake_action, refusal


def test_refusal_reads_the_servers_json_reason() -> None:
    """The body {"type":"error","code","message"} gives the exception its code and message."""
    error = refusal(401, b'{"type":"error","code":"unauthorized","message":"a token is required"}')
    assert (error.status, error.code, error.message) == (401, "unauthorized", "a token is required")
    assert str(error) == "the gateway refused the connection: HTTP 401 unauthorized: a token is required"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", None, None),
        (b"Service Unavailable\n", None, "Service Unavailable"),
        (b"<html><body>502 Bad Gateway</body></html>", None, None),
        (b'{"detail": "nope"}', None, '{"detail": "nope"}'),
        (b"\xff\xfe not utf-8", None, "\ufffd\ufffd not utf-8"),
    ],
)
def test_refusal_without_a_json_reason(body: bytes, code: str | None, message: str | None) -> None:
    """Plain text is the message; HTML pages, other JSON and empty bodies give the status alone."""
    error = refusal(503, body)
    assert (error.status, error.code, error.message) == (503, code, message)
    assert str(error).startswith("the gateway refused the connection: HTTP 503")


def test_401_stops_when_no_new_token_can_help() -> None:
    """401 refreshes only when a new token can be had; 400 and 403 stop; 429 and 5xx retry."""
    assert handshake_action(401) is CloseAction.REFRESH_TOKEN
    assert handshake_action(401, can_refresh=False) is CloseAction.STOP
    assert handshake_action(400) is handshake_action(403) is CloseAction.STOP
    assert handshake_action(429) is handshake_action(503) is CloseAction.RECONNECT


def test_gave_up_carries_the_exception_to_raise() -> None:
    refused = HandshakeRefused(403, "forbidden", "not yours")
    assert GaveUp(reason=str(refused), error=refused).exception is refused
    assert str(GaveUp(reason="gave up after 3 attempts").exception) == "gave up after 3 attempts"


def test_notices_say_why_connecting_failed() -> None:
    """A failed attempt names its cause; a reconnect after a drop reads as before; a 401 hints at --token."""
    failed = Reconnecting(delay_s=2.0, attempt=1, reason="cannot reach ws://127.0.0.1:9999/ws: connection refused")
    assert describe(failed) == "cannot reach ws://127.0.0.1:9999/ws: connection refused; retrying in 2.0 s (attempt 1)"
    assert describe(Reconnecting(delay_s=0.4, attempt=2)) == "reconnecting in 0.4 s, attempt 2"
    refused = HandshakeRefused(401, "unauthorized", "a token is required")
    notice = describe(GaveUp(reason=str(refused), error=refused))
    assert notice is not None and "HTTP 401 unauthorized: a token is required" in notice and "--token or CHAT_TOKEN" in notice


def test_options_and_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--token and --connect-timeout default from CHAT_TOKEN and CHAT_CONNECT_TIMEOUT; 30 s without."""
    monkeypatch.delenv("CHAT_TOKEN", raising=False)
    monkeypatch.delenv("CHAT_CONNECT_TIMEOUT", raising=False)
    args = parser().parse_args(["chat", "hi"])
    assert (args.token, args.connect_timeout) == (None, 30.0)
    monkeypatch.setenv("CHAT_TOKEN", "t0k")
    monkeypatch.setenv("CHAT_CONNECT_TIMEOUT", "5")
    args = parser().parse_args(["chat", "--session", "abc_-1", "hi"])
    assert (args.token, args.connect_timeout, args.session) == ("t0k", 5.0, "abc_-1")
    assert parser().parse_args(["chat", "--token", "other", "hi"]).token == "other"


@pytest.mark.parametrize("args", [["--session", "bad id!"], ["--session", "x" * 65], ["--last-seq", "-1"], ["--url", "localhost:8000"], ["--connect-timeout", "-1"]])
def test_bad_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["chat", *args, "hi"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatrelay chat: error: argument ")


async def test_line_reader_splits_a_pipe_into_lines() -> None:
    """Lines as written, a last line without a newline, then "" at end of input."""
    read_fd, write_fd = os.pipe()
    try:
        reader = LineReader(read_fd)
        os.write(write_fd, "first\n\nsecond é".encode())
        assert await asyncio.wait_for(reader.readline(), 5) == "first\n"
        assert await asyncio.wait_for(reader.readline(), 5) == "\n"
        os.write(write_fd, b" line\nlast")
        assert await asyncio.wait_for(reader.readline(), 5) == "second é line\n"
        os.close(write_fd)
        write_fd = -1
        assert await asyncio.wait_for(reader.readline(), 5) == "last"
        assert await asyncio.wait_for(reader.readline(), 5) == ""
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
