"""Token sources that stamp every token with its emit time.

Each token's text is ``" <microseconds since the epoch>"``, so a client can
tell, for every token, how long the whole path took after the source emitted
it. A prompt (or a start request) sets the stream: ``rate=30 tokens=240``;
a prompt ending ``text=words`` gets English word pieces instead of stamps
(for measuring what a realistic answer costs to store). The first token goes
out as the request arrives, so a source adds no first-token delay of its own.

- ``--http PORT``: an OpenAI-compatible ``/chat/completions`` server streaming
  SSE over chunked HTTP/1.1 with keep-alive, for the worker (so its httpx path
  is measured).
- ``--nats URL``: answers ``bench.start`` requests by publishing protocol
  frames straight onto a NATS subject: the source for the bare relay.

Written on raw asyncio protocols to cost the shared CPU as little as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import cast

import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

__all__ = ["parse_stream_spec", "stamp", "START_SUBJECT", "WORDS"]

START_SUBJECT = "bench.start"
_SPEC = re.compile(r"rate=(\d+(?:\.\d+)?) tokens=(\d+)")


def parse_stream_spec(text: str) -> tuple[float, int]:
    """(tokens per second, token count) from a prompt; 30/s × 30 when absent."""
    match = _SPEC.search(text)
    return (float(match[1]), int(match[2])) if match else (30.0, 30)


# Word pieces as a tokenizer cuts English prose: a leading space, ~4 bytes each.
_PROSE = (
    "The stream ing answer arrives one token at a time , and each piece is stored before the client"
    " reads it . A reader who leaves and comes back gets what it missed from the log , in order ,"
    " without gaps or repeats ; the model keeps generating while the reader is paused ."
)
WORDS = tuple(w if w in {",", ".", ";", "ing"} else " " + w for w in _PROSE.split(" "))


def stamp() -> str:
    return f" {time.time_ns() // 1000}"


async def paced(rate: float, tokens: int) -> AsyncIterator[int]:
    """Yield token indexes on a fixed schedule, the first at once (late ticks fire at once)."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    next_at = loop.time() - interval
    for index in range(tokens):
        next_at += interval
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield index


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_FINAL = _chunked(
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
) + b"0\r\n\r\n"
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class CompletionsServer(asyncio.Protocol):
    """One keep-alive HTTP connection; requests are answered one at a time."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answering is not None:
            self.answering.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _next_request(self) -> None:
        if self.answering is not None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buffer[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self.answering = asyncio.ensure_future(self._answer(body))

    async def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        transport = self.transport
        try:
            prompt = json.loads(body)["messages"][-1]["content"]
            rate, tokens = parse_stream_spec(prompt)
            words = prompt.endswith("text=words")
            transport.write(_HEAD)
            async for index in paced(rate, tokens):
                if transport.is_closing():
                    return
                text = WORDS[index % len(WORDS)] if words else stamp()
                event = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % text.encode()
                transport.write(_chunked(event))
            transport.write(_FINAL)
        finally:
            self.answering = None
        self._next_request()


async def publish_stream(nc: NATS, subject: str, rate: float, tokens: int) -> None:
    """The bare relay's source: protocol frames straight onto ``subject``."""
    async for index in paced(rate, tokens):
        await nc.publish(subject, b'{"type":"chunk","seq":%d,"turn":1,"text":"%s"}' % (index + 1, stamp().encode()))
    await nc.publish(subject, b'{"type":"done","seq":%d,"turn":1,"reason":"stop"}' % (tokens + 1))


async def serve(http_port: int | None, nats_url: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if http_port is not None:
        await loop.create_server(CompletionsServer, "127.0.0.1", http_port, backlog=4096)
    if nats_url is not None:
        nc = await nats.connect(nats_url)
        streams: set[asyncio.Task[None]] = set()

        async def on_start(msg: Msg) -> None:
            spec = json.loads(msg.data)
            task = asyncio.create_task(publish_stream(nc, spec["subject"], spec["rate"], spec["tokens"]))
            streams.add(task)
            task.add_done_callback(streams.discard)
            await msg.respond(b"ok")

        await nc.subscribe(START_SUBJECT, cb=on_start)
        await nc.flush()
    print("upstream ready", flush=True)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http", type=int, help="serve /chat/completions on this port")
    parser.add_argument("--nats", help="answer bench.start requests on this NATS")
    args = parser.parse_args()
    uvloop.run(serve(args.http, args.nats))


if __name__ == "__main__":
    main()
