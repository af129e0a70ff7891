"""A running set of services for integration tests, and a protocol-v1 test client."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import nats
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, free_port
from shared.subjects import control_subject, delivery_subject
from tests.wire import WireChecker, WsConnection

# Every wait in the integration tests is scaled by this factor (slow CI boxes).
TIMEOUT_FACTOR = float(os.environ.get("CHAT_TEST_TIMEOUT_FACTOR", "1"))
WAIT_S = 10.0 * TIMEOUT_FACTOR

FAST_DEMO = {"CHAT_DEMO_TOKENS_PER_S": "400", "CHAT_DEMO_ANSWER_TOKENS": "60"}


def new_session() -> str:
    return "t" + uuid.uuid4().hex[:20]


def session_paths(session: str) -> list[tuple[str, str]]:
    """Every HTTP path that acts on one session, with its method."""
    return [
        ("GET", f"/api/sessions/{session}/history"),
        ("GET", f"/api/sessions/{session}/events"),
        ("POST", f"/api/sessions/{session}/pause"),
        ("POST", f"/api/sessions/{session}/resume"),
        ("POST", f"/api/sessions/{session}/stop"),
    ]


def with_database(redis_url: str, database: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


class Stack:
    """Services as real processes against given NATS and Redis servers.

    Each stack gets a Redis database of its own: stacks share the test
    session's Redis but not its NATS, and a key shared across databases (the
    lease set) would let one stack's buffer end another stack's turn into the
    wrong NATS.
    """

    databases_in_use: ClassVar[set[int]] = set()
    # For the failure report (tests/conftest.py): the stacks made since the
    # current test started (by it or its fixtures), whatever made them.
    made: ClassVar[list[Stack]] = []

    def __init__(self, *, nats_url: str, redis_url: str, env: Mapping[str, str] | None = None) -> None:
        free = [db for db in range(1, 16) if db not in Stack.databases_in_use]
        if not free:
            raise RuntimeError("more than 15 test stacks alive at once")
        self.database = free[0]
        Stack.databases_in_use.add(self.database)
        self.env = {
            "CHAT_NATS_URL": nats_url,
            "CHAT_REDIS_URL": with_database(redis_url, self.database),
            "CHAT_LOG_LEVEL": "INFO",
            # Dev mode, as make run: tokens optional; one secret for the stack's gateways.
            "CHAT_AUTH_MODE": "dev",
            "CHAT_AUTH_SECRET": secrets.token_urlsafe(32),
            **FAST_DEMO,
            **(env or {}),
        }
        self.processes: list[ServiceProcess] = []
        self.gateways: list[ServiceProcess] = []
        self.port = 0
        Stack.made.append(self)

    @classmethod
    def begin_test(cls) -> None:
        """A test starts: the stacks it makes from now on are its own."""
        cls.made = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.stop()
        Stack.databases_in_use.discard(self.database)

    def _start(self, module: str, env: Mapping[str, str] | None = None, name: str = "") -> ServiceProcess:
        process = ServiceProcess(module, {**self.env, **(env or {})}, name=name)
        process.start()
        self.processes.append(process)
        return process

    def start_buffer(self, env: Mapping[str, str] | None = None) -> ServiceProcess:
        return self._start("services.buffer", env)

    def start_worker(self, env: Mapping[str, str] | None = None) -> ServiceProcess:
        return self._start("services.llm_worker", env)

    async def start_worker_through(self, proxy_port: int) -> ServiceProcess:
        """A worker that reaches Redis only through a proxy on ``proxy_port`` to
        the stack's Redis, so a test can cut that worker alone off from it.
        Started in a thread: the worker is ready only once it has reached Redis,
        through the proxy, which runs on this event loop."""
        parts = urlsplit(self.env["CHAT_REDIS_URL"])
        proxied = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy_port}"))
        return await asyncio.to_thread(self.start_worker, {"CHAT_REDIS_URL": proxied})

    def redis_address(self) -> tuple[str, int]:
        parts = urlsplit(self.env["CHAT_REDIS_URL"])
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def start_gateway(self, env: Mapping[str, str] | None = None) -> ServiceProcess:
        port = free_port()
        process = self._start("services.gateway", {"CHAT_PORT": str(port), **(env or {})})
        self.gateways.append(process)
        if not self.port:
            self.port = port
        return process

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws", **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in self.processes)


class FrameReader:
    """Reads a connection's frames; subclasses give ``recv``."""

    async def recv(self, wait_s: float = WAIT_S) -> dict[str, Any]:
        raise NotImplementedError

    async def until(self, kind: str, wait_s: float = WAIT_S) -> dict[str, Any]:
        """Read frames until one of type ``kind``; return it."""
        while True:
            frame = await self.recv(wait_s)
            if frame["type"] == kind:
                return frame


