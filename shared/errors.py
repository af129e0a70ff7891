"""Exceptions shared by the services.

Hierarchy::

    ChatError
    ├── ProtocolError       bad input; carries the PROTOCOL.md error ``code``
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

    ``code`` is one of the PROTOCOL.md error codes; ``message`` is safe to
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
    """The model API failed; ``message`` is written for the user to act on."""


class BrokerUnavailable(DependencyError):
    """NATS or Redis could not be reached."""
