"""Exceptions shared by the services.

Hierarchy::

    ChatError
    ├── ProtocolError       bad input; carries the protocol's error ``code`` (docs/protocol.md)
    ├── SessionStateError   right input in the wrong state (``resume`` when not paused)
    ├── ConfigError         a bad setting at start-up
    └── DependencyError     a failed dependency
        ├── UpstreamError       the model API failed
        └── BrokerUnavailable   NATS or Redis cannot be reached
"""

from __future__ import annotations

__all__ = [
    "ChatError",
    "ConfigError",
    "DependencyError",
    "UpstreamError",
    "BrokerUnavailable",
    "ProtocolError",
    "SessionStateError",
]


class ChatError(Exception):
    """Base class of every exception raised by this project."""


class ProtocolError(ChatError):
    """The client sent something the protocol does not allow.

    ``code`` is one of the protocol's error codes (docs/protocol.md); ``message`` is safe to
    show the client.
    """

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SessionStateError(ProtocolError):
    """The input is well formed but the session's state does not allow it."""


class ConfigError(ChatError):
    """A setting from the environment is missing or malformed."""


class DependencyError(ChatError):
    """A dependency (model API, NATS, Redis) failed."""


class UpstreamError(DependencyError):
    """The model API failed; the message is written for the user to act on.

    Args:
        message: what the user reads (the provider's own words where it gave some).
        code: the ``done`` frame's code for this end (``content_filter``,
            ``tool_calls``, ``model_auth``, ``model_not_found``, ``model_rate_limited``,
            ``model_unavailable``, ``context_too_long``, ``model_error``; docs/protocol.md).
        retryable: a transient failure before any answer (connection refused
            or reset, HTTP 408/429/502/503/504): the request may be sent again.
        retry_after_s: how long the server asked to wait (``Retry-After``).
        cause: a short technical description for the log (``HTTP 503``,
            ``ConnectError``), never shown to users.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        cause: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.cause = cause
        self.details: dict[str, object] = {}  # what the server said of the answer (its id, usage), for the log


class BrokerUnavailable(DependencyError):
    """NATS or Redis could not be reached."""
