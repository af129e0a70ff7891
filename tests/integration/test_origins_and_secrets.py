"""First contact from a browser's side: which pages may call the gateway (CORS
and the dev-mode origin policy), secrets never in any log line, and every
refusal answered in the documented JSON shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from devstack.servers import Server
from shared.auth import AuthSettings, TokenService
from tests.sse_stream import SseStream
from tests.stack import WAIT_S, Stack, isolated_stack, new_session
from tests.stack import history as stored_history
from tests.wire import WireChecker

API_KEY = "api-key-that-must-never-be-logged"
VITE = "http://localhost:5173"  # a front end on its own port, the usual set-up
FOREIGN = "https://evil.example"


@pytest.fixture(scope="module")
def two_modes(redis_server: Server) -> Iterator[tuple[Stack, int]]:
    """One stack, two gateways with no CHAT_ALLOWED_ORIGINS: tokens required
    (``stack.port``), and dev mode (the returned port)."""
    env = {"CHAT_AUTH_MODE": "required", "CHAT_API_KEYS": API_KEY, "CHAT_LOG_LEVEL": "DEBUG"}
    with isolated_stack(redis_server.url, env) as stack:
        dev = stack.start_gateway({"CHAT_AUTH_MODE": "dev"})
        yield stack, int(dev.env["CHAT_PORT"])


def mint(stack: Stack, user: str) -> str:
    return TokenService(AuthSettings.from_env(stack.env)).issue(user)[0]


async def ws_status(url: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    with pytest.raises(InvalidStatus) as error:
        await connect(url, subprotocols=["chat.v1"], open_timeout=WAIT_S, **kwargs)  # type: ignore[arg-type, list-item]
    response = error.value.response
    return response.status_code, json.loads(response.body or b"null")


async def read_to_the_end(stream: SseStream, wire: WireChecker, session: str) -> None:
    """Read the events stream until every turn the session accepted has delivered its done."""
    record = wire.record(session)
    while not record.accepted <= set(record.done_seq):
        await stream.recv()


async def test_dev_mode_refuses_foreign_pages_and_serves_local_ones(two_modes: tuple[Stack, int]) -> None:
    stack, dev_port = two_modes
    wire = WireChecker()
    base = f"http://127.0.0.1:{dev_port}"
    async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
        session = new_session()
        # A foreign site's simple POST (text/plain, no preflight) must not start a turn.
        refused = await http.post(
            "/api/chat", content=json.dumps({"prompt": "hi", "session": session}), headers={"Origin": FOREIGN}
        )
        assert refused.status_code == 403
        assert refused.json()["code"] == "forbidden" and "CHAT_ALLOWED_ORIGINS" in refused.json()["message"]
        history = (await http.get(f"/api/sessions/{session}/history")).json()
        assert history["turns"] == [] and history["active"] is None
        preflight = await http.options(
            "/api/chat", headers={"Origin": FOREIGN, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers

        # A page on another local port: preflight, then the call, then the controls, all readable.
        preflight = await http.options(
            "/api/chat",
            headers={
                "Origin": VITE,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == VITE
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        started = await http.post("/api/chat", json={"prompt": "hi", "session": session}, headers={"Origin": VITE})
        assert started.status_code == 202 and started.headers["access-control-allow-origin"] == VITE
        wire.accepted(session, started.json()["turn"])
        paused = await http.post(f"/api/sessions/{session}/pause", headers={"Origin": VITE})
        assert paused.status_code == 200 and paused.headers["access-control-allow-origin"] == VITE
        resumed = await http.post(f"/api/sessions/{session}/resume", headers={"Origin": VITE})
        assert resumed.status_code == 200
        history = await http.get(f"/api/sessions/{session}/history", headers={"Origin": VITE})
        assert history.headers["access-control-allow-origin"] == VITE

    assert (await ws_status(f"ws://127.0.0.1:{dev_port}/ws?session={session}", origin=FOREIGN))[0] == 403
    async with connect(f"ws://127.0.0.1:{dev_port}/ws?session={session}", subprotocols=["chat.v1"], origin=VITE) as ws:  # type: ignore[arg-type, list-item]
        socket = wire.ws(session)
        assert socket.feed(await ws.recv())["type"] == "ready"
        while socket.feed(await asyncio.wait_for(ws.recv(), WAIT_S))["type"] != "done":
            pass
    dev_gateway = next(i for i, g in enumerate(stack.gateways) if g.env["CHAT_PORT"] == str(dev_port))
    wire.assert_history(session, await stored_history(stack, session, gateway=dev_gateway))


async def test_with_tokens_required_any_origin_may_call_with_a_token(two_modes: tuple[Stack, int]) -> None:
    """Tokens are never ambient (no cookies), so a page anywhere needs one to act."""
    stack, _ = two_modes
    token = mint(stack, "carol")
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        anonymous = await http.post("/api/chat", json={"prompt": "hi"}, headers={"Origin": FOREIGN})
        assert anonymous.status_code == 401 and anonymous.headers["access-control-allow-origin"] == "*"
        started = await http.post(
            "/api/chat", json={"prompt": "hi"}, headers={"Origin": FOREIGN, "Authorization": f"Bearer {token}"}
        )
        assert started.status_code == 202 and started.headers["access-control-allow-origin"] == "*"
        assert "x-chat-turn" in started.headers.get("access-control-expose-headers", "").lower()
        session = started.json()["session"]
        wire = WireChecker()
        wire.accepted(session, started.json()["turn"])
        bearer = {"Authorization": f"Bearer {token}"}
        async with http.stream("GET", f"/api/sessions/{session}/events", headers=bearer) as response:
            await read_to_the_end(SseStream(response, wire.sse(session, 0)), wire, session)
    wire.assert_history(session, await stored_history(stack, session, token=token))


async def test_every_refusal_is_json(two_modes: tuple[Stack, int]) -> None:
    stack, _ = two_modes
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        missing = await http.get("/no/such/page")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        wrong_method = await http.get("/api/chat")
        assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"
        assert "POST" in wrong_method.headers["allow"]
        plain = await http.get("/ws")  # the WebSocket endpoint over plain HTTP
        assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
        assert plain.json()["code"] == "invalid" and "WebSocket" in plain.json()["message"]
        odd_preflight = await http.options(
            "/api/chat",
            headers={"Origin": VITE, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "x-odd"},
        )
        assert odd_preflight.status_code == 400 and odd_preflight.json()["code"] == "invalid"
    for path in ("/no/such/socket", "/static/chat-page.js"):
        status, body = await ws_status(stack.ws_url(path))
        assert status == 404 and body["code"] == "not_found" and "/ws" in body["message"]  # type: ignore[operator]


async def test_no_secret_in_any_log_line(two_modes: tuple[Stack, int]) -> None:
    """Token-carrying traffic on every path, accepted and refused, on both
    gateways: no token, API key or garbage token appears in any service's log."""
    stack, dev_port = two_modes
    token = mint(stack, "dave")
    garbage = "garbage-token-value-0123456789"
    secrets = [token, garbage, API_KEY]
    session = new_session()
    wire = WireChecker()
    for port in (stack.port, dev_port):
        base = f"http://127.0.0.1:{port}"
        async with connect(f"ws://127.0.0.1:{port}/ws?session={session}&token={token}", subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            wire.ws(session).feed(await ws.recv())
        async with connect(f"ws://127.0.0.1:{port}/", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            pass
        await ws_status(f"ws://127.0.0.1:{port}/ws?session={session}&token={garbage}")
        # A percent-encoded name is the same parameter to the gateway, so to the log as well.
        async with connect(f"ws://127.0.0.1:{port}/ws?session={session}&%74oken={token}", subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            assert wire.ws(session).feed(await ws.recv())["type"] == "ready"
        await ws_status(f"ws://127.0.0.1:{port}/ws?session={session}&t%6Fken={garbage}")
        await ws_status(f"ws://127.0.0.1:{port}/elsewhere?token={token}")
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
            bearer = {"Authorization": f"Bearer {token}"}
            started = await http.post("/api/chat", json={"prompt": "hi", "session": session}, headers=bearer)
            if started.status_code == 202:  # or busy: the turn stopped on the other gateway may not have ended yet
                wire.accepted(session, started.json()["turn"])
            await http.post("/api/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {garbage}"})
            await http.get(f"/api/sessions/{session}/history?token={token}")
            await http.post(f"/api/sessions/{session}/pause?token={token}")
            await http.post(f"/api/sessions/{session}/resume?token={garbage}")
            await http.post(f"/api/sessions/{session}/stop", headers=bearer)
            async with http.stream("GET", f"/api/sessions/{session}/events?token={token}&last_seq=0") as events:
                wire.sse(session, 0).feed_bytes(await anext(events.aiter_raw()))
            await http.post("/api/token", json={"user": "dave"}, headers={"X-API-Key": API_KEY})
            await http.post("/api/token", json={"user": "dave"}, headers={"X-API-Key": garbage})
            await http.post("/api/token/refresh", headers=bearer)
            await http.get(f"/nowhere?token={token}")
    # A last upgrade on each gateway marks the end: a process's lines are read in order.
    marker = new_session()
    for port in (stack.port, dev_port):
        async with connect(f"ws://127.0.0.1:{port}/ws?session={marker}&token={token}", subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            wire.ws(marker).feed(await ws.recv())
    gateways = [p for p in stack.processes if p.name == "gateway"]
    for gateway in gateways:
        await wait_for_line(gateway.output, f"WebSocket /ws?session={marker}&token=***")
    logs = "\n".join(p.output() for p in stack.processes)
    async with httpx.AsyncClient(timeout=WAIT_S) as http:  # nor in a metric's labels
        for port in (stack.port, dev_port):
            logs += (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for secret in secrets:
        leaks = [line[:300] for line in logs.splitlines() if secret in line]
        assert not leaks, f"a secret in the logs: {leaks}"
    refusals = [line for line in logs.splitlines() if '"level": "error"' in line]
    assert not refusals, f"a refused handshake is not an error of the server: {refusals[:3]}"
    # The session was left paused (its resume had a garbage token): resume it, and every turn
    # started above ends with its done on the wire, its text the stored one.
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S, headers={"Authorization": f"Bearer {token}"}) as http:
        assert (await http.post(f"/api/sessions/{session}/resume")).status_code in (200, 409)
        async with http.stream("GET", f"/api/sessions/{session}/events") as response:
            await read_to_the_end(SseStream(response, wire.sse(session, 0)), wire, session)
    wire.assert_history(session, await stored_history(stack, session, token=token))


async def wait_for_line(output: Callable[[], str], text: str) -> None:
    """Until ``text`` is in the process's output (read by a thread as it comes)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while text not in output():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} never logged:\n{output()[-2000:]}")
        await asyncio.sleep(0.05)


async def test_dev_mode_refuses_a_rebound_dns_name(two_modes: tuple[Stack, int]) -> None:
    """A site that points its own name at 127.0.0.1 (DNS rebinding) makes the browser send
    Host: its name, with no Origin on same-origin GETs: dev mode answers only to names
    no site controls; tokens protect the required mode."""
    stack, dev_port = two_modes
    session = new_session()
    rebound = {"Host": f"rebound.example:{dev_port}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dev_port}", timeout=WAIT_S) as http:
        read = await http.get(f"/api/sessions/{session}/history", headers=rebound)
        assert read.status_code == 403 and "localhost" in read.json()["message"]
        started = await http.post(
            "/api/chat", json={"prompt": "hi", "session": session},
            headers={**rebound, "Origin": f"http://rebound.example:{dev_port}"},
        )
        assert started.status_code == 403
        assert (await http.get(f"/api/sessions/{session}/history", headers={"Host": "localhost"})).status_code == 200
    status, _ = await ws_status(
        f"ws://127.0.0.1:{dev_port}/ws?session={session}", additional_headers=rebound, origin=f"http://{rebound['Host']}"
    )
    assert status == 403
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        assert (await http.get("/healthz", headers={"Host": "rebound.example"})).status_code == 200  # required mode
