"""Fixtures: real NATS and Redis for the test session, and stacks of services.

``CHAT_TEST_NATS_URL`` / ``CHAT_TEST_REDIS_URL`` point the tests at existing
servers instead; otherwise they run in Docker (testcontainers) when an
engine answers, and as local binaries on free ports when not.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from devstack.servers import Server, start_nats, start_redis
from tests.stack import Clients, Stack, isolated_stack
from tests.wire import WireChecker


@dataclass
class ExternalServer:
    url: str

    def start(self) -> None:
        raise RuntimeError("an external server cannot be restarted by the tests")

    def stop(self) -> None:
        raise RuntimeError("an external server cannot be stopped by the tests")


def _server(env_var: str, start: type | object) -> Iterator[Server]:
    url = os.environ.get(env_var)
    if url:
        yield ExternalServer(url)
        return
    server = start()  # type: ignore[operator]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Server]:
    yield from _server("CHAT_TEST_NATS_URL", start_nats)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    yield from _server("CHAT_TEST_REDIS_URL", start_redis)


@pytest.fixture(scope="session")
def stack(nats_server: Server, redis_server: Server) -> Iterator[Stack]:
    """Gateway, two workers and two buffers on the session's servers, fast demo model.

    Two buffers share the generated stream, so frames of one session are
    stored and published by either, out of order: every test exercises the
    gateway's reordering.
    """
    with Stack(nats_url=nats_server.url, redis_url=redis_server.url) as running:
        running.start_buffer()
        running.start_buffer()
        running.start_worker()
        running.start_worker()
        running.start_gateway()
        yield running


@pytest.fixture
async def clients(stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(stack) as opened:
        yield opened


@pytest.fixture(scope="session")
def paced_stack(redis_server: Server) -> Iterator[Stack]:
    """Answers that last 1.5 s (100 tokens/s, 150 tokens), for tests whose
    controls must land while the turn still generates; its own NATS."""
    with isolated_stack(redis_server.url, {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "150"}) as running:
        yield running


@pytest.fixture
async def paced(paced_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(paced_stack) as opened:
        yield opened


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start recording the stacks and wire checkers this test makes (see the report hook below)."""
    Stack.begin_test()
    WireChecker.made = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failure, attach the logs of every stack the test used (its
    fixtures' and those it made itself, ``with isolated_stack(...)``), and the
    contract violations its wire checkers recorded (a violation seen inside a
    client's task cannot raise: the test may only time out)."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        named = [(name, value) for name, value in funcargs.items() if isinstance(value, Stack)]
        fixtures = {id(value) for _, value in named}
        made = [(f"stack {index + 1} made by the test, Redis db {running.database}", running)
                for index, running in enumerate(Stack.made) if id(running) not in fixtures]
        for name, running in [*named, *made]:
            report.sections.append((f"service logs ({name})", running.logs()))
        violations = [v for checker in WireChecker.made for v in checker.violations]
        if violations:
            report.sections.append(("wire contract violations", "\n".join(violations)))
    return report
