"""The Python client: a sans-I/O session (``session``) and its asyncio
connection (``connection``), which reconnects, resumes and deduplicates."""

from __future__ import annotations

from .connection import ChatClient, ChatRejected, ClientClosed, HandshakeRefused, TokenProvider, WireTap
from .session import (
    CloseAction,
    Connected,
    Disconnected,
    GaveUp,
    OfflineQueueFull,
    Reconnecting,
    SessionState,
    close_action,
    handshake_action,
)

__all__ = [
    "ChatClient",
    "ClientClosed",
    "ChatRejected",
    "HandshakeRefused",
    "TokenProvider",
    "WireTap",
    "CloseAction",
    "Connected",
    "Disconnected",
    "GaveUp",
    "OfflineQueueFull",
    "Reconnecting",
    "SessionState",
    "close_action",
    "handshake_action",
]
