"""Model providers: the built-in demo model and any OpenAI-compatible API.

A provider turns a conversation into an async stream of :class:`Delta`. The
OpenAI provider maps every httpx failure to :class:`UpstreamError` in one
place (:func:`_map_httpx_errors`), with a message a user can act on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import httpx

from shared.errors import UpstreamError
from shared.sse import SSEDecoder

from .settings import DemoModelSettings, OpenAISettings

__all__ = ["Message", "Delta", "Provider", "DemoModel", "OpenAICompatible"]


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Delta:
    """Some text, or (last) the finish reason: ``stop`` or ``length``."""

    text: str = ""
    finish_reason: str | None = None


class Provider(Protocol):
    def stream(self, messages: Sequence[Message]) -> AsyncIterator[Delta]: ...

    async def aclose(self) -> None: ...


_SENTENCES = [
    "Streaming an answer token by token lets a reader start long before the model has finished.",
    "Every chunk carries a sequence number, so a client that reconnects asks only for what it missed.",
    "While you are paused the model keeps writing, and its words wait in Redis until you come back.",
    "A gateway can fail at any moment; the next one picks up the session from the same record.",
    "NATS moves the words between services, and Redis remembers them for as long as the session lives.",
    "The buffer stores each frame before any gateway sees it, which is why nothing can slip through a gap.",
    "Good systems assume the network will drop, stall and reorder, and make those events boring.",
    "A worker only takes a request when it has room for it, so a busy cluster queues instead of collapsing.",
    "Backoff with jitter keeps a crowd of reconnecting clients from arriving at the same instant.",
    "Exactly once, in order, with no gap: that promise is kept by the cursor, not by luck.",
    "The original sketch paused by writing to a list and resumed by reading it back, and lost words in between.",
    "Here the pause is a flag on the session, shared by every tab and every gateway that serves it.",
    "If you stop the answer, the worker closes its request upstream and the turn ends cleanly.",
    "History keeps each prompt with its full answer, so the next turn has the whole conversation.",
    "Consider a long train journey through tunnels: the story should continue where the tunnel began.",
    "Rivers do not stop when you look away; they are simply waiting for you downstream.",
    "An astronomer once said that the universe is under no obligation to make sense to us.",
    "Still, a well built stream should make sense to anyone who reads it from the start.",
]


class DemoModel:
    """An offline model that streams readable text at a steady token rate.

    The answer quotes the prompt, then continues with sentences chosen by a
    generator seeded from the conversation, so the same conversation gives
    the same answer.
    """

    def __init__(self, settings: DemoModelSettings) -> None:
        self.settings = settings

    def _tokens(self, messages: Sequence[Message]) -> Iterator[str]:
        prompt = messages[-1].content
        digest = hashlib.sha256(json.dumps([m.content for m in messages]).encode()).digest()
        rng = random.Random(digest)
        turn = sum(1 for m in messages if m.role == "user")
        quoted = prompt if len(prompt) <= 200 else prompt[:200] + "…"
        words = f'You said: "{quoted}". This is turn {turn} of our conversation.'.split(" ")
        yield words[0]
        for word in words[1:]:
            yield " " + word
        while True:
            # Walk a shuffled deck, so no sentence repeats until all were used.
            deck = list(_SENTENCES)
            rng.shuffle(deck)
            for sentence in deck:
                separator = "\n\n" if rng.random() < 0.2 else " "
                for index, word in enumerate(sentence.split(" ")):
                    yield (separator if index == 0 else " ") + word

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.settings.tokens_per_s
        next_at = loop.time()
        for count, token in enumerate(self._tokens(messages)):
            if count >= self.settings.answer_tokens:
                yield Delta(finish_reason="length")
                return
            # Pace against a schedule so the rate does not drift, but never
            # burst to catch up after a stall: a late token resets the schedule.
            next_at = max(next_at + interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
            yield Delta(text=token)
        yield Delta(finish_reason="stop")  # pragma: no cover - the generator is endless

    async def aclose(self) -> None:
        return None


class OpenAICompatible:
    """Streams ``/chat/completions`` from any OpenAI-compatible API over httpx."""

    def __init__(self, settings: OpenAISettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        headers = {"Accept": "text/event-stream"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self.client = httpx.AsyncClient(
            base_url=settings.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.connect_timeout_s,
                pool=settings.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[Delta]:
        body = {
            "model": self.settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        with _map_httpx_errors():
            async with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    detail = await _error_detail(response)
                    raise UpstreamError(
                        f"The model API answered HTTP {response.status_code}{detail}. "
                        "Try again, or check the model settings."
                    )
                if "json" in response.headers.get("content-type", ""):
                    # A JSON body instead of a stream: an error some servers send with 200.
                    detail = await _error_detail(response)
                    raise UpstreamError(f"The model API answered with JSON, not a stream{detail}. Try again.")
                decoder = SSEDecoder()
                async for raw in response.aiter_raw():
                    try:
                        events = decoder.feed(raw)
                    except ValueError:  # a line or event past the decoder's bound
                        raise UpstreamError("The model API sent an event too large to read. Try again.") from None
                    for event in events:
                        if event.data.strip() == "[DONE]":
                            yield Delta(finish_reason="stop")
                            return
                        delta = _parse_event(event.data)
                        if delta.text:
                            yield Delta(text=delta.text)
                        if delta.finish_reason:
                            # The answer is complete: whatever follows ([DONE], or
                            # keep-alives from a server that never closes) is not awaited.
                            yield Delta(finish_reason=delta.finish_reason)
                            return
                raise UpstreamError("The model API ended the answer early. Try again.")


def _parse_event(data: str) -> Delta:
    """One ``chat.completion.chunk`` event as a Delta.

    Raises:
        UpstreamError: the event is not JSON, is an error, or has a shape no
            OpenAI-compatible server sends (the message says so, instead of
            the worker's exception).
    """
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamError("The model API sent malformed data. Try again.") from None
    if not isinstance(payload, dict):
        raise UpstreamError("The model API sent malformed data. Try again.")
    error = payload.get("error")
    if error:  # "error": null is no error
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError(f"The model API reported an error: {_short(str(message))}")
    try:
        choices = payload.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return Delta()
        choice = choices[0]
        content = (choice.get("delta") or {}).get("content") or ""
        reason = choice.get("finish_reason")
    except (AttributeError, TypeError, KeyError):
        raise UpstreamError("The model API sent an event of an unexpected shape. Try again.") from None
    if not reason:
        reason = None  # null, or the "" some proxies send on every chunk
    elif reason not in ("stop", "length"):
        reason = "stop"  # tool_calls, content_filter: the text part ended
    return Delta(text=content if isinstance(content, str) else "", finish_reason=reason)


async def _error_detail(response: httpx.Response, *, max_bytes: int = 4096) -> str:
    """The error message in the first ``max_bytes`` of a failed response's body, as ``": …"``."""
    raw = b""
    try:
        async for part in response.aiter_bytes():
            raw += part
            if len(raw) >= max_bytes:
                break
    except httpx.HTTPError:
        return ""
    try:
        payload = json.loads(raw[:max_bytes])
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, RecursionError):
        message = raw[:200].decode("utf-8", errors="replace")
    return f": {_short(str(message))}" if message else ""


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def _map_httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamError("The model API did not answer in time. Try again later.") from None
    except httpx.ConnectError:
        raise UpstreamError("Could not reach the model API. Check that it is running.") from None
    except (httpx.RemoteProtocolError, httpx.ReadError):
        raise UpstreamError("The connection to the model API dropped mid-answer. Try again.") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The model API request failed ({type(exc).__name__}). Try again.") from None


def create_provider(provider: str, *, demo: DemoModelSettings, openai: OpenAISettings) -> Provider:
    if provider == "openai":
        return OpenAICompatible(openai)
    return DemoModel(demo)
