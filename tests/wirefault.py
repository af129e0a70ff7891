"""A WebSocket proxy that breaks the client contract on purpose.

It sits between a client and a real gateway: each client connection gets
its own connection to the gateway at the same path and query, with the same
subprotocol and credentials, and every frame is relayed both ways. Frames
from the gateway pass through the configured :class:`Fault` (one each,
acting once, on a set seq or event, so a run is deterministic), which lets a
test show that the strict wire checker (``tests/wire.py``) sees a faulty
server through a real client's code path. With no fault it is transparent.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from shared.protocol import SUBPROTOCOL

__all__ = ["Fault", "FaultKind", "WireFaultProxy"]

FORWARDED_HEADERS = ("Authorization", "Origin")
CHAT = Subprotocol(SUBPROTOCOL)


class FaultKind(enum.Enum):
    SKIP = "skip"  # drop the chunk with seq ``Fault.seq``
    DUPLICATE = "duplicate"  # send the chunk with seq ``Fault.seq`` twice
    REORDER = "reorder"  # send chunk ``Fault.seq`` after the chunk that follows it
    DOUBLE_DONE = "double_done"  # send the first done twice (``next_seq``: the copy one seq on)
    AFTER_PAUSED = "after_paused"  # a chunk still in flight arrives after ``paused`` (whose seq is the one before it)
    RESUME_MISMATCH = "resume_mismatch"  # ``resumed.seq`` one past ``paused.seq``
    IGNORE_LAST_SEQ = "ignore_last_seq"  # a reconnect's ``last_seq`` goes upstream as 0: the replay repeats frames


@dataclass(frozen=True)
class Fault:
    """One fault of the gateway's, acting once."""

    kind: FaultKind
    seq: int = 3  # the chunk SKIP, DUPLICATE and REORDER act on
    next_seq: bool = False  # DOUBLE_DONE: the copy takes the next seq (a second done of the same turn)


class WireFaultProxy:
    """Relays WebSockets to the gateway at ``port``, applying ``faults`` to
    what the gateway sends. Use as ``async with``; clients connect to
    ``port`` (:attr:`port`) with the gateway's paths."""

    def __init__(self, port: int, *faults: Fault, host: str = "127.0.0.1") -> None:
        self.upstream = f"ws://{host}:{port}"
        self.faults = {fault.kind: fault for fault in faults}
        self.fired: list[FaultKind] = []  # the faults that acted, in order
        self.connections = 0
        self.port = 0
        self._server: Server | None = None
        self._links: dict[ServerConnection, ClientConnection] = {}

    async def __aenter__(self) -> WireFaultProxy:
        self._server = await serve(
            self._relay,
            "127.0.0.1",
            0,
            process_request=self._open_upstream,
            select_subprotocol=lambda _, offered: CHAT if CHAT in offered else None,
            ping_interval=None,  # the gateway's pings and the client's pongs pass through instead
        )
        self.port = list(self._server.sockets)[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for upstream in self._links.values():  # opened for a handshake that then failed
            await upstream.close()

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def _once(self, kind: FaultKind, when: bool = True) -> bool:
        """Whether the fault ``kind`` is configured, has not acted yet, and acts now."""
        if kind not in self.faults or kind in self.fired or not when:
            return False
        self.fired.append(kind)
        return True

    def _at(self, kind: FaultKind, seq: object) -> bool:
        return kind in self.faults and self.faults[kind].seq == seq

    async def _open_upstream(self, client: ServerConnection, request: Request) -> Response | None:
        """Open the gateway's side before accepting the client's, so a refusal
        (its status and body) reaches the client as the gateway gave it."""
        parts = urlsplit(request.path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        reconnect = any(k == "last_seq" and v not in ("", "0") for k, v in query)
        if self._once(FaultKind.IGNORE_LAST_SEQ, reconnect):
            query = [(k, "0" if k == "last_seq" else v) for k, v in query]
        path = urlunsplit(("", "", parts.path, urlencode(query), ""))
        offered = [Subprotocol(p.strip()) for p in ",".join(request.headers.get_all("Sec-WebSocket-Protocol")).split(",") if p.strip()]
        headers = [(name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers]
        try:
            upstream = await connect(
                self.upstream + path,
                subprotocols=offered or None,
                additional_headers=headers,
                ping_interval=None,
            )
        except InvalidStatus as exc:
            return exc.response
        except (OSError, InvalidHandshake) as exc:
            return client.respond(502, f"the proxy cannot reach the gateway: {exc}")
        self._links[client] = upstream
        self.connections += 1
        return None

    async def _relay(self, client: ServerConnection) -> None:
        upstream = self._links.pop(client)
        held: list[dict[str, Any]] = []  # a chunk the fault keeps back for now

        async def up() -> None:
            async for message in client:
                await upstream.send(message)

        async def down() -> None:
            async for message in upstream:
                try:
                    frame = json.loads(message)
                except ValueError:
                    frame = None
                if not isinstance(frame, dict):  # plain text (compatibility mode): nothing to break
                    await client.send(message)
                    continue
                for out in self._rewrite(frame, held):
                    await client.send(message if out is frame else json.dumps(out))
            for out in held:
                await client.send(json.dumps(out))

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a peer gone mid-send: handled below
        # Pass the close on as it came: a code the peer can see, else an abort.
        for source, target in ((upstream, client), (client, upstream)):
            code = source.close_code
            if code is not None and code not in (1005, 1006):
                await target.close(code, source.close_reason or "")
            elif code is not None:
                target.transport.abort()

    def _rewrite(self, frame: dict[str, Any], held: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The frames to send the client for one the gateway sent."""
        kind, seq = frame.get("type"), frame.get("seq")
        faults = self.faults
        if kind == "chunk":
            if self._once(FaultKind.SKIP, self._at(FaultKind.SKIP, seq)):
                return []
            if self._once(FaultKind.DUPLICATE, self._at(FaultKind.DUPLICATE, seq)):
                return [frame, frame]
            if self._once(FaultKind.REORDER, self._at(FaultKind.REORDER, seq)):
                held.append(frame)
                return []
            if held and FaultKind.REORDER in faults:
                return [frame, held.pop()]
            if FaultKind.AFTER_PAUSED in faults and FaultKind.AFTER_PAUSED not in self.fired:
                out = held[:]  # one chunk behind, so a paused can overtake it
                held[:] = [frame]
                return out
        elif kind == "done":
            out = [*held, frame]
            held.clear()
            if self._once(FaultKind.DOUBLE_DONE):
                out.append({**frame, "seq": frame["seq"] + 1} if faults[FaultKind.DOUBLE_DONE].next_seq else frame)
            return out
        elif kind == "paused" and held and self._once(FaultKind.AFTER_PAUSED):
            chunk = held.pop()
            return [{**frame, "seq": chunk["seq"] - 1}, chunk]
        elif kind == "resumed" and self._once(FaultKind.RESUME_MISMATCH):
            return [{**frame, "seq": frame["seq"] + 1}]
        return [frame]