class Client(FrameReader):
    """A protocol-v1 WebSocket client whose every frame the strict wire checker sees."""

    def __init__(self, ws: ClientConnection, wire: WsConnection) -> None:
        self.ws = ws
        self.wire = wire
        self.frames: list[dict[str, Any]] = []

    @property
    def last_seq(self) -> int:
        """The last seq this connection delivered (or its last_seq, before any)."""
        return self.wire.cursor or 0

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, wait_s: float = WAIT_S) -> dict[str, Any]:
        frame = self.wire.feed(await asyncio.wait_for(self.ws.recv(), wait_s))
        self.frames.append(frame)
        return frame

    async def turn(self, prompt: str, wait_s: float = WAIT_S) -> tuple[int, str, dict[str, Any]]:
        """Run one turn; return (turn, the concatenated text, the done frame)."""
        await self.send({"type": "chat", "prompt": prompt, "id": uuid.uuid4().hex})
        accepted = await self.until("accepted", wait_s)
        text = []
        while True:
            frame = await self.recv(wait_s)
            if frame["type"] == "chunk":
                assert frame["turn"] == accepted["turn"]
                text.append(frame["text"])
            elif frame["type"] == "done":
                return accepted["turn"], "".join(text), frame

    def texts(self, turn: int | None = None) -> str:
        return "".join(f["text"] for f in self.frames if f["type"] == "chunk" and turn in (None, f["turn"]))


def openai_env(base_url: str, **settings: str) -> dict[str, str]:
    """Worker settings for an OpenAI-compatible model server at `base_url`, plus `settings`."""
    return {
        "CHAT_MODEL_PROVIDER": "openai",
        "CHAT_OPENAI_BASE_URL": base_url,
        "CHAT_OPENAI_API_KEY": "sk-test-not-a-secret",
        "CHAT_UPSTREAM_READ_TIMEOUT_S": "5",
        **settings,
    }


@contextmanager
def isolated_stack(
    redis_url: str, env: Mapping[str, str] | None = None, *, nats: LocalNats | None = None, worker: bool = True
) -> Iterator[Stack]:
    """A stack on its own NATS (so no other stack's worker takes its requests)."""
    own = nats or LocalNats()
    if nats is None:
        own.start()
    try:
        with Stack(nats_url=own.url, redis_url=redis_url, env=env) as stack:
            stack.start_buffer()
            if worker:
                stack.start_worker()
            stack.start_gateway()
            yield stack
    finally:
        if nats is None:
            own.stop()


class Clients:
    """Opens protocol-v1 clients for one test, all watched by one strict wire
    checker (``wire``), and closes them all afterwards; a contract violation
    seen anywhere fails the test."""

    def __init__(self, stack: Stack, wire: WireChecker | None = None) -> None:
        self.stack = stack
        self.wire = wire or WireChecker()
        self.opened: list[Client] = []

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.close()
        if exc_type is None:
            self.wire.assert_clean()

    async def open(
        self,
        session: str | None,
        *,
        last_seq: int | None = None,
        path: str = "/ws",
        port: int | None = None,
        **params: str,
    ) -> tuple[Client, dict[str, Any]]:
        """Connect with the chat.v1 subprotocol; return the client and its ready frame."""
        url = self.stack.ws_url(path, session=session, last_seq=last_seq, **params)
        if port is not None:
            url = url.replace(f":{self.stack.port}/", f":{port}/", 1)
        # max_queue=None: a client a test leaves unread must not stall its close for the close timeout.
        ws = await connect(url, subprotocols=["chat.v1"], max_queue=None)  # type: ignore[list-item]
        client = Client(ws, self.wire.ws(session, last_seq or 0))
        self.opened.append(client)
        ready = await client.recv()
        assert ready["type"] == "ready"
        return client, ready

    async def close(self) -> None:
        for client in self.opened:
            await client.ws.close()


@asynccontextmanager
async def restartable_stack(redis_url: str, env: Mapping[str, str]) -> AsyncIterator[tuple[LocalNats, Stack, Clients]]:
    """An isolated stack on a NATS of its own that a test may stop and start again (it keeps its
    port and store across ``stop()`` and ``start()``: the services reconnect to the same URL)."""
    own = LocalNats()
    own.start()
    try:
        with isolated_stack(redis_url, env, nats=own) as stack:
            async with Clients(stack) as clients:
                yield own, stack, clients
    finally:
        own.stop()


async def history(stack: Stack, session: str, *, gateway: int | None = None, token: str | None = None) -> dict[str, Any]:
    """The session's history from the stack's ``gateway``-th gateway (default: the one ``stack.port`` names)."""
    url = stack.http_url if gateway is None else f"http://127.0.0.1:{stack.gateways[gateway].env['CHAT_PORT']}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        response = await http.get(f"/api/sessions/{session}/history")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


class Bus:
    """Watches a session's subjects on the real NATS, to wait on events
    (a turn stored, a pause broadcast) instead of polling."""

    def __init__(self, stack: Stack, session: str) -> None:
        self.url = stack.env["CHAT_NATS_URL"]
        self.session = session
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.controls: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> Bus:
        self.nc = await nats.connect(self.url)

        async def on_frame(msg: Msg) -> None:
            for line in msg.data.split(b"\n"):  # the buffer publishes a batch's frames as one message
                self.frames.put_nowait(json.loads(line))

        async def on_control(msg: Msg) -> None:
            self.controls.put_nowait(json.loads(msg.data))

        await self.nc.subscribe(delivery_subject(self.session), cb=on_frame)
        await self.nc.subscribe(control_subject(self.session), cb=on_control)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def stored_done(self, turn: int, wait_s: float = WAIT_S) -> dict[str, Any]:
        """Wait until the buffer has stored and published the turn's done."""
        async with asyncio.timeout(wait_s):
            while True:
                frame = await self.frames.get()
                if frame["type"] == "done" and frame["turn"] == turn:
                    return frame

    async def control(self, action: str, wait_s: float = WAIT_S) -> dict[str, Any]:
        async with asyncio.timeout(wait_s):
            while True:
                control = await self.controls.get()
                if control["action"] == action:
                    return control
