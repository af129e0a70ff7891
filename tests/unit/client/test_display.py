"""What the CLI prints of the server's: cleaned of escapes and control
characters, messages cut; credentials masked; refusals that cannot be read."""

from __future__ import annotations

import io
import json

import pytest

from shared.client import Disconnected
from shared.client.cli import Terminal, describe, parser
from shared.client.display import MAX_MESSAGE_CHARS, clean_message, clean_text
from shared.client.session import refusal
from shared.protocol import Error

HOSTILE = [
    "\x1b[2J",  # clear screen
    "\x1b[H",  # cursor home
    "\x1b]0;pwned\x07",  # window title, BEL-terminated
    "\x1b]8;;http://evil\x1b\\",  # a hyperlink, ST-terminated
    "\x9b31m",  # C1 CSI
    "\x9d0;pwned\x9c",  # C1 OSC
    "\x1bP+q\x1b\\",  # DCS
    "\x1bc",  # reset
    "\x00\x07\x08\x0b\x0c\r\x7f\x85",
]


def controls(text: str) -> list[str]:
    return [ch for ch in text if (ch < " " and ch not in "\n\t") or "\x7f" <= ch <= "\x9f"]


@pytest.mark.parametrize("escape", HOSTILE)
def test_answer_text_loses_escapes_and_keeps_its_layout(escape: str) -> None:
    cleaned = clean_text(f"a{escape}b\n\tc")
    assert cleaned == "ab\n\tc"
    assert not controls(cleaned) and "pwned" not in cleaned and "evil" not in cleaned


def test_answer_text_cut_inside_an_escape_does_nothing() -> None:
    """A sequence split across chunks: the escape character goes, the rest is plain text."""
    first, second = clean_text("red \x1b[3"), clean_text("1mtext \x1b]0;ti")
    assert first == "red " and second == "1mtext "
    assert clean_text("tle\x07 more") == "tle more"
    assert clean_text("plain words, ünïcode ✓") == "plain words, ünïcode ✓"


def test_a_message_is_one_short_clean_line() -> None:
    message = clean_message("".join(HOSTILE) + "try\nagain\tlater " + "x" * 900_000)
    assert message.startswith("try again later x") and message.endswith("…")
    assert len(message) == MAX_MESSAGE_CHARS
    assert not controls(message) and "pwned" not in message
    assert clean_message("short") == "short"
    assert clean_message("x" * 300, limit=None) == "x" * 300


def test_a_refusal_nested_too_deeply_has_no_reason() -> None:
    """[[[[…]]]] 100k deep: no RecursionError, the status alone."""
    error = refusal(401, b"[" * 100_000 + b"]" * 100_000)
    assert (error.status, error.code, error.message) == (401, None, None)
    assert str(error) == "the gateway refused the connection: HTTP 401"
    deep = refusal(401, b'{"message": ' + b"[" * 100_000 + b"}")
    assert deep.message is None


@pytest.mark.parametrize("shape", ["json", "plain"])
def test_a_refusals_reason_is_cleaned_and_cut(shape: str) -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07log in\x00 again " + "x" * 900_000
    body = json.dumps({"code": "unauthorized\x1b[5m" + "y" * 500, "message": hostile}) if shape == "json" else hostile
    error = refusal(401, body.encode())
    assert error.message is not None and error.message.startswith("log in again x")
    assert len(error.message) <= MAX_MESSAGE_CHARS and not controls(error.message)
    if shape == "json":
        assert error.code is not None and error.code.startswith("unauthorizedy") and len(error.code) <= 64
    assert not controls(str(error)) and len(str(error)) <= 50 + 64 + 2 + MAX_MESSAGE_CHARS


def test_error_frames_and_close_reasons_are_cleaned_and_cut() -> None:
    notice = describe(Error(code="busy", message="\x1b[2Jslow\rdown " + "!" * 5000))
    assert notice is not None and notice.startswith("error busy: slow down !!!") and len(notice) < 220
    notice = describe(Disconnected(code=1011, reason="\x1b]0;t\x07bye\x1b[K"))
    assert notice == "disconnected (1011: bye)"


def test_notices_mask_a_urls_password_and_drop_controls() -> None:
    err = io.StringIO()
    Terminal(io.StringIO(), err).notice("cannot reach ws://alice:s3cret@host:8000/ws: refused\x1b[2J\x07")
    assert err.getvalue() == "[cannot reach ws://alice:***@host:8000/ws: refused]\n"


def test_the_answer_is_cleaned_as_it_is_printed() -> None:
    out = io.StringIO()
    term = Terminal(out, io.StringIO())
    term.text("one\x1b[2J\n\ttwo\x1b]0;x\x07")
    term.end_answer()
    assert out.getvalue() == "one\n\ttwo\n"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ws://h:99999/ws", "Port out of range"),
        ("ws://h:abc/ws", "Port could not be cast"),
        ("ws://h:0/ws", "port 0"),
        ("ws://[::1/ws", "Invalid IPv6 URL"),
        ("ws://bob:hunter22@h:abc/ws", "'ws://bob:***@h:abc/ws' is not a valid URL"),
    ],
)
def test_bad_ports_are_one_line_exit_2(url: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["chat", "--url", url, "hi"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatrelay chat: error: argument --url: ") and says in err
    assert "hunter22" not in err
