"""HTTP endpoints: chat (JSON, SSE, and the original design's plain text),
session events over SSE, controls, history, health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from shared.auth import Principal
from shared.errors import BrokerUnavailable, ProtocolError, SessionStateError
from shared.protocol import Chunk, Done, Paused, decode_server_frame, encode
from shared.runner import Startup
from shared.session import Send
from shared.sse import encode_event
from shared.store import SessionMeta
from shared.subjects import new_session_id, validate_session_id

from .controls import Gateway
from .errors import error_response
from .outbox import Outbox
from .websocket import parse_cursor, token_from

__all__ = ["routes_handlers"]

STATIC_DIR = Path(__file__).parent / "static"
PAGE = STATIC_DIR / "index.html"


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read a JSON object body of at most ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"body of {declared} bytes exceeds the limit of {limit}", code="too_big")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ProtocolError(f"body exceeds the limit of {limit} bytes", code="too_big")
    try:
        value = json.loads(body)
    except ValueError:
        raise ProtocolError("malformed JSON") from None
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("expected a JSON object")
    return value


def _session_param(request: Request) -> str:
    return validate_session_id(request.path_params["session"])


def _principal(request: Request) -> Principal:
    gateway: Gateway = request.app.state.gateway
    return gateway.tokens.principal(token_from(request.headers, request.query_params))


async def _session_access(request: Request) -> tuple[Gateway, str, Principal]:
    """The gateway, the path's session and the caller, once the caller may use the session."""
    gateway: Gateway = request.app.state.gateway
    session = _session_param(request)
    principal = _principal(request)
    await gateway.authorize(session, principal)
    return gateway, session, principal


Handler = Callable[[Request], Awaitable[Response]]


def _handle_errors(handler: Handler) -> Handler:
    """Translate the project's exceptions into JSON error responses, in one place."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except SessionStateError as exc:  # right input, wrong state
            return error_response(exc.code, exc.message, status=409)
        except ProtocolError as exc:
            return error_response(exc.code, exc.message)
        except BrokerUnavailable:
            return error_response("unavailable", "the service is unavailable; try again shortly")

    wrapped.__name__ = handler.__name__
    return wrapped


def _stream(
    gateway: Gateway,
    session: str,
    last_seq: int,
    meta: SessionMeta,
    principal: Principal,
    *,
    turn: int | None,
    plain: bool,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    """Frames of a session as SSE (or, ``plain``, chunk text only), from the
    delivery's cursor; ends after the ``done`` of ``turn`` when one is given."""
    settings = gateway.settings
    # A reader too slow for the outbox has its response ended; it resumes
    # with Last-Event-ID.
    gateway.connections.check(principal.user)  # refused with 429/503 before the response starts
    outbox: Outbox[Send] = Outbox(settings.limits.send_queue_frames)
    feed = gateway.open_feed(session, last_seq, meta, outbox.put, outbox)

    async def body() -> AsyncIterator[bytes]:
        gateway.connections.take(principal.user)
        kind = "text" if plain else "sse"
        gateway.metrics.connections_total.labels(kind).inc()
        gateway.metrics.connections.labels(kind).inc()
        try:
            await feed.open()
            if not plain:
                yield b"retry: 1000\n\n"
                if meta.paused:  # SSE has no ready: say the stream starts paused, as ready.paused does
                    yield encode_event(encode(Paused(seq=last_seq)), event="paused")
            while True:
                try:
                    send = await asyncio.wait_for(outbox.get(), settings.timeouts.sse_keepalive_s)
                except TimeoutError:
                    if not plain:
                        yield b": keep-alive\n\n"
                    continue
                if send is None:
                    return
                frame = decode_server_frame(send.data)
                if plain:
                    if isinstance(frame, Chunk):
                        yield frame.text.encode()
                else:
                    yield encode_event(send.data, event=frame.__struct_config__.tag, id=send.seq)  # type: ignore[arg-type]
                if turn is not None and isinstance(frame, Done) and frame.turn == turn:
                    return
        finally:
            feed.close()
            gateway.metrics.connections.labels(kind).dec()
            gateway.connections.release(principal.user)

    media = "text/plain; charset=utf-8" if plain else "text/event-stream"
    all_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
    return StreamingResponse(body(), media_type=media, headers=all_headers)


