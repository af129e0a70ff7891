"""A local OpenAI-compatible streaming server for tests, under real uvicorn.

Behaviour is chosen by a marker in the last user message:
``[500]`` HTTP 500 with an error body; ``[drop]`` a few tokens, then the
connection is cut; ``[error-event]`` an error payload mid-stream; ``[long]``
a slow endless stream (for stop); ``[text:N:REASON]`` N bytes of text in
1,000-byte deltas, then ``finish_reason`` REASON (a model that runs away, as
in OpenAI's ``length`` finish); ``[forever]`` text as fast as it is read,
never finishing; ``[stall]`` a role chunk, then silence until the client
leaves; ``[surrogates]`` an emoji cut into its two UTF-16 halves across two
events (what proxies that cut by UTF-16 unit send), then lone halves;
``[bad-delta]`` a ``delta`` that is a list, not an object; ``[keepalive]``
one delta, then only comments and empty deltas, never closing;
``[finish-then-idle]`` an answer and its finish, then keep-alives, never
``[DONE]`` nor the end of the response; ``[burst:N]`` a delta, then N bytes of
text and the finish in one write (a model far faster than delivery);
``[gated]`` a delta, then the finish once the test sets ``gate``; anything else a
normal answer whose SSE events are split across writes, merged into one
write, and interleaved with keep-alive comments.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from devstack.servers import free_port

ANSWER = ["Hello", " from", " the", " fake", " model", "."]
TEXT_BLOCK = "".join(f"{n:04d} runs on. " for n in range(100))[:1000]  # 1,000 ASCII bytes


def _event(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _delta(text: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict] = []  # type: ignore[type-arg]
        self.disconnected = threading.Event()
        self.requested = threading.Event()  # a completion request arrived
        self.gate = threading.Event()  # a "[gated]" answer finishes once this is set
        self.authorization: list[str | None] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.requested.set()
        self.authorization.append(request.headers.get("authorization"))
        prompt = body["messages"][-1]["content"]
        if "[500]" in prompt:
            return JSONResponse({"error": {"message": "the model is overloaded"}}, status_code=500)
        return StreamingResponse(self._stream(prompt), media_type="text/event-stream")

    async def _stream(self, prompt: str) -> AsyncIterator[bytes]:
        if sized := re.search(r"\[text:(\d+):(\w+)\]", prompt):
            left = int(sized.group(1))
            while left:
                step = min(left, len(TEXT_BLOCK))
                yield _delta(TEXT_BLOCK[:step])
                left -= step
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": sized.group(2)}]})
            yield b"data: [DONE]\n\n"
            return
        if "[forever]" in prompt:
            try:
                while True:
                    yield _delta(TEXT_BLOCK)
                    await asyncio.sleep(0)  # let the server notice the client leaving
            finally:
                self.disconnected.set()
        if "[stall]" in prompt:
            try:
                yield _event({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                await asyncio.Event().wait()
            finally:
                self.disconnected.set()
        if "[surrogates]" in prompt:
            # json.dumps escapes a lone surrogate as "\ud83d": valid JSON, half a character.
            for piece in ["a\ud83d", "\ude00b", "\ud83d", "c", "\ude00", "d\ud83d"]:
                yield _delta(piece)
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield b"data: [DONE]\n\n"
            return
        if "[bad-delta]" in prompt:
            yield _delta("before")
            yield _event({"choices": [{"index": 0, "delta": ["not", "an", "object"], "finish_reason": None}]})
            yield b"data: [DONE]\n\n"
            return
        if "[gated]" in prompt:
            yield _delta("waiting")
            await asyncio.to_thread(self.gate.wait)
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            return
        if "[keepalive]" in prompt:
            yield _delta("hold on")
            while True:
                yield b": still here\n\n"
                yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": None}]})
                await asyncio.sleep(0.2)
        if "[finish-then-idle]" in prompt:
            yield _delta("all done")
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            while True:
                yield b": idle\n\n"
                await asyncio.sleep(0.2)
        if burst := re.search(r"\[burst:(\d+)\]", prompt):
            yield _delta("first")
            await asyncio.sleep(0.05)
            blocks = [_delta(TEXT_BLOCK)] * (int(burst.group(1)) // len(TEXT_BLOCK))
            yield b"".join([*blocks, _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})])
            yield b"data: [DONE]\n\n"
            return
        if "[long]" in prompt:
            try:
                for index in range(10_000):
                    yield _delta(f" w{index}")
                    await asyncio.sleep(0.02)
            finally:  # the client closed the request
                self.disconnected.set()
            return
        if "[drop]" in prompt:
            yield _delta("partial")
            yield _delta(" answer")
            raise RuntimeError("connection cut mid-stream")  # uvicorn aborts the response
        if "[error-event]" in prompt:
            yield _delta("some")
            yield _event({"error": {"message": "content policy triggered"}})
            return
        yield b": keep-alive\n\n"
        first = _delta(ANSWER[0])
        yield first[:7]  # one event split across two writes
        yield first[7:]
        yield _delta(ANSWER[1]) + _delta(ANSWER[2])  # two events in one write
        for text in ANSWER[3:]:
            yield _delta(text)
            yield b": ping\n\n"
        yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield b"data: [DONE]\n\n"


@contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("fake server failed to start")
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
