"""A TCP proxy for fault-injection tests: cut, black-hole, delay and split traffic.

It runs on the test's event loop between a client and the gateway:

- :meth:`cut_all` aborts every open connection at once (both sides see a reset),
  :meth:`cut_some` a few chosen at random;
- :meth:`blackhole_existing` silently drops all traffic of the open
  connections without closing them: a half-open connection, as after a NAT
  timeout or a pulled cable; new connections pass normally;
- ``refuse = True`` makes new connections fail immediately (an outage);
- ``delay_s`` and ``split_bytes`` delay every forwarded read and write it in
  small pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

__all__ = ["FaultProxy"]

READ_BYTES = 65536


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    blackholed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *more_targets: tuple[str, int]) -> None:
        self.target = (target_host, target_port)
        # With several targets, each new connection goes to the next one (round robin),
        # as a load balancer in front of several gateways would.
        self.targets = [self.target, *more_targets]
        self.next_target = 0
        self.links: set[_Link] = set()
        self.refuse = False
        self.delay_s = 0.0
        self.split_bytes = 0
        self.connections = 0
        self.opened = asyncio.Event()  # set on every new connection
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FaultProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for link in list(self.links):
            link.abort()
            for task in link.tasks:
                task.cancel()
        await self.server.wait_closed()

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def next_connection(self) -> None:
        """Wait until a connection opens after this call (or one is open)."""
        self.opened.clear()
        if not self.links:
            await self.opened.wait()

    def cut_all(self) -> int:
        """Abort every open connection; return how many."""
        links = list(self.links)
        self.links.clear()
        for link in links:
            link.abort()
        return len(links)

    def cut_some(self, count: int, rng: random.Random) -> int:
        """Abort ``count`` open connections chosen at random; return how many."""
        links = rng.sample(sorted(self.links, key=id), min(count, len(self.links)))
        for link in links:
            self.links.discard(link)
            link.abort()
        return len(links)

    def blackhole_existing(self) -> int:
        """Stop forwarding on every open connection, without closing it."""
        for link in self.links:
            link.blackholed = True
        return len(self.links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        if len(self.targets) > 1:
            target = self.targets[self.next_target % len(self.targets)]
            self.next_target += 1
        else:
            target = self.target
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        link = _Link(client=writer, upstream=up_writer)
        self.links.add(link)
        self.opened.set()
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]
        try:
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.links.discard(link)
            if not link.blackholed:
                link.abort()
            for task in link.tasks:
                task.cancel()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(READ_BYTES):
                if link.blackholed:
                    continue  # read and drop: the peer sees silence, not a close
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                step = self.split_bytes or len(data)
                for start in range(0, len(data), step):
                    writer.write(data[start : start + step])
                    await writer.drain()
        if link.blackholed:
            await asyncio.Event().wait()  # keep the half-open link until the test ends it
