"""The OpenAI client reads every recorded stream the same however the body is cut into reads:
split in two at every byte offset (inside a line end, a UTF-8 character, a compressed block),
it yields the same deltas and ends the same way as with the body in one read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.llm_worker.providers import OpenAICompatible
from services.llm_worker.settings import OpenAISettings
from shared.errors import UpstreamError
from tests.replay_server import Response, load_corpus

Outcome = tuple[list[tuple[str, str | None]], str | None]  # deltas (text, finish), then the error's code and text

# A stream of multi-byte characters (2, 3 and 4 bytes in UTF-8), CRLF line ends and a comment.
UTF8 = Response(
    head=b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream",
    body=(
        ': keep-alive\r\n\r\ndata: {"choices":[{"delta":{"content":"h\u00e9"}}]}\r\n\r\n'
        'data: {"choices":[{"delta":{"content":"\u20ac\U0001f600"}}]}\r\n\r\n'
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    ).encode(),
)
RESPONSES = {"utf8-crlf": UTF8} | {
    f"{name}#{n}": response
    for name, shape in load_corpus().items()
    for n, response in enumerate(shape.responses)
}


class Replay:
    """One recorded response, its body sent in the reads given to :meth:`outcome`."""

    def __init__(self, response: Response) -> None:
        status_line, *header_lines = response.head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
        self.parts: list[bytes] = []
        transport = httpx.MockTransport(self.handler)
        self.client = OpenAICompatible(OpenAISettings(base_url="http://model.test/v1"), transport=transport)

    def handler(self, request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for part in self.parts:
                yield part

        return httpx.Response(self.status, content=body(), headers=self.headers)

    async def outcome(self, parts: list[bytes]) -> Outcome:
        self.parts = parts
        deltas: list[tuple[str, str | None]] = []
        try:
            async for delta in self.client.stream([]):
                deltas.append((delta.text, delta.finish_reason))
        except UpstreamError as error:
            return deltas, f"{error.code}: {error}"
        return deltas, None


@pytest.mark.parametrize("name", sorted(RESPONSES))
async def test_every_split_of_a_recorded_stream_reads_the_same(name: str) -> None:
    body = RESPONSES[name].body
    replay = Replay(RESPONSES[name])
    whole = await replay.outcome([body])
    assert whole[0] or whole[1]  # something was read: the comparison below means something
    for offset in range(1, len(body)):
        assert await replay.outcome([body[:offset], body[offset:]]) == whole, f"split at byte {offset}"
    await replay.client.aclose()
