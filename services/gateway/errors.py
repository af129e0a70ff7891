"""The gateway's refusals: one JSON shape for every error answer (docs/protocol.md),
whether a handler, Starlette's routing (404, 405) or a WebSocket upgrade refuses."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

__all__ = ["HTTP_STATUS", "error_response", "http_exception", "not_found", "quiet_denials", "unknown_socket", "websocket_only"]

HTTP_STATUS = {
    "invalid": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "busy": 409,
    "too_big": 413,
    "rate_limited": 429,
    "unavailable": 503,
}
_CODE = {status: code for code, status in HTTP_STATUS.items()}


def error_response(
    code: str, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"type": "error", "code": …, "message": …}`` with the code's HTTP status (or ``status``)."""
    return JSONResponse(
        {"type": "error", "code": code, "message": message}, status_code=status or HTTP_STATUS[code], headers=headers
    )


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route, wrong method) in the same JSON shape, ``Allow`` kept."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        message = f"{request.method} is not allowed here; use {headers.get('Allow', 'another method')}"
    elif exc.status_code == 404:
        message = f"nothing at {request.url.path[:200]}"
    else:
        message = str(exc.detail)
    return error_response(_CODE.get(exc.status_code, "invalid"), message, status=exc.status_code, headers=headers)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The router's default: 404 JSON for HTTP, and for a WebSocket upgrade to an
    unknown path a 404 JSON denial (not uvicorn's bare 403)."""
    if scope["type"] == "websocket":
        await unknown_socket(WebSocket(scope, receive, send))
        return
    if scope["type"] == "http":
        raise HTTPException(404)


async def unknown_socket(websocket: WebSocket) -> None:
    """A WebSocket upgrade where none is served (an unknown path, or a static file)."""
    path = websocket.scope.get("path", "")[:200]
    await websocket.send_denial_response(error_response("not_found", f"no WebSocket endpoint at {path}; connect to /ws"))


async def websocket_only(request: Request) -> Response:
    """A plain HTTP request to the WebSocket endpoint: 426, saying how to connect (RFC 9110 section 15.5.22)."""
    return error_response(
        "invalid",
        "this is the WebSocket endpoint: connect with a WebSocket client (Upgrade: websocket); "
        "plain HTTP calls are under /api",
        status=426,
        headers={"Upgrade": "websocket"},
    )


class _DenialIsNotAnError(logging.Filter):
    """uvicorn's websockets-sansio protocol logs "ASGI callable returned without
    completing handshake." at ERROR after every denial response, though the
    denial went out (Kludex/uvicorn#3138, open). The gateway refuses upgrades on
    purpose (expired tokens in a reconnect storm), and uvicorn has already
    logged each at INFO with its status, so the line is dropped. (Secrets in
    uvicorn's lines are masked with every other line's, in shared.logs.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing handshake."


_DENIAL_FILTER = _DenialIsNotAnError()


def quiet_denials() -> None:
    """Install the filter on uvicorn's error logger (once; adding it again is a no-op)."""
    logging.getLogger("uvicorn.error").addFilter(_DENIAL_FILTER)
