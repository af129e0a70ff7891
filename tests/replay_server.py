"""A model server that replays recorded HTTP responses exactly, for the conformance corpus.

Each file in ``tests/data/openai_streams/`` is one stream shape a real server
sends, with its source. Its header lines (``# key: value``) say where it comes
from and what the product must make of it; then come one or more HTTP
responses, one per attempt, separated by ``=== next attempt ===``:

    # source: https://… (what the page or bug report shows)
    # expect: {"text": "Hello", "reason": "stop"}
    # line-ends: crlf        (optional: the body's LF become CRLF, or CR)
    # bom: yes               (optional: the body starts with a UTF-8 byte order mark)
    # cut: 9                 (optional: the last 9 bytes never arrive, the connection just closes)
    HTTP/1.1 200 OK
    Content-Type: text/event-stream
    Content-Encoding: gzip   (optional: the body is sent compressed so)

    data: {...}

The server is plain asyncio on a socket, so nothing between it and the
worker reframes the body: it writes the status line and headers as recorded
(plus ``Connection: close``), then the body whole or one byte per write, and
closes. The prompt names the shape, the split and a run id:
``[shape:NAME:bytes:RUN]``; attempts are counted per run.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli

from devstack.servers import free_port

CORPUS = Path(__file__).parent / "data" / "openai_streams"
NEXT_ATTEMPT = "=== next attempt ==="
PROMPT = re.compile(r"\[shape:([\w.-]+):(whole|bytes):(\w+)\]")


@dataclass
class Response:
    head: bytes  # status line and headers, CRLF-separated, without the blank line
    body: bytes


@dataclass
class Shape:
    name: str
    source: str
    expect: dict[str, Any]
    responses: list[Response] = field(default_factory=list)


def load_corpus(directory: Path = CORPUS) -> dict[str, Shape]:
    return {shape.name: shape for shape in map(load_shape, sorted(directory.glob("*.http")))}


def load_shape(path: Path) -> Shape:
    text = path.read_text(encoding="utf-8")
    options: dict[str, str] = {}
    lines = text.split("\n")
    while lines and lines[0].startswith("#"):
        key, _, value = lines.pop(0)[1:].partition(":")
        options[key.strip()] = value.strip()
    shape = Shape(name=path.stem, source=options["source"], expect=json.loads(options["expect"]))
    for raw in "\n".join(lines).split(NEXT_ATTEMPT + "\n"):
        head, _, body = raw.partition("\n\n")
        data = body.encode()
        ending = {"crlf": b"\r\n", "cr": b"\r"}.get(options.get("line-ends", ""), b"\n")
        data = data.replace(b"\n", ending)
        if options.get("bom") == "yes":
            data = b"\xef\xbb\xbf" + data
        headers = head.strip().split("\n")
        encoding = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("content-encoding:")), "")
        data = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}.get(encoding, bytes)(data)
        if "cut" in options:
            data = data[: -int(options["cut"])]
        shape.responses.append(Response(head="\r\n".join([*headers, "Connection: close"]).encode(), body=data))
    return shape


class ReplayServer:
    """Serves the corpus on a loopback port, in a thread of its own."""

    def __init__(self, shapes: dict[str, Shape]) -> None:
        self.shapes = shapes
        self.attempts: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []  # path, headers and body of each request

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
            self.requests.append({"path": request_line.split(" ")[1], "headers": headers, "body": body})
            match = PROMPT.search(body["messages"][-1]["content"])
            assert match is not None, "the prompt names no shape"
            name, split, run = match.groups()
            attempt = self.attempts[run]
            self.attempts[run] += 1
            responses = self.shapes[name].responses
            response = responses[min(attempt, len(responses) - 1)]
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(response.head + b"\r\n\r\n")
            await writer.drain()
            step = 1 if split == "bytes" else len(response.body) or 1
            for start in range(0, len(response.body), step):
                writer.write(response.body[start : start + step])
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the worker went away (a stop): nothing to answer
        finally:
            writer.close()

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Run until the block ends; yield the base URL to give the worker."""
        port = free_port()
        ready = threading.Event()
        running: dict[str, Any] = {}

        async def main() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", port)
            running["loop"], running["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            async with server:
                await running["stop"].wait()

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("the replay server did not start")
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            running["loop"].call_soon_threadsafe(running["stop"].set)
            thread.join(10)
