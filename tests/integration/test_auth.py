"""Tokens, the upgrade handshake, ownership and connection limits against real services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devstack.servers import Server
from shared.auth import AuthSettings, TokenService
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected, GaveUp
from shared.protocol import AuthOk, Done
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Client, Clients, Stack, isolated_stack, new_session, session_paths
from tests.wire import WireChecker, WireTap

API_KEY = "test-api-key-not-a-secret"
ORIGIN = "http://chat.example"
REQUIRED = {
    "CHAT_AUTH_MODE": "required",
    "CHAT_API_KEYS": API_KEY,
    "CHAT_AUTH_GRACE_S": "1",
    "CHAT_ALLOWED_ORIGINS": ORIGIN,
    "CHAT_MAX_TURNS_PER_USER": "2",
    "CHAT_DEMO_TOKENS_PER_S": "100",
    "CHAT_DEMO_ANSWER_TOKENS": "500",  # five-second answers: short tokens expire mid-turn
}
LIMITED = {"CHAT_MAX_CONNECTIONS": "3", "CHAT_MAX_CONNECTIONS_PER_USER": "2", "CHAT_FRAMES_PER_S": "5", "CHAT_FRAME_BURST": "5"}


@pytest.fixture(scope="module")
def auth_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, REQUIRED) as stack:
        yield stack


@pytest.fixture(scope="module")
def limited_port(auth_stack: Stack) -> int:
    """A second gateway of the same stack with small connection and frame limits."""
    return int(auth_stack.start_gateway(LIMITED).env["CHAT_PORT"])


def tokens(stack: Stack, ttl_s: int = 600) -> TokenService:
    """Mint tokens as the gateway would, with the stack's secret."""
    return TokenService(AuthSettings.from_env({**stack.env, "CHAT_TOKEN_TTL_S": str(ttl_s)}))


def token(stack: Stack, user: str, ttl_s: int = 600) -> str:
    return tokens(stack, ttl_s).issue(user)[0]


