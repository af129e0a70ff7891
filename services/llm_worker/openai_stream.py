"""An OpenAI-compatible chat-completions stream as answer text and one classified end, without I/O.

Servers that call themselves OpenAI-compatible differ in where they put the
text, how they say they failed and how they end. :class:`ChatStream` takes
the decoded SSE events of one response and returns the answer's text; the end
is a :class:`Finish` (``stop`` or ``length``) or an :class:`UpstreamError`,
never a silent empty success. Each shape below has a recorded example, with
its source, in ``tests/data/openai_streams/``.

- Text: ``delta.content`` as a string, or as a list of typed parts (Mistral's
  reasoning models send ``[{"type":"thinking",...},{"type":"text","text":...}]``);
  ``delta.refusal`` (OpenAI's refusals); ``choices[0].text`` (completion-style
  chunks some proxies send).
- Reasoning is never answer text: ``reasoning_content`` (DeepSeek, vLLM,
  llama.cpp, LM Studio), ``reasoning`` (OpenRouter, Ollama, Groq),
  ``reasoning_details`` and ``thinking`` parts are only counted.
- Errors, in any of the forms servers use: an ``error`` value that is not
  null (OpenAI, Groq, LiteLLM, OpenRouter; a string for TGI), ``object:
  "error"`` (vLLM), an ``error`` event (llama.cpp), and the finish reasons
  ``error``, ``abort`` (vLLM) and ``insufficient_system_resource`` (DeepSeek).
- Ends: ``stop`` (also TGI's ``eos_token`` and ``stop_sequence``, and
  ``end_turn`` from Anthropic-style proxies), ``length`` (also ``max_tokens``
  and Mistral's ``model_length``), the content filter (Azure; ``code``
  ``content_filter``), tool calls (``code`` ``tool_calls``: this deployment
  offers the model no tools), and a body that ends with no finish and no
  ``[DONE]``, or with no text at all (vLLM before the first token, LM Studio
  and llama.cpp past the context size), which is an error.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared.errors import UpstreamError
from shared.redact import redact_secrets
from shared.sse import SSEEvent

__all__ = ["ChatStream", "Finish", "short", "error_code", "error_text"]

STOP_REASONS = frozenset({"stop", "eos_token", "eos", "stop_sequence", "end_turn"})
LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})
FILTER_REASONS = frozenset({"content_filter", "safety", "recitation", "prohibited_content", "blocklist"})
TOOL_REASONS = frozenset({"tool_calls", "function_call", "tool_use"})
ERROR_REASONS = frozenset({"error", "abort", "insufficient_system_resource", "cancelled"})


_TAG = re.compile(r"<[^>]*>")
_STACK_TRACE = re.compile(r"Traceback \(most recent call last\)|\bat [\w$.]+\([\w.]+:\d+\)|^\s+File \"", re.MULTILINE)


def short(text: str, limit: int = 300) -> str:
    """A provider's words fit for a user: one line, at most ``limit`` characters,
    markup stripped, credentials masked, and no stack trace (the server's
    internals, possibly with passwords in them, are not the user's business)."""
    if _STACK_TRACE.search(text):
        return "(the server sent a stack trace, withheld here; see its log)"
    text = html.unescape(_TAG.sub(" ", text.replace("\ufeff", "")))
    text = redact_secrets(text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Finish:
    """How the answer ended: ``reason`` is ``stop`` or ``length``; the rest is for the log."""

    reason: str
    upstream_reason: str | None = None  # the finish_reason as the server sent it
    response_id: str | None = None
    usage: dict[str, Any] | None = None
    reasoning_chars: int = 0

    def details(self) -> dict[str, Any]:
        """What to record with the turn (absent values left out)."""
        found = {
            "upstream_finish": self.upstream_reason,
            "response_id": self.response_id,
            "usage": self.usage,
            "reasoning_chars": self.reasoning_chars or None,
        }
        return {name: value for name, value in found.items() if value is not None}


@dataclass
class ChatStream:
    """The state of one streamed chat completion."""

    text_chars: int = 0
    reasoning_chars: int = 0
    response_id: str | None = None
    usage: dict[str, Any] | None = None
    upstream_reason: str | None = None
    tools: list[str] = field(default_factory=list)  # names of tool calls the model made

    def event(self, event: SSEEvent) -> tuple[str, Finish | None]:
        """Take one SSE event; return the answer text it carries and, if it ends
        the answer, the :class:`Finish`.

        Raises:
            UpstreamError: the event is an error, ends the answer in error
                (content filter, tool calls, an error finish, no answer at
                all), or is not a JSON object.
        """
        if event.event == "error":
            raise self._error(f"The model API reported an error: {error_text(event.data)}", "SSE error event")
        data = event.data.strip()
        if event.event != "message" or not data:
            return "", None  # a ping, debug or other named event, or empty data: not part of the answer
        if data == "[DONE]":
            return "", self._finish(None)
        return self._chunk(_object(data))

    def trailer(self, event: SSEEvent) -> bool:
        """Take an event that follows the finish (OpenAI's usage chunk); True at ``[DONE]``."""
        data = event.data.strip()
        if data == "[DONE]" or event.event == "error":
            return data == "[DONE]"
        try:
            self._meta(_object(data))
        except UpstreamError:
            pass  # the answer is complete; a bad trailer changes nothing
        return False

    def end_of_body(self, *, truncated: bool) -> UpstreamError:
        """The error for a body that ended with no finish and no ``[DONE]``."""
        if self.tools:
            try:
                self._finish(None)
            except UpstreamError as error:
                return error
        if truncated or self.text_chars:
            return self._error("The connection to the model API dropped mid-answer. Try again.", "body ended early")
        return self._error(_NO_ANSWER, "no content and no finish")

    def details(self) -> dict[str, Any]:
        """What the server said of this answer so far, for the log."""
        return Finish(
            reason="", upstream_reason=self.upstream_reason, response_id=self.response_id, usage=self.usage,
            reasoning_chars=self.reasoning_chars,
        ).details()

    def _error(self, message: str, cause: str, code: str | None = None) -> UpstreamError:
        error = UpstreamError(message, code=code, cause=cause)
        error.details = self.details()
        return error

    def _meta(self, payload: dict[str, Any]) -> None:
        if self.response_id is None and isinstance(payload.get("id"), str) and payload["id"]:
            self.response_id = payload["id"]
        usage = payload.get("usage")
        groq = payload.get("x_groq")  # Groq puts usage in its own field
        if not usage and isinstance(groq, dict):
            usage = groq.get("usage")
        if isinstance(usage, dict):
            self.usage = usage

    def _chunk(self, payload: dict[str, Any]) -> tuple[str, Finish | None]:
        try:
            self._meta(payload)
            error = payload.get("error")
            if error:  # "error": null (or {}) on healthy chunks is no error
                if error_code(payload) == "content_filter":
                    raise self._error(
                        f"The model provider's content filter stopped the answer: {error_text(payload)}",
                        "content filter error",
                        "content_filter",
                    )
                raise self._error(f"The model API reported an error: {error_text(payload)}", "error in chunk")
            if payload.get("object") == "error" or ("choices" not in payload and _error_words(payload)):
                # vLLM's ErrorResponse; a bare {"detail": ...} or {"message": ...} from a server framework
                raise self._error(f"The model API reported an error: {error_text(payload)}", "error object")
            choices = payload.get("choices") or []
            if not isinstance(choices, list):
                raise TypeError("choices is not a list")
            if not choices:
                return "", None  # Azure's prompt-filter chunk, a usage-only chunk
            first = choices[0]
            if len(choices) == 1 and isinstance(first, dict) and first.get("index", 0) == 0:
                choice: dict[str, Any] | None = first  # the usual chunk: one choice, the answer's
            elif not all(isinstance(c, dict) for c in choices):
                raise TypeError("choice is not an object")
            else:
                choice = next((c for c in choices if c.get("index", 0) == 0), None)
            if choice is None:
                return "", None  # another choice's chunk (n > 1): never part of this answer
            text = self._text(choice)
            reason = choice.get("finish_reason") or choice.get("finishReason")  # Gemini's beta said finishReason
        except (AttributeError, TypeError, KeyError):
            raise self._error("The model API sent an event of an unexpected shape.", "odd chunk shape") from None
        self.text_chars += len(text)
        return text, (self._finish(str(reason)) if reason else None)

    def _text(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message") or {}  # a whole completion, from a server that did not stream
        if not isinstance(delta, dict):
            raise TypeError("delta is not an object")
        content = delta.get("content")
        if content and isinstance(content, str) and delta.keys() <= _PLAIN_DELTA:
            return content  # the usual token: nothing else to look at (a saving per token)
        for name in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(name), str):
                self.reasoning_chars += len(delta[name])
        if isinstance(delta.get("reasoning_details"), list):
            self.reasoning_chars += len(json.dumps(delta["reasoning_details"]))
        for call in delta.get("tool_calls") or []:
            tool = ((call or {}).get("function") or {}).get("name")
            if tool:
                self.tools.append(str(tool))
        if delta.get("function_call"):
            self.tools.append(str(delta["function_call"].get("name") or "function"))
        text = self._parts(delta.get("content"))
        if isinstance(delta.get("refusal"), str):
            text += delta["refusal"]
        if not text and isinstance(choice.get("text"), str):
            text = choice["text"]  # completion-style chunk
        return text

    def _parts(self, content: Any) -> str:
        """Text from string or typed-part content; thinking parts are only counted."""
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, dict):
            content = [content]
        if not isinstance(content, list):
            raise TypeError("content is neither text nor parts")
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif not isinstance(part, dict):
                raise TypeError("content part is not an object")
            elif part.get("type") in ("text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif part.get("type") in ("thinking", "reasoning"):
                self.reasoning_chars += len(json.dumps(part.get("thinking") or part.get("text") or ""))
        return "".join(texts)

    def _finish(self, upstream: str | None) -> Finish:
        """Classify an end: ``upstream`` is the finish_reason, None for ``[DONE]``."""
        self.upstream_reason = upstream
        if self.tools and upstream not in ERROR_REASONS | FILTER_REASONS:
            upstream = "tool_calls"  # some servers say stop (or length) after a tool call
        cause = f"finish_reason {upstream}"
        if upstream in FILTER_REASONS:
            raise self._error("The model provider's content filter stopped the answer.", cause, "content_filter")
        if upstream in TOOL_REASONS:
            names = ", ".join(dict.fromkeys(self.tools)) or "a tool"
            raise self._error(
                f"The model asked to call {names}, which this deployment does not offer; the answer stops here.",
                cause,
                "tool_calls",
            )
        if upstream in ERROR_REASONS:
            raise self._error(f"The model API ended the answer with an error ({upstream}). Try again.", cause)
        reason = "length" if upstream in LENGTH_REASONS else "stop"  # stop, its synonyms, and undocumented reasons
        if not self.text_chars:
            # Never a silent empty answer marked complete.
            if upstream is None:
                raise self._error(_NO_ANSWER, "no content and no finish")
            if reason == "length":
                raise self._error(
                    "The model reached its length limit before writing any answer"
                    + (" (it spent it on reasoning)." if self.reasoning_chars else "."),
                    cause,
                )
            raise self._error(
                "The model finished without writing any answer"
                + (" (it sent only its reasoning)." if self.reasoning_chars else "."),
                cause,
            )
        return Finish(
            reason=reason,
            upstream_reason=self.upstream_reason,
            response_id=self.response_id,
            usage=self.usage,
            reasoning_chars=self.reasoning_chars,
        )


_PLAIN_DELTA = frozenset({"role", "content"})  # a delta of only these, with text, is plain text

_NO_ANSWER = (
    "The model API ended the stream without an answer (a prompt over the model's context size does this "
    "on some servers). Try a shorter conversation, or check the model server's log."
)


def _object(data: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamError("The model API sent malformed data (not JSON).", cause="event not JSON") from None
    if not isinstance(payload, dict):
        raise UpstreamError("The model API sent malformed data (not a JSON object).", cause="event not an object")
    return payload


def error_code(payload: Any) -> str | None:
    """``content_filter`` if an error value says the provider's content filter refused
    (Azure OpenAI: ``{"error": {"code": "content_filter", ...}}``), else None."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        inner = error.get("innererror")
        codes = {error.get("code"), inner.get("code") if isinstance(inner, dict) else None}
        if codes & {"content_filter", "ResponsibleAIPolicyViolation"}:
            return "content_filter"
    return None


def _error_words(payload: dict[str, Any]) -> bool:
    return any(isinstance(payload.get(key), str) for key in ("detail", "message"))


def error_text(value: Any) -> str:
    """The message in an error value of any shape: a string, JSON text, {"message"},
    {"error": {...}}, {"error": true, "message": ...}, or a list of those (Gemini)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return short(value) or "no details"
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, dict):
        inner = value.get("error")
        for candidate in (inner, value):
            if isinstance(candidate, dict):
                message = candidate.get("message") or candidate.get("msg") or candidate.get("detail")
                if message:
                    return short(str(message))
        if isinstance(inner, str) and inner:
            return short(inner)
        return short(json.dumps(value))
    return short(str(value)) or "no details"
