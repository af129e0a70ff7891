"""Model providers: the built-in demo model and any OpenAI-compatible API.

A provider turns a conversation into an async stream of :class:`Delta`: text,
then one last delta with the finish reason, or an :class:`UpstreamError`. The
OpenAI provider reads the stream's many shapes with
:class:`~.openai_stream.ChatStream` and maps every httpx failure to
:class:`UpstreamError` in one place (:func:`_map_httpx_errors`), with a
message a user can act on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from shared.errors import UpstreamError
from shared.sse import SSEDecoder, SSEEvent

from .openai_stream import ChatStream, error_code, error_text, short
from .settings import DemoModelSettings, OpenAISettings

__all__ = ["Message", "Delta", "Provider", "DemoModel", "OpenAICompatible", "retry_after_s"]


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Delta:
    """Some text, or (last) the finish reason, ``stop`` or ``length``, with
    what the server said of the answer (``details``: its own finish reason,
    response id, usage) for the turn's record."""

    text: str = ""
    finish_reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


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
    "A naive relay pauses by writing to a list and resumes by reading it back, and loses words in between.",
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
    """Streams ``/chat/completions`` from any OpenAI-compatible API over httpx.

    The stream's shapes are read by :class:`~.openai_stream.ChatStream`;
    transport and HTTP failures become :class:`UpstreamError` here, marked
    retryable when sending the request again may work.
    """

    def __init__(self, settings: OpenAISettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        # Identity: a compressed body could expand without bound inside the
        # decoder (a body sent compressed anyway is still decoded).
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if settings.api_key:
            if settings.api_key_header == "authorization":
                headers["Authorization"] = f"Bearer {settings.api_key}"
            else:  # Azure OpenAI takes its key as "api-key"
                headers[settings.api_key_header] = str(settings.api_key)
        # The base URL may carry a query (Azure's ?api-version=...): the path is appended before it.
        parts = urlsplit(settings.base_url)
        self.url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.client = httpx.AsyncClient(
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
        chat = ChatStream()
        try:
            with _map_httpx_errors(chat):
                async with self.client.stream("POST", self.url, json=body) as response:
                    async for delta in self._read(response, chat):
                        yield delta
        except UpstreamError as error:
            # A server may echo the key in its message ("Invalid header: Bearer sk-…").
            if self.settings.api_key and str(self.settings.api_key) in str(error):
                error.args = (str(error).replace(str(self.settings.api_key), "***"),)
            raise

    async def _read(self, response: httpx.Response, chat: ChatStream) -> AsyncIterator[Delta]:
        if response.status_code >= 300:
            raise await _http_error(response)
        media = response.headers.get("content-type", "").lower()
        if "html" in media:
            raise UpstreamError(
                "The model API answered with a web page, not a stream. Check CHAT_OPENAI_BASE_URL.", cause="200 with HTML"
            )
        body = _decoded(response)
        head = b""
        async for part in body:
            head = part.lstrip(_SNIFF_SKIP)  # blank lines and a BOM before the first sign carry nothing
            if head:
                break
        if "event-stream" not in media and head[:1] in (b"{", b"["):
            # A whole completion from a server that ignored "stream", or an error
            # sent with 200: JSON, whether labelled so or not labelled at all.
            raw = head + await _read_at_most(body, MAX_JSON_BODY_BYTES - len(head))
            text, finish = chat.event(SSEEvent(data=raw.decode("utf-8", errors="replace")))
            if finish is None:
                raise chat.end_of_body(truncated=False)
            yield Delta(text=text)
            yield Delta(finish_reason=finish.reason, details=finish.details())
            return
        # An event stream, also when mislabelled (some proxies send SSE as JSON or text/plain).
        decoder = SSEDecoder()
        events = _events(_prefixed(head, body), decoder)
        reasoned_at = 0.0
        async for event in events:
            reasoning = chat.reasoning_chars
            text, finish = chat.event(event)
            if text:
                yield Delta(text=text)
            elif chat.reasoning_chars > reasoning and time.monotonic() - reasoned_at >= 1.0:
                # A model that reasons is making progress: a textless delta, at most
                # once a second, tells the worker it is not stalled.
                reasoned_at = time.monotonic()
                yield Delta()
            if finish is not None:
                # The answer is complete. OpenAI-style servers send usage in one
                # more chunk; read on briefly for it, but never wait on a server
                # that goes on with keep-alives instead of closing.
                if chat.usage is None:
                    try:
                        async with asyncio.timeout(TRAILER_GRACE_S):
                            async for trailer in events:
                                if chat.trailer(trailer) or chat.usage is not None:
                                    break
                    except TimeoutError:
                        pass
                yield Delta(finish_reason=finish.reason, details=chat.details())
                return
        raise chat.end_of_body(truncated=decoder.truncated)


MAX_JSON_BODY_BYTES = 4 * 1024 * 1024  # a non-streamed completion is read whole, up to this
_SNIFF_SKIP = b"\xef\xbb\xbf \t\r\n"  # a byte order mark and white space before the body's first sign
TRAILER_GRACE_S = 0.25  # how long the usage chunk after a finish is waited for


async def _events(body: AsyncIterator[bytes], decoder: SSEDecoder) -> AsyncIterator[SSEEvent]:
    """The body's events, the last one included if only its blank line is missing."""
    async for raw in body:
        try:
            events = decoder.feed(raw)
        except ValueError:  # a line or event past the decoder's bound
            raise UpstreamError("The model API sent an event too large to read.", cause="event too large") from None
        for event in events:
            yield event
    for event in decoder.close():
        yield event


async def _decoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body, decoded from its Content-Encoding: httpx knows gzip, deflate, br and
    zstd; "x-gzip", which RFC 9110 section 8.4.1.3 says is gzip, is decoded here."""
    if response.headers.get("content-encoding", "").strip().lower() != "x-gzip":
        async for part in response.aiter_bytes():
            yield part
        return
    gunzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        async for part in response.aiter_raw():
            yield gunzip.decompress(part)
    except zlib.error:
        raise UpstreamError("The model API sent a compressed body that could not be decoded.", cause="x-gzip") from None


async def _prefixed(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for part in rest:
        yield part


async def _read_at_most(body: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """At most ``max_bytes`` more of ``body``."""
    raw = b""
    async for part in body:
        raw += part
        if len(raw) >= max_bytes:
            break
    return raw[:max_bytes]


RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})


async def _http_error(response: httpx.Response) -> UpstreamError:
    """What an HTTP error status means for the user, in the provider's words where it gave some."""
    status = response.status_code
    if status < 400:  # httpx follows no redirect: the base URL should name the final address
        return UpstreamError(
            f"The model API redirected the request (HTTP {status}) to {short(response.headers.get('location', 'elsewhere'), 200)}. "
            "Set CHAT_OPENAI_BASE_URL to that address.",
            cause=f"HTTP {status}",
        )
    payload, detail = await _error_body(response)
    if error_code(payload) == "content_filter":
        return UpstreamError(
            f"The model provider's content filter refused the prompt (HTTP {status}){detail}.",
            code="content_filter",
            cause=f"HTTP {status} content_filter",
        )
    if status == 401:
        code, message = "model_auth", f"The model API refused the key (HTTP 401){detail}. Check CHAT_OPENAI_API_KEY."
    elif status == 403:
        code = "model_auth"
        message = f"The model API refused access (HTTP 403){detail}. Check CHAT_OPENAI_API_KEY and the account's access."
    elif status == 404:
        code = "model_not_found"
        message = (
            f"The model API has no such model or endpoint (HTTP 404){detail}. "
            "Check CHAT_OPENAI_MODEL, and CHAT_OPENAI_BASE_URL (it usually ends in /v1)."
        )
    elif status == 429:
        code = "model_rate_limited"
        message = f"The model API is rate limiting this server (HTTP 429){detail}. Try again later."
    elif status >= 500 or status == 408:
        code, message = "model_unavailable", f"The model API is unavailable (HTTP {status}){detail}. Try again later."
    elif _CONTEXT_WORDS.search(detail):
        code = "context_too_long"
        message = f"The conversation is too long for the model (HTTP {status}){detail}. Start a new conversation."
    else:
        code = "model_error"
        message = f"The model API refused the request (HTTP {status}){detail}. Check the model settings."
    return UpstreamError(
        message,
        code=code,
        retryable=status in RETRYABLE_STATUS,
        retry_after_s=retry_after_s(response.headers),
        cause=f"HTTP {status}",
    )


_CONTEXT_WORDS = re.compile(r"context|too long|maximum.*tokens|token limit", re.IGNORECASE)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a response asks for: ``retry-after-ms`` (Azure, OpenAI) or ``Retry-After``
    as seconds or an HTTP date (RFC 9110 section 10.2.3); None if absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _seconds(raw_ms, scale=1000)
        if seconds is not None:
            return seconds
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _seconds(raw: str, *, scale: float = 1.0) -> float | None:
    """A header's number of seconds (of ``1/scale`` units), at least 0; None unless a finite number."""
    try:
        value = float(raw) / scale
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


async def _error_body(response: httpx.Response, *, max_bytes: int = 4096) -> tuple[Any, str]:
    """A failed response's body (parsed JSON, or None) and its message as ``": …"``,
    from the first ``max_bytes``; nothing from an HTML page."""
    if "html" in response.headers.get("content-type", "").lower():
        return None, ""
    try:
        text = (await _read_at_most(_decoded(response), max_bytes)).decode("utf-8", errors="replace").strip()
    except (httpx.HTTPError, UpstreamError):
        return None, ""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        words = short(text, 200)
        return None, (f": {words}" if words else "")
    return payload, f": {error_text(payload)}" if payload else ""


@contextmanager
def _map_httpx_errors(chat: ChatStream) -> Iterator[None]:
    """httpx's failures as UpstreamError, in one place (httpx maps httpcore's the same way)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        connecting = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        raise UpstreamError(
            "The model API did not answer in time. Try again later.",
            code="model_unavailable",
            retryable=connecting,
            cause=type(exc).__name__,
        ) from None
    except httpx.ConnectError as exc:
        raise UpstreamError(
            "Could not reach the model API. Check that it is running at CHAT_OPENAI_BASE_URL.",
            code="model_unavailable",
            retryable=True,
            cause=type(exc).__name__,
        ) from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        # A reset before any answer is worth one more try; the worker never retries after text.
        if chat.text_chars:
            message = "The connection to the model API dropped mid-answer. Try again."
        else:
            message = "The model API closed the connection without answering. Try again later."
        raise UpstreamError(message, code="model_unavailable", retryable=True, cause=type(exc).__name__) from None
    except httpx.DecodingError:
        raise UpstreamError(
            "The model API sent a compressed body that could not be decoded.", cause="DecodingError"
        ) from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The model API request failed ({type(exc).__name__}).", cause=type(exc).__name__) from None


def create_provider(provider: str, *, demo: DemoModelSettings, openai: OpenAISettings) -> Provider:
    if provider == "openai":
        return OpenAICompatible(openai)
    return DemoModel(demo)
