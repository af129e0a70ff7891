"""``/healthz``, ``/readyz`` and ``/metrics`` for the services that have no web framework.

A deliberately tiny HTTP/1.0 responder on asyncio streams: it reads the
request line, answers, and closes. Enabled by ``CHAT_HEALTH_PORT`` (0 = off).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from .metrics import CONTENT_TYPE_LATEST

__all__ = ["serve_health"]

MAX_REQUEST_LINE = 1024


async def serve_health(
    host: str,
    port: int,
    readiness: Callable[[], Awaitable[tuple[bool, dict[str, object]]]],
    metrics: Callable[[], bytes | None] | None = None,
) -> asyncio.AbstractServer:
    """Serve /healthz, /readyz (``readiness`` returns whether ready and the body
    saying why not) and /metrics (503 while ``metrics`` returns None: starting).

    /healthz is liveness: 200 as long as the process runs, also while it waits
    for its brokers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line[:MAX_REQUEST_LINE].decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            body: dict[str, object]
            text = metrics() if path == "/metrics" and metrics is not None else None
            if text is not None:
                writer.write(
                    f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                    f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode() + text
                )
                await writer.drain()
                return
            if path == "/healthz":
                status, body = 200, {"status": "ok"}
            elif path == "/readyz":
                ready, body = await readiness()
                status = 200 if ready else 503
            elif path == "/metrics" and metrics is not None:
                status, body = 503, {"type": "error", "code": "unavailable", "message": "starting"}
            else:  # the documented error shape, as the gateway's
                status, body = 404, {"type": "error", "code": "not_found", "message": f"nothing at {path[:100]}"}
            payload = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
