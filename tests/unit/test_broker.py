"""Telling a stream that is gone from other NATS failures, and making the streams again at most so often."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from shared import broker
from shared.broker import Streams, stream_gone
from shared.pull import ConsumerLost


@pytest.mark.parametrize(
    ("exc", "gone"),
    [
        (NoStreamResponseError(), True),  # js.publish with no stream for the subject
        (nats.errors.NoRespondersError(), True),
        (NotFoundError(code=404, err_code=10059, description="stream not found"), True),
        (ConsumerLost("no consumer"), True),
        (NotFoundError(code=404, err_code=10014, description="consumer not found"), False),
        (ServiceUnavailableError(code=503, description="JetStream not ready"), False),
        (nats.errors.TimeoutError(), False),
        (nats.errors.ConnectionClosedError(), False),
        (APIError(code=400, err_code=10058, description="stream name already in use"), False),
    ],
)
def test_stream_gone(exc: BaseException, gone: bool) -> None:
    assert stream_gone(exc) is gone


class CountingJetStream:
    """Counts stream creations (ensure_streams calls add_stream once per stream)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.fail = fail

    async def add_stream(self, config: Any) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail


async def test_a_burst_of_restores_makes_the_streams_once(monkeypatch: pytest.MonkeyPatch) -> None:
    js = CountingJetStream()
    streams = Streams(js)  # type: ignore[arg-type]
    await asyncio.gather(*(streams.restore() for _ in range(50)))
    assert js.calls == 2 and streams.healthy
    monkeypatch.setattr(broker, "RESTORE_EVERY_S", 0.0)
    await streams.restore()
    assert js.calls == 4


async def test_a_failed_restore_leaves_the_streams_unhealthy_until_one_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    js = CountingJetStream(fail=nats.errors.TimeoutError())
    streams = Streams(js)  # type: ignore[arg-type]
    await streams.restore()
    assert not streams.healthy
    await streams.restore()  # within RESTORE_EVERY_S: no check, no change
    assert not streams.healthy and js.calls == 1
    monkeypatch.setattr(broker, "RESTORE_EVERY_S", 0.0)
    js.fail = None
    await streams.restore()
    assert streams.healthy


async def test_a_restore_skipped_for_the_rate_leaves_healthy_streams_healthy() -> None:
    """A publish that found a stream gone just after another caller made it again stays ready."""
    streams = Streams(CountingJetStream())  # type: ignore[arg-type]
    await streams.restore()
    await streams.restore()
    assert streams.healthy
