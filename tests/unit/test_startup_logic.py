"""The pure parts of start-up: URLs fit for a log, failures in a few words,
how often an absent broker is reported, and what /readyz says meanwhile."""

from __future__ import annotations

import errno
import logging

import httpx
import pytest

from services.llm_worker.service import upstream_failure
from shared.broker import describe_error
from shared.errors import UpstreamError
from shared.runner import REPORT_EVERY_S, Startup, _Reporter, listen_error
from shared.settings import masked_url


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://chat:pw@127.0.0.1:4222", "nats://chat:***@127.0.0.1:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://***@nats:4222"),
        ("nats://a:b@h1:1,nats://h2:2", "nats://a:***@h1:1,nats://h2:2"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:pw@redis:6379/2", "redis://user:***@redis:6379/2"),
        ("redis://redis:6379/0?password=pw&socket_timeout=3", "redis://redis:6379/0?password=***&socket_timeout=3"),
        ("nats://user:p@ss@nats:4222", "nats://user:***@nats:4222"),  # a password holding "@"
        ("nats://[::1", "nats://[::1"),  # unparsable: not an exception
    ],
)
def test_masked_url_hides_passwords_and_tokens(url: str, safe: str) -> None:
    assert masked_url(url) == safe


def test_describe_error_is_a_few_words() -> None:
    assert describe_error(ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")) == "connection refused"
    assert describe_error(OSError(-2, "Name or service not known")) == "name or service not known"
    assert describe_error(TimeoutError()) == "timed out"
    assert describe_error(Exception("nats: 'Authorization Violation'")) == "Authorization Violation"


def test_listen_error_names_the_address_and_the_setting() -> None:
    line = listen_error(OSError(errno.EADDRINUSE, "in use"), "127.0.0.1", 8000, port_setting="CHAT_PORT", host_setting="CHAT_HOST")
    assert line == "cannot listen on 127.0.0.1:8000: address in use; set CHAT_PORT (and CHAT_HOST)"
    line = listen_error(OSError(errno.EACCES, "denied"), "0.0.0.0", 80, port_setting="CHAT_PORT", host_setting="CHAT_HOST")
    assert "permission denied" in line


def test_an_absent_broker_is_reported_first_then_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert REPORT_EVERY_S == 5.0  # the counts below assume it
    now = [1000.0]
    monkeypatch.setattr("shared.runner.time.monotonic", lambda: now[0])
    startup = Startup()
    report = _Reporter("nats", "nats://127.0.0.1:4222", startup)
    delays = []
    with caplog.at_level(logging.WARNING, logger="shared.runner"):
        for _ in range(20):  # 20 failures, half a second apart
            delays.append(report.failed("cannot reach nats at nats://127.0.0.1:4222", "connection refused"))
            now[0] += 0.5
        report.failed("cannot reach nats at nats://127.0.0.1:4222", "name or service not known")  # new cause: said at once
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages  # at 0 s, at REPORT_EVERY_S, and the new cause
    assert "still waiting after 5 s" in messages[1] and "name or service not known" in messages[2]
    assert delays[:4] == [0.5, 1.0, 2.0, 3.0] and max(delays) == 3.0
    assert startup.waiting == {"nats": "cannot reach nats at nats://127.0.0.1:4222: name or service not known"}
    report.succeeded()
    assert startup.waiting == {} and startup.up["nats"] is True


async def test_readiness_while_starting_says_what_is_awaited() -> None:
    startup = Startup()
    assert await startup.readiness() == (False, {"ready": False, "nats": False, "redis": False, "waiting": ["starting"]})
    startup.waiting["redis"] = "cannot reach redis at redis://r:6379/0: connection refused"
    startup.up["nats"] = True
    ready, body = await startup.readiness()
    assert not ready and body == {
        "ready": False, "nats": True, "redis": False,
        "waiting": ["cannot reach redis at redis://r:6379/0: connection refused"],
    }


def test_upstream_failure_names_the_cause_under_the_error_and_the_status() -> None:
    try:
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError:
            raise UpstreamError("Could not reach the model API.", retryable=True, cause="ConnectError") from None
    except UpstreamError as exc:
        assert upstream_failure(exc) == {
            "cause": "ConnectError: [Errno 111] Connection refused", "told": "Could not reach the model API."
        }
    failed = UpstreamError("unavailable", code="model_unavailable", cause="HTTP 503")
    assert upstream_failure(failed) == {
        "cause": "HTTP 503", "status": 503, "told": "unavailable", "code": "model_unavailable"
    }
    assert upstream_failure(ValueError("boom")) == {"cause": "ValueError"}
