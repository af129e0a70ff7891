"""A lean WebSocket client for the load generator.

The load generator shares two cores with what it measures, so each frame it
reads must cost little: this client parses server frames in one
``data_received`` callback and hands each text message to a callback, with no
task or queue per frame. It speaks only what the benchmark needs: text
frames, ping/pong and close. Client frames use the all-zero mask (legal, and
the payload then needs no XOR); a real client must use random masks.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from typing import cast

from shared.protocol import SUBPROTOCOL

__all__ = ["WsConnection", "connect"]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ZERO_MASK = b"\x00\x00\x00\x00"


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + ZERO_MASK + payload


class WsConnection(asyncio.Protocol):
    def __init__(self, request: bytes, on_text: Callable[[str], None]) -> None:
        self.request = request
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:end]).split(b"\r\n", 1)[0]
            del self.buffer[: end + 4]
            if b" 101 " not in status:
                self.upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            opcode, length, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, start = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < start + length:
                return
            fin = buf[0] & 0x80
            payload = bytes(buf[start : start + length])
            del buf[: start + length]
            if opcode in (OP_TEXT, OP_CONT, OP_BINARY):
                if not fin:
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join([*self.fragments, payload])
                    self.fragments = []
                self.on_text(payload.decode())
            elif opcode == OP_PING:
                self._write(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._write(OP_CLOSE, payload[:2])
                assert self.transport is not None
                self.transport.close()

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self._write(OP_TEXT, text.encode())

    async def close(self) -> None:
        self._write(OP_CLOSE, (1000).to_bytes(2, "big"))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 5)
        except TimeoutError:
            pass
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int, path: str, on_text: Callable[[str], None]) -> WsConnection:
    """Open ``ws://host:port/path`` with the protocol's subprotocol."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: WsConnection(request, on_text), host, port)
    await asyncio.wait_for(protocol.upgraded, 30)
    return protocol