@_handle_errors
async def chat(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    principal = _principal(request)
    body = await read_json(request, gateway.settings.limits.max_frame_bytes)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ProtocolError("'prompt' must be a string")
    compat = "sessionId" in body and "session" not in body
    raw_session = body.get("sessionId") if compat else body.get("session")
    session = new_session_id() if raw_session is None else validate_session_id(raw_session)
    await gateway.authorize(session, principal)
    wants_sse = "text/event-stream" in request.headers.get("accept", "")
    if not compat and not wants_sse:
        result = await gateway.start_turn(session, prompt, user=principal.user)
        return JSONResponse({"session": session, "turn": result.turn}, status_code=202)
    meta = await gateway.store.meta(session)
    result = await gateway.start_turn(session, prompt, user=principal.user)
    # The turn's frames are numbered after base_seq; pause applies here too.
    headers = {"X-Chat-Session": session, "X-Chat-Turn": str(result.turn)}
    return _stream(
        gateway, session, result.base_seq, meta, principal, turn=result.turn, plain=compat, headers=headers
    )


@_handle_errors
async def events(request: Request) -> Response:
    gateway, session, principal = await _session_access(request)
    cursor = request.headers.get("last-event-id") or request.query_params.get("last_seq")
    last_seq = parse_cursor(cursor)
    meta = await gateway.store.meta(session)
    if last_seq > meta.hwm:
        raise ProtocolError(f"last_seq {last_seq} is beyond the session's last seq {meta.hwm}")
    return _stream(gateway, session, last_seq, meta, principal, turn=None, plain=False)


@_handle_errors
async def pause_or_resume(request: Request) -> Response:
    """POST .../pause and .../resume: set the session's pause flag."""
    gateway, session, _ = await _session_access(request)
    paused = request.url.path.endswith("/pause")
    if paused:
        await gateway.pause(session)
    elif not (await gateway.resume(session))[0]:
        raise SessionStateError("the session is not paused")
    return JSONResponse({"session": session, "paused": paused})


@_handle_errors
async def stop(request: Request) -> Response:
    gateway, session, _ = await _session_access(request)
    turn = await gateway.stop(session)
    return JSONResponse({"session": session, "turn": turn, "stopping": True}, status_code=202)


@_handle_errors
async def history(request: Request) -> Response:
    """The finished turns, the one generating, and where to resume.

    ``resume_from`` (and ``last_seq``, the same) is the seq of the last
    finished turn's ``done``: a connection opened with ``last_seq`` set to it
    gets everything after ``turns``, the generating turn from its first chunk.
    Read in one transaction with the turns, so the two always agree.
    """
    gateway, session, _ = await _session_access(request)
    turns, meta = await gateway.store.transcript(session)
    active = None
    if meta.active_turn is not None:
        active = {"turn": meta.active_turn, "prompt": meta.active_prompt}
    return JSONResponse(
        {
            "session": session,
            "last_seq": meta.base_seq,
            "resume_from": meta.base_seq,
            "paused": meta.paused,
            "turns": [
                {"turn": t.turn, "prompt": t.prompt, "answer": t.answer, "reason": t.reason, "last_seq": t.last_seq}
                for t in turns
            ],
            "active": active,
        }
    )


@_handle_errors
async def issue_token(request: Request) -> Response:
    """POST /api/token: in dev mode, to anyone; otherwise against an API key (``X-API-Key``)."""
    gateway: Gateway = request.app.state.gateway
    if not gateway.tokens.can_issue:
        raise ProtocolError("this deployment's tokens come from its identity provider", code="forbidden")
    body = await read_json(request, 4096) if int(request.headers.get("content-length") or 0) else {}
    user = body.get("user")
    if gateway.settings.auth.required:
        if not gateway.tokens.api_key_valid(request.headers.get("x-api-key")):
            raise ProtocolError("a valid X-API-Key header is required to issue tokens", code="unauthorized")
        if not isinstance(user, str):
            raise ProtocolError("'user' is required")
    elif user is None:
        user = "anon-" + new_session_id()[:16]  # a new anonymous user
    if not isinstance(user, str):
        raise ProtocolError("'user' must be a string")
    token, exp = gateway.tokens.issue(user)
    return JSONResponse({"token": token, "exp": exp, "user": user, "token_type": "Bearer"})


@_handle_errors
async def refresh_token(request: Request) -> Response:
    """POST /api/token/refresh: a valid (unexpired) token buys a new one for the same user."""
    gateway: Gateway = request.app.state.gateway
    token = token_from(request.headers, request.query_params)
    if token is None:
        raise ProtocolError("send the token to refresh as Authorization: Bearer …", code="unauthorized")
    principal = gateway.tokens.verify(token)
    assert principal.user is not None
    new_token, exp = gateway.tokens.issue(principal.user)
    return JSONResponse({"token": new_token, "exp": exp, "user": principal.user, "token_type": "Bearer"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """503 until NATS and Redis answer, saying what is awaited (``waiting``); then their checks."""
    startup: Startup = request.app.state.startup
    ready, body = await startup.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8")


routes_handlers = {
    "chat": chat,
    "events": events,
    "pause": pause_or_resume,
    "resume": pause_or_resume,
    "stop": stop,
    "history": history,
    "healthz": healthz,
    "readyz": readyz,
    "metrics": metrics,
    "issue_token": issue_token,
    "refresh_token": refresh_token,
    "page": page,
}