@pytest.fixture
async def clients(auth_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(auth_stack) as opened:
        yield opened


async def ws_open(clients: Clients, session: str, tok: str, *, port: int | None = None) -> Client:
    client, _ = await clients.open(session, token=tok, port=port)
    return client


async def refused(url: str, *, subprotocols: list[str] | None = None, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as error:
        offered = ["chat.v1"] if subprotocols is None else (subprotocols or None)  # []: offer none
        await connect(url, subprotocols=offered, **kwargs)  # type: ignore[arg-type]
    return error.value.response.status_code


async def test_handshake_rejections(auth_stack: Stack, clients: Clients) -> None:
    """400 parameters, 401 missing/bad/expired/foreign token, 403 origin and another user's session."""
    session = new_session()
    good = token(auth_stack, "alice")
    expired = tokens(auth_stack).issue("alice", now=time.time() - 10_000)[0]
    foreign = TokenService(AuthSettings.from_env({"CHAT_AUTH_SECRET": "some-other-secret-of-32-chars!!!"})).issue("alice")[0]
    assert await refused(auth_stack.ws_url(session="bad.id", token=good)) == 400
    assert await refused(auth_stack.ws_url(session=session)) == 401
    for bad in ("garbage", expired, foreign):
        assert await refused(auth_stack.ws_url(session=session, token=bad)) == 401
    assert await refused(auth_stack.ws_url(session=session), additional_headers={"Authorization": f"Bearer {expired}"}) == 401
    assert await refused(auth_stack.ws_url(session=session, token=good), origin="http://evil.example") == 403
    await ws_open(clients, session, good)  # alice owns it now
    assert await refused(auth_stack.ws_url(session=session, token=token(auth_stack, "bob"))) == 403
    async with connect(
        auth_stack.ws_url(session=session), subprotocols=["chat.v1"], origin=ORIGIN,  # type: ignore[arg-type, list-item]
        additional_headers={"Authorization": f"Bearer {good}"},
    ) as ws:
        ready = clients.wire.ws(session).feed(await ws.recv())
    assert ready["exp"] == tokens(auth_stack).verify(good).exp


async def test_only_page_and_health_answer_without_a_token(auth_stack: Stack) -> None:
    """With auth required, the API refuses anonymous calls; the page, static files and health answer."""
    async with httpx.AsyncClient(base_url=auth_stack.http_url) as http:
        for path in ("/", "/healthz", "/readyz", "/static/chat-client.js"):
            assert (await http.get(path)).status_code == 200, path
        session = new_session()
        for method, path in session_paths(session):
            response = await http.request(method, path)
            assert response.status_code == 401 and response.json()["code"] == "unauthorized", path
        assert (await http.post("/api/chat", json={"prompt": "hi"})).status_code == 401


async def test_token_endpoints(auth_stack: Stack) -> None:
    """Tokens are issued against the API key, refreshed with a valid token, refused otherwise."""
    async with httpx.AsyncClient(base_url=auth_stack.http_url) as http:
        assert (await http.post("/api/token", json={"user": "dave"})).status_code == 401
        assert (await http.post("/api/token", json={"user": "dave"}, headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await http.post("/api/token", json={}, headers={"X-API-Key": API_KEY})).status_code == 400
        issued = await http.post("/api/token", json={"user": "dave"}, headers={"X-API-Key": API_KEY})
        assert issued.status_code == 200
        body = issued.json()
        assert body["user"] == "dave" and body["exp"] > time.time()
        assert tokens(auth_stack).verify(body["token"]).user == "dave"
        refreshed = await http.post("/api/token/refresh", headers={"Authorization": f"Bearer {body['token']}"})
        assert refreshed.status_code == 200 and refreshed.json()["user"] == "dave"
        expired = tokens(auth_stack).issue("dave", now=time.time() - 10_000)[0]
        assert (await http.post("/api/token/refresh", headers={"Authorization": f"Bearer {expired}"})).status_code == 401
        assert (await http.post("/api/token/refresh")).status_code == 401


async def test_expired_token_closes_4001(auth_stack: Stack, clients: Clients) -> None:
    """A token that expires and is not renewed closes the connection with 4001 after the grace."""
    client = await ws_open(clients, new_session(), token(auth_stack, "erin", ttl_s=1))
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(WAIT_S):
            while True:
                await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_auth_frame_renews_past_the_first_expiry(auth_stack: Stack, clients: Clients) -> None:
    """auth with a fresh token answers auth_ok and keeps the connection open past the old expiry."""
    old = token(auth_stack, "fay", ttl_s=2)
    client = await ws_open(clients, new_session(), old)
    fresh, exp = tokens(auth_stack, ttl_s=60).issue("fay")
    await client.send({"type": "auth", "token": fresh})
    assert await client.until("auth_ok") == {"type": "auth_ok", "exp": exp}
    old_exp = tokens(auth_stack).verify(old).exp
    assert old_exp is not None
    old_deadline = old_exp + 1  # exp + grace
    # The behaviour under test is a deadline: sleep past it (by a scaled margin), then prove the connection lives.
    await asyncio.sleep(max(0.0, old_deadline - time.time()) + 0.5 * TIMEOUT_FACTOR)
    await client.send({"type": "ping", "t": "alive"})
    assert await client.until("pong") == {"type": "pong", "t": "alive"}


async def test_auth_frame_with_bad_or_foreign_token_closes(auth_stack: Stack, clients: Clients) -> None:
    """auth with an invalid token closes 4001; with another user's token, 4003."""
    for bad, code in (("garbage", 4001), (token(auth_stack, "someone-else"), 4003)):
        client = await ws_open(clients, new_session(), token(auth_stack, "gus"))
        await client.send({"type": "auth", "token": bad})
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT_S):
                while True:
                    await client.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_user_b_cannot_reach_user_a_session(auth_stack: Stack, clients: Clients) -> None:
    """Every path refuses another user's session with 403/4003-level errors; crafted ids are 400."""
    session = new_session()
    alice = await ws_open(clients, session, token(auth_stack, "alice2"))
    await alice.turn("private")
    bob = token(auth_stack, "bob2")
    headers = {"Authorization": f"Bearer {bob}"}
    assert await refused(auth_stack.ws_url(session=session, token=bob)) == 403
    assert await refused(auth_stack.ws_url(session=session, token=bob, last_seq="1")) == 403
    # The original design's client: sessionId=, no subprotocol.
    assert await refused(f"ws://127.0.0.1:{auth_stack.port}/?sessionId={session}&token={bob}", subprotocols=[]) == 403
    async with httpx.AsyncClient(base_url=auth_stack.http_url, headers=headers) as http:
        for method, path in session_paths(session):
            response = await http.request(method, path)
            assert response.status_code == 403 and response.json()["code"] == "forbidden", path
        assert (await http.post("/api/chat", json={"session": session, "prompt": "mine now"})).status_code == 403
        for crafted in (f"{session}.>", f"{session}*", "*", ">", f"{session} x"):
            assert (await http.get(f"/api/sessions/{quote(crafted, safe='')}/history")).status_code == 400
    async with httpx.AsyncClient(base_url=auth_stack.http_url, headers={"Authorization": f"Bearer {token(auth_stack, 'alice2')}"}) as http:
        turns = (await http.get(f"/api/sessions/{session}/history")).json()["turns"]
    assert [t["prompt"] for t in turns] == ["private"]


async def test_rate_limit_then_1008(auth_stack: Stack, limited_port: int, clients: Clients) -> None:
    """Frames beyond the token bucket get error rate_limited, then the connection closes with 1008."""
    client = await ws_open(clients, new_session(), token(auth_stack, "hank"), port=limited_port)
    for _ in range(30):
        await client.send({"type": "resume"})  # each one a store call: a client hammering controls
    codes = []
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(WAIT_S):
            while True:
                frame = await client.recv()
                codes.append(frame.get("code"))
    assert "rate_limited" in codes
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_pings_and_acks_are_never_rate_limited(auth_stack: Stack, limited_port: int, clients: Clients) -> None:
    """Hundreds of pings and acks at once, far past the bucket of the gateway that closed the client above
    (5/s, burst 5), get every pong, no error and no close (guarantee 6)."""
    client = await ws_open(clients, new_session(), token(auth_stack, "hank2"), port=limited_port)
    for n in range(300):
        await client.send({"type": "ping", "t": n})
        await client.send({"type": "ack", "seq": 0})
    pongs = [await client.recv() for _ in range(300)]
    assert pongs == [{"type": "pong", "t": n} for n in range(300)]
    await client.send({"type": "stop"})  # the bucket is still full for a real control
    assert (await client.until("error"))["code"] == "invalid"


async def test_connection_limits(auth_stack: Stack, limited_port: int, clients: Clients) -> None:
    """Per user 429, per process 503, both before the upgrade; slots free up on close."""
    open_ = [await ws_open(clients, new_session(), token(auth_stack, "ivy"), port=limited_port) for _ in range(2)]
    url = auth_stack.ws_url(session=new_session(), token=token(auth_stack, "ivy")).replace(f":{auth_stack.port}/", f":{limited_port}/")
    assert await refused(url) == 429
    open_.append(await ws_open(clients, new_session(), token(auth_stack, "jay"), port=limited_port))
    url = auth_stack.ws_url(session=new_session(), token=token(auth_stack, "kim")).replace(f":{auth_stack.port}/", f":{limited_port}/")
    assert await refused(url) == 503
    for client in open_:
        await client.ws.close()
        await client.ws.wait_closed()  # the server has answered the close, so it has released the slot
    await ws_open(clients, new_session(), token(auth_stack, "kim"), port=limited_port)


async def test_turns_per_user(auth_stack: Stack, clients: Clients) -> None:
    """A user with CHAT_MAX_TURNS_PER_USER answers generating gets rate_limited for another."""
    user = token(auth_stack, "lou")
    opened = [await ws_open(clients, new_session(), user) for _ in range(3)]
    for client in opened[:2]:
        await client.send({"type": "chat", "prompt": "long", "id": "x"})
        await client.until("accepted")
    await opened[2].send({"type": "chat", "prompt": "one too many", "id": "y"})
    error = await opened[2].until("error")
    assert error["code"] == "rate_limited" and error["id"] == "y"
    await opened[0].until("done")
    await opened[2].send({"type": "chat", "prompt": "now there is room", "id": "z"})
    assert (await opened[2].until("accepted"))["turn"] == 1


@pytest.fixture
async def client_tokens(auth_stack: Stack) -> AsyncIterator[TokenService]:
    yield tokens(auth_stack, ttl_s=2)


class ClosingTap(WireTap):
    """A wire tap that also signals each connection's end."""

    def __init__(self, checker: WireChecker) -> None:
        super().__init__(checker)
        self.ended = asyncio.Event()

    def closed(self) -> None:
        super().closed()
        self.ended.set()


async def _run_turn(client: ChatClient) -> list[object]:
    """Chat once and return the client's events up to the turn's done; the seqs on the wire are the
    checker's business (the client drops duplicates and reconnects on gaps, hiding both)."""
    seen: list[object] = []
    await client.chat("a five second answer")
    async with asyncio.timeout(3 * WAIT_S):
        async for event in client.events():
            seen.append(event)
            assert not isinstance(event, GaveUp), event
            if isinstance(event, Done):
                return seen
    raise AssertionError("no done")


async def _history(stack: Stack, session: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        response = await http.get(f"/api/sessions/{session}/history")
        response.raise_for_status()
        record: dict[str, Any] = response.json()
        return record


async def test_python_client_renews_ahead_of_expiry(auth_stack: Stack, client_tokens: TokenService) -> None:
    """With 2-second tokens, the client renews on the live connection and never reconnects."""

    async def provider() -> str:
        return client_tokens.issue("mia")[0]

    session = new_session()
    wire = WireChecker()
    async with ChatClient(auth_stack.ws_url(), session=session, token_provider=provider, wire_tap=wire.tap()) as client:
        seen = await _run_turn(client)
    assert sum(isinstance(e, AuthOk) for e in seen) >= 1
    assert not any(isinstance(e, Disconnected) for e in seen)
    assert len(wire.connections) == 1
    wire.assert_history(session, await _history(auth_stack, session, await provider()))


async def test_python_client_survives_4001(auth_stack: Stack, client_tokens: TokenService) -> None:
    """A renewal that fails lets the token expire: 4001, a new token, a reconnect, and no chunk lost."""
    wire = WireChecker()
    tap = ClosingTap(wire)
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("identity provider hiccup")  # the renewal; the client retries it shortly
        if calls == 3:
            # The retry comes too late: it returns only once the server has closed (4001).
            await asyncio.wait_for(tap.ended.wait(), WAIT_S)
        return client_tokens.issue("ned")[0]

    session = new_session()
    client = ChatClient(
        auth_stack.ws_url(), session=session, token_provider=provider, backoff=Backoff(initial_s=0.05, cap_s=0.1), wire_tap=tap
    )
    async with client:
        seen = await _run_turn(client)
    assert any(isinstance(e, Disconnected) and e.code == 4001 for e in seen)
    assert isinstance(seen[-1], Done) and len(wire.connections) >= 2
    wire.assert_history(session, await _history(auth_stack, session, await provider()))
