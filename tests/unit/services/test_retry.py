"""When a failed model request is sent again, and the Retry-After a server asks for."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from services.llm_worker.providers import retry_after_s
from services.llm_worker.retry import RETRY_CAP_S, retry_delay
from shared.errors import UpstreamError

TRANSIENT = UpstreamError("unavailable", retryable=True)


def delay(error: BaseException = TRANSIENT, **overrides: object) -> float | None:
    options: dict[str, object] = {
        "attempt": 0, "text_sent": False, "retries": 2, "initial_s": 0.5, "time_left_s": 30.0, "random": 0.5,
    }
    options.update(overrides)
    return retry_delay(error, **options)  # type: ignore[arg-type]


def test_a_transient_failure_before_any_text_is_retried_with_growing_jittered_delays() -> None:
    """A delay is between half and all of min(cap, initial * 2**attempt), until the retries are used up."""
    assert [delay(attempt=n, random=1.0) for n in range(3)] == [0.5, 1.0, None]
    assert [delay(attempt=n, random=0.0) for n in range(2)] == [0.25, 0.5]
    assert delay(attempt=1, random=0.5) == 0.75
    assert delay(attempt=10, retries=20, random=1.0) == RETRY_CAP_S


@pytest.mark.parametrize(
    "overrides",
    [
        {"text_sent": True},  # a retry would repeat text the user already has
        {"retries": 0},
        {"time_left_s": 0.1},  # would start after the turn's queue deadline
    ],
)
def test_no_retry_after_text_past_the_retries_or_the_deadline(overrides: dict[str, object]) -> None:
    """No retry once text went out, with no retries configured, or when the deadline comes first."""
    assert delay(random=0.9, **overrides) is None


def test_only_retryable_upstream_errors_are_retried() -> None:
    """A refused key, a bad request or a bug in the worker is not sent again."""
    assert delay(UpstreamError("bad key")) is None
    assert delay(RuntimeError("bug")) is None


def test_retry_after_is_honoured_within_the_deadline() -> None:
    """The server's Retry-After is the delay, unless it reaches past the deadline."""
    asked = UpstreamError("slow down", retryable=True, retry_after_s=3.0)
    assert delay(asked) == 3.0
    assert delay(asked, time_left_s=2.0) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
        ({"retry-after": "inf"}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After in seconds, retry-after-ms first, and nonsense ignored (RFC 9110 section 10.2.3)."""
    assert retry_after_s(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    """Retry-After may be an HTTP date: the wait is until then."""
    wait = retry_after_s({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert wait is not None and 28 <= wait <= 31
