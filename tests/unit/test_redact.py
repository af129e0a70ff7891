"""Secrets masked in log lines and error messages, whatever form they take."""

from __future__ import annotations

import json
import logging

import pytest

from shared.logs import JSONFormatter
from shared.redact import redact_secrets

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSIsImV4cCI6OTk5fQ.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f'127.0.0.1:5000 - "WebSocket /ws?session=s1&token={JWT}&last_seq=0" [accepted]', JWT),
        ('"WebSocket /ws?token=garbage-not-a-jwt" 401', "garbage-not-a-jwt"),
        ("GET /api/sessions/s/events?access_token=abc123xyz HTTP/1.1", "abc123xyz"),
        ("GET /x?api_key=k-0000111122 HTTP/1.1", "k-0000111122"),
        (f"Authorization: Bearer {JWT}", JWT),
        ("authorization: bearer opaque-token-value", "opaque-token-value"),
        ("Basic dXNlcjpwYXNzd29yZDEy", "dXNlcjpwYXNzd29yZDEy"),
        ("key sk-proj-abcdefgh12345678 rejected", "abcdefgh12345678"),
        ("cannot reach redis://:hunter22@cache:6379/0", "hunter22"),
        ("nats://user:s3cret@nats:4222 refused", "s3cret"),
        (f"a token {JWT} in prose", JWT),
        ("nats://user:p@ss@nats:4222", "ss@nats"),
        ("connecting to nats://Sekr1tTok@127.0.0.1:4222", "Sekr1tTok"),
    ],
)
def test_secret_is_masked(text: str, secret: str) -> None:
    assert secret not in redact_secrets(text)


def test_other_text_is_left_alone() -> None:
    line = '127.0.0.1:5000 - "WebSocket /ws?session=s1&last_seq=12" [accepted] turn=3 model=gpt-4o-mini'
    assert redact_secrets(line) == line


def test_every_log_line_is_masked_even_in_arguments_extras_and_tracebacks() -> None:
    formatter = JSONFormatter("gateway")
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '"WebSocket %s" 403', (f"/ws?token={JWT}",), None)
    record.url = "redis://:hunter22@cache:6379/0"
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert JWT not in line and "hunter22" not in line
    entry = json.loads(line)
    assert entry["msg"] == '"WebSocket /ws?token=***" 403'


def test_configured_secrets_are_masked_whatever_their_shape() -> None:
    """A key of no known shape (Azure's 32 hex digits) is masked once configured, also
    when a message quoting it is cut short afterwards (the mask comes first)."""
    from services.llm_worker.openai_stream import short
    from services.llm_worker.settings import Settings

    key = "0123456789abcdef0123456789abcdef"
    Settings.from_env({"CHAT_OPENAI_API_KEY": key})
    assert key not in redact_secrets(f"Access denied due to invalid subscription key {key}.")
    message = "x" * 270 + f" key {key} is not valid"
    assert "0123456789" not in short(message)


@pytest.mark.parametrize("query", ["%74oken=sekret-value-1", "t%6Fken=sekret-value-1", "TOKEN=sekret-value-1", "x=1;token=sekret-value-1"])
def test_a_secret_parameter_is_known_by_its_decoded_name(query: str) -> None:
    assert "sekret-value-1" not in redact_secrets(f"< GET /ws?session=s1&{query} HTTP/1.1")
