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

import json
from dataclasses import dataclass, field
from typing import Any

from shared.errors import UpstreamError
from shared.sse import SSEEvent

__all__ = ["ChatStream", "Finish", "short"]

STOP_REASONS = frozenset({"stop", "eos_token", "eos", "stop_sequence", "end_turn"})
LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})
FILTER_REASONS = frozenset({"content_filter", "safety", "recitation", "prohibited_content", "blocklist"})
TOOL_REASONS = frozenset({"tool_calls", "function_call", "tool_use"})
ERROR_REASONS = frozenset({"error", "abort", "insufficient_system_resource", "cancelled"})


def short(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: a provider's message, fit for a done."""
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
    tools: list[str] = field(default_factory=list)  # names of tool calls the model made

    def event(self, event: SSEEvent) -> tuple[str, Finish | None]:
        """Take one SSE event; return the answer text it carries and, if it ends
        the answer, the :class:`Finish`.

        Raises:
            UpstreamError: the event is an error, ends the answer in error
                (content filter, tool calls, an error finish), is not JSON, or is
                ``[DONE]`` with no answer before it.
        """
        if event.event == "error":
            raise UpstreamError(
                f"The model API reported an error: {_error_text(event.data)}", cause="SSE error event"
            )
        data = event.data.strip()
        if data == "[DONE]":
            return "", self._finish(None)
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            raise UpstreamError("The model API sent malformed data. Try again.", cause="event not JSON") from None
        if not isinstance(payload, dict):
            raise UpstreamError("The model API sent malformed data. Try again.", cause="event not an object")
        try:
            return self._chunk(payload)
        except (AttributeError, TypeError, KeyError):
            raise UpstreamError(
                "The model API sent an event of an unexpected shape. Try again.", cause="odd chunk shape"
            ) from None

    def end_of_body(self, *, truncated: bool) -> UpstreamError:
        """The error for a body that ended with no finish and no ``[DONE]``."""
        if truncated or self.text_chars:
            return UpstreamError("The connection to the model API dropped mid-answer. Try again.", cause="body ended early")
        return self._empty()

    def _chunk(self, payload: dict[str, Any]) -> tuple[str, Finish | None]:
        error = payload.get("error")
        if error:  # "error": null (or {}) on healthy chunks is no error
            raise UpstreamError(f"The model API reported an error: {_error_text(error)}", cause="error in chunk")
        if payload.get("object") == "error":  # vLLM's ErrorResponse
            raise UpstreamError(f"The model API reported an error: {_error_text(payload)}", cause="error object")
        if self.response_id is None and isinstance(payload.get("id"), str) and payload["id"]:
            self.response_id = payload["id"]
        usage = payload.get("usage") or (payload.get("x_groq") or {}).get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = payload.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError("choices is not a list")
        if not choices:
            return "", None  # Azure's prompt-filter chunk, a usage-only chunk
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), choices[0])
        if not isinstance(choice, dict):
            raise TypeError("choice is not an object")
        text = self._text(choice)
        self.text_chars += len(text)
        reason = choice.get("finish_reason")
        return text, (self._finish(str(reason)) if reason else None)

    def _text(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message") or {}
        if not isinstance(delta, dict):
            raise TypeError("delta is not an object")
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
        if self.tools and (upstream is None or upstream in TOOL_REASONS | STOP_REASONS):
            upstream = "tool_calls"  # some servers say stop after a tool call
        if upstream is None:
            if not self.text_chars:
                raise self._empty()
            upstream_reason, reason = None, "stop"
        elif upstream in LENGTH_REASONS:
            upstream_reason, reason = upstream, "length"
        elif upstream in FILTER_REASONS:
            raise UpstreamError(
                "The model provider's content filter stopped the answer.",
                code="content_filter",
                cause=f"finish_reason {upstream}",
            )
        elif upstream in TOOL_REASONS:
            names = ", ".join(dict.fromkeys(self.tools)) or "a tool"
            raise UpstreamError(
                f"The model asked to call {names}, which this deployment does not offer; the answer stops here.",
                code="tool_calls",
                cause=f"finish_reason {upstream}",
            )
        elif upstream in ERROR_REASONS:
            raise UpstreamError(
                f"The model API ended the answer with an error ({upstream}). Try again.", cause=f"finish_reason {upstream}"
            )
        else:  # stop, its synonyms, and any reason no server documents: the model finished
            upstream_reason, reason = upstream, "stop"
        return Finish(
            reason=reason,
            upstream_reason=upstream_reason,
            response_id=self.response_id,
            usage=self.usage,
            reasoning_chars=self.reasoning_chars,
        )

    def _empty(self) -> UpstreamError:
        return UpstreamError(
            "The model API ended the stream without an answer (a prompt over the model's context size does this "
            "on some servers). Try a shorter conversation, or check the model server's log.",
            cause="no content and no finish",
        )


def _error_text(value: Any) -> str:
    """The message in an error value of any shape: a string, {"message"}, {"error": {...}}, JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return short(value) or "no details"
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("msg") or inner.get("detail")
            return short(str(message)) if message else short(json.dumps(inner))
        if inner:
            return short(str(inner))
    return short(str(value)) or "no details"
