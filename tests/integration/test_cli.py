"""The chatrelay CLI as a real process against real services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from devstack.servers import Server, free_port
from shared.auth import AuthSettings, TokenService
from shared.protocol import SUBPROTOCOL, Accepted, Chunk, Done, Error, Ready, encode
from tests.faultproxy import FaultProxy
from tests.stack import WAIT_S, Stack, history, isolated_stack, new_session

API_KEY = "test-api-key-not-a-secret"


@asynccontextmanager
async def cli(*args: str, env: Mapping[str, str] | None = None, stdin: bool = False) -> AsyncIterator[asyncio.subprocess.Process]:
    """``chatrelay`` as a process; killed on the way out if it is still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.client.cli", *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_cli(*args: str, stop_after_output: bool = False, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``chatrelay`` with args; optionally send SIGINT once output begins."""
    async with cli(*args, env=env) as process:
        assert process.stdout is not None and process.stderr is not None
        out = b""
        async with asyncio.timeout(3 * WAIT_S):
            if stop_after_output:
                out = await process.stdout.read(1)
                process.send_signal(signal.SIGINT)
            rest, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
            code = await process.wait()
    return code, (out + rest).decode(), err.decode()


async def read_until(stream: asyncio.StreamReader, seen: bytearray, done: bytes, count: int = 1) -> None:
    """Read ``stream`` into ``seen`` until ``done`` occurs ``count`` times."""
    async with asyncio.timeout(3 * WAIT_S):
        while seen.count(done) < count:
            chunk = await stream.read(4096)
            assert chunk, f"ended before {done!r} x{count}: {bytes(seen)!r}"
            seen += chunk


async def test_chat_streams_the_answer_and_continues_a_session(stack: Stack) -> None:
    """stdout is exactly the answer; --session continues with only the new answer."""
    session = new_session()
    url = stack.ws_url()
    code, out, err = await run_cli("chat", "--url", url, "--session", session, "hello", "there")
    assert code == 0, err
    first = (await history(stack, session))["turns"][0]
    assert first["prompt"] == "hello there"
    assert out == first["answer"] + "\n"
    assert f"session {session}" in err
    code, out, _ = await run_cli("chat", "--url", url, "--session", session, "more")
    assert code == 0
    assert out == (await history(stack, session))["turns"][1]["answer"] + "\n"


async def test_ctrl_c_stops_the_turn(paced_stack: Stack) -> None:
    """The first Ctrl-C stops the answer upstream; the CLI exits cleanly."""
    session = new_session()
    code, out, err = await run_cli("chat", "--url", paced_stack.ws_url(), "--session", session, "long one", stop_after_output=True)
    assert code == 0, err
    assert "stopped" in err
    turn = (await history(paced_stack, session))["turns"][0]
    assert turn["reason"] == "stopped"
    assert out == turn["answer"] + "\n"


async def test_reconnects_show_on_stderr_only(paced_stack: Stack) -> None:
    """Connections cut mid-answer: stderr tells, stdout is still exactly the answer."""
    session = new_session()
    async with FaultProxy("127.0.0.1", paced_stack.port) as proxy:
        cli = asyncio.create_task(
            run_cli("chat", "--url", proxy.url(), "--session", session, "--backoff-initial", "0.05", "--backoff-cap", "0.1", "cut me")
        )

        async def cutter() -> None:
            for _ in range(3):
                await proxy.next_connection()
                await asyncio.sleep(0.2)  # a moment into the answer
                proxy.cut_all()

        cutting = asyncio.create_task(cutter())
        code, out, err = await cli
        cutting.cancel()
    assert code == 0, err
    assert "reconnecting in" in err and "reconnected" in err
    assert out == (await history(paced_stack, session))["turns"][0]["answer"] + "\n"


async def test_unreachable_gateway_gives_up(stack: Stack) -> None:
    """With --max-attempts and nothing listening, the CLI says so and exits 2."""
    async with FaultProxy("127.0.0.1", stack.port) as proxy:
        proxy.refuse = True
        code, out, err = await run_cli(
            "chat", "--url", proxy.url(), "--max-attempts", "2", "--backoff-initial", "0.01", "--backoff-cap", "0.02", "hi"
        )
    assert code == 2
    assert out == ""
    assert "gave up after 2 attempts" in err


async def test_interactive_mode_reads_prompts_from_stdin(stack: Stack) -> None:
    """Without a prompt, each stdin line is a turn; EOF ends the session."""
    session = new_session()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.client.cli", "chat", "--url", stack.ws_url(), "--session", session,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(3 * WAIT_S):
        out, err = await process.communicate(b"first line\n\nsecond line\n")
    assert process.returncode == 0, err.decode()
    turns = (await history(stack, session))["turns"]
    assert [t["prompt"] for t in turns] == ["first line", "second line"]
    assert out.decode() == "".join(t["answer"] + "\n" for t in turns)


async def test_unreachable_gateway_says_why_and_gives_up_after_connect_timeout() -> None:
    """Nothing listening and no --max-attempts: each retry is reported, and the
    first connection is given up after --connect-timeout with exit 2."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    code, out, err = await run_cli(
        "chat", "--url", url, "--connect-timeout", "1", "--backoff-initial", "0.05", "--backoff-cap", "0.2", "hi"
    )
    assert code == 2
    assert out == ""
    assert f"[cannot reach {url}: connection refused; retrying in " in err
    assert f"[gave up: could not connect within 1 s: cannot reach {url}: connection refused]" in err
    assert "Traceback" not in err


async def test_connect_timeout_from_the_environment() -> None:
    """CHAT_CONNECT_TIMEOUT sets the same deadline."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    code, _, err = await run_cli("chat", "--url", url, "--backoff-initial", "0.05", "hi", env={"CHAT_CONNECT_TIMEOUT": "0.5"})
    assert code == 2
    assert "could not connect within 0.5 s" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--session", "bad id!"], "argument --session: invalid session id 'bad id!'"),
        (["--last-seq", "-1"], "argument --last-seq: '-1' must be 0 or more"),
        (["--url", "http://127.0.0.1:8000/ws"], "argument --url: 'http://127.0.0.1:8000/ws' is not a ws:// or wss:// URL"),
        (["--url", "ws://h:99999/ws"], "argument --url: 'ws://h:99999/ws' is not a valid URL: Port out of range"),
        (["--url", "ws://h:abc/ws"], "argument --url: 'ws://h:abc/ws' is not a valid URL: Port could not be cast"),
        (["--url", "ws://u:pw@h:abc/ws"], "argument --url: 'ws://u:***@h:abc/ws' is not a valid URL"),
        (["--connect-timeout", "soon"], "argument --connect-timeout: 'soon' is not a number"),
        (["--backoff-initial", "0"], "argument --backoff-initial: '0' must be positive"),
        (["--backoff-initial", "5", "--backoff-cap", "1"], "--backoff-initial (5) must not exceed --backoff-cap (1)"),
    ],
)
async def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    """A bad option is one line on stderr naming it, exit 2, no traceback."""
    code, out, err = await run_cli("chat", *args, "hi")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("chatrelay chat: error: ") and message in err


async def test_ctrl_c_at_the_idle_prompt_quits(stack: Stack) -> None:
    """Interactive, a turn done and the prompt waiting on an open stdin: one Ctrl-C exits 130, cleanly."""
    session = new_session()
    async with cli("chat", "--url", stack.ws_url(), "--session", session, stdin=True) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        err = bytearray()
        process.stdin.write(b"first line\n")
        await read_until(process.stderr, err, b"> ", count=2)  # the prompt again: the turn is done
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(3 * WAIT_S):
            out, rest = await asyncio.gather(process.stdout.read(), process.stderr.read())
            code = await process.wait()
    err += rest
    assert code == 130, bytes(err)
    assert b"Traceback" not in err and b"stopping the answer" not in err
    assert out.decode() == (await history(stack, session))["turns"][0]["answer"] + "\n"


async def test_ctrl_c_while_connecting_quits() -> None:
    """Before the first connection there is no answer to stop: Ctrl-C quits at once."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    async with cli("chat", "--url", url, "--backoff-initial", "0.05", "--backoff-cap", "0.1", "hi") as process:
        assert process.stderr is not None
        err = bytearray()
        await read_until(process.stderr, err, b"retrying in")
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(3 * WAIT_S):
            err += await process.stderr.read()
            code = await process.wait()
    assert code == 130, bytes(err)
    assert b"Traceback" not in err


# Tokens and refused handshakes ---------------------------------------------


@pytest.fixture(scope="module")
def token_stack(redis_server: Server) -> Iterator[Stack]:
    """A deployment with tokens required."""
    with isolated_stack(redis_server.url, {"CHAT_AUTH_MODE": "required", "CHAT_API_KEYS": API_KEY}) as running:
        yield running


def token(stack: Stack, user: str) -> str:
    return TokenService(AuthSettings.from_env({**stack.env, "CHAT_TOKEN_TTL_S": "600"})).issue(user)[0]


async def test_token_required_without_one_says_so_and_stops(token_stack: Stack) -> None:
    """A 401 shows the server's code and message once and exits 2: no retrying forever."""
    code, out, err = await run_cli("chat", "--url", token_stack.ws_url(), "--backoff-initial", "0.05", "hi")
    assert code == 2
    assert out == ""
    assert "[gave up: the gateway refused the connection: HTTP 401 unauthorized: " in err
    assert "--token or CHAT_TOKEN" in err
    assert "retrying" not in err


@pytest.mark.parametrize("where", ["option", "environment"])
async def test_token_from_option_or_environment(token_stack: Stack, where: str) -> None:
    """--token or CHAT_TOKEN reaches a deployment with tokens required; the token is never printed."""
    session = new_session()
    secret = token(token_stack, "alice")
    args = ["chat", "--url", token_stack.ws_url(), "--session", session]
    env = {"CHAT_TOKEN": secret} if where == "environment" else {}
    if where == "option":
        args += ["--token", secret]
    code, out, err = await run_cli(*args, "hello", env=env)
    assert code == 0, err
    assert out == (await history(token_stack, session, token=secret))["turns"][0]["answer"] + "\n"
    assert secret not in out and secret not in err


async def test_forbidden_session_shows_the_reason_and_stops(token_stack: Stack) -> None:
    """Another user's session: 403 with the server's message, no retries, exit 2."""
    session = new_session()
    code, _, err = await run_cli("chat", "--url", token_stack.ws_url(), "--session", session, "--token", token(token_stack, "alice"), "mine")
    assert code == 0, err
    code, out, err = await run_cli("chat", "--url", token_stack.ws_url(), "--session", session, "--token", token(token_stack, "bob"), "yours?")
    assert code == 2
    assert out == ""
    assert "[gave up: the gateway refused the connection: HTTP 403 forbidden: " in err
    assert "retrying" not in err


async def test_reconnects_at_the_idle_prompt_are_reported_and_giving_up_ends_it(stack: Stack) -> None:
    """Connected, then the gateway goes away while the prompt waits: the drop and
    each failed attempt are reported at once, and giving up exits 2 without input."""
    async with FaultProxy("127.0.0.1", stack.port) as proxy:
        args = ["chat", "--url", proxy.url(), "--max-attempts", "2", "--backoff-initial", "0.05", "--backoff-cap", "0.1"]
        async with cli(*args, stdin=True) as process:
            assert process.stderr is not None and process.stdout is not None
            err = bytearray()
            await read_until(process.stderr, err, b"> ")
            proxy.refuse = True
            proxy.cut_all()
            async with asyncio.timeout(3 * WAIT_S):
                out, rest = await asyncio.gather(process.stdout.read(), process.stderr.read())
                code = await process.wait()
    err += rest
    text = err.decode()
    assert code == 2, text
    assert out == b""
    assert "[disconnected (network)]" in text
    assert "refused; retrying in" in text or "reconnecting in" in text
    assert "[gave up after 2 attempts: " in text
    assert "Traceback" not in text


# Hostile or broken servers: what the CLI prints of theirs, and how it ends ---


def http_response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


Answer = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def crafted_server(answer: Answer) -> AsyncIterator[tuple[int, list[str]]]:
    """A server answering each HTTP request (an upgrade too) as ``answer`` writes:
    yields its port and the request lines it got."""
    requests: list[str] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode()
            requests.append(line)
            await answer(line, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            handlers.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], requests
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()


def refuse_with(body: bytes, status: str = "401 Unauthorized") -> Answer:
    async def answer(line: str, writer: asyncio.StreamWriter) -> None:
        writer.write(http_response(status, body))

    return answer


async def test_a_refusal_nested_too_deeply_is_reported_without_a_traceback() -> None:
    """A 401 whose JSON body is [[[[…]]]] 100k deep: the status, exit 2, no RecursionError."""
    async with crafted_server(refuse_with(b"[" * 100_000 + b"]" * 100_000)) as (port, _):
        code, out, err = await run_cli("chat", "--url", f"ws://127.0.0.1:{port}/ws", "hi")
    assert code == 2, err
    assert out == ""
    assert "[gave up: the gateway refused the connection: HTTP 401 (pass a valid token" in err
    assert "Traceback" not in err and "[[[" not in err


@pytest.mark.parametrize("shape", ["json", "plain"])
async def test_a_refusals_message_is_cut_and_cleaned(shape: str) -> None:
    """A 900 KB reason full of escapes (clear screen, window title, C1 CSI): one short, clean line."""
    hostile = "\x1b[2J\x1b]0;pwned\x07\x9b31mlogin again\x07\x00\r" + "x" * 900_000
    if shape == "json":
        body = json.dumps({"type": "error", "code": "unauthorized\x1b[5m", "message": hostile}).encode()
    else:
        body = hostile.encode()
    async with crafted_server(refuse_with(body)) as (port, _):
        code, _, err = await run_cli("chat", "--url", f"ws://127.0.0.1:{port}/ws", "hi")
    assert code == 2, err[:500]
    assert len(err) < 500, err[:500]
    assert "refused the connection: HTTP 401" in err and "login again x" in err and "…" in err
    assert not any(ch < " " and ch != "\n" or "\x7f" <= ch <= "\x9f" for ch in err), repr(err)
    assert "pwned" not in err


@asynccontextmanager
async def fake_gateway(answer: Callable[[ServerConnection, str], Awaitable[None]]) -> AsyncIterator[str]:
    """A protocol-v1 gateway that sends ready, then answers each chat (by its id) as ``answer`` does."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode(Ready(session="s1", last_seq=0, paused=False)).decode())
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "chat":
                    await answer(ws, frame["id"])

    async with serve(handler, "127.0.0.1", 0, subprotocols=[Subprotocol(SUBPROTOCOL)]) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def test_escapes_from_the_server_never_reach_the_terminal() -> None:
    """Escape sequences and control characters in an error frame, the answer and a
    done message are dropped (the answer keeps its newlines and tabs); messages are cut."""

    async def answer(ws: ServerConnection, chat_id: str) -> None:
        for frame in (
            Error(code="busy", message="\x1b]0;title\x07slow \x1b[2Jdown" + "!" * 5000),
            Accepted(turn=1, id=chat_id),
            Chunk(seq=1, turn=1, text="line one\x1b[2J\x1b[H\n\tline\x07 two\r\x9b1m"),
            Chunk(seq=2, turn=1, text="\x1b]0;pwned\x1b\\ end"),
            Done(seq=3, turn=1, reason="error", message="\x1b[31mbroke\x00n" + "?" * 5000),
        ):
            await ws.send(encode(frame).decode())

    async with fake_gateway(answer) as url:
        code, out, err = await run_cli("chat", "--url", url, "hi")
    assert code == 1, err
    assert out == "line one\n\tline two end\n"
    assert "[error busy: slow down!!!" in err and "[the answer failed: broke n???" in err
    assert all(len(line) < 260 for line in err.splitlines()), err
    assert not any(ch < " " and ch != "\n" or "\x7f" <= ch <= "\x9f" for ch in err), repr(err)
    assert "title" not in err and "pwned" not in out


async def test_stdout_closed_early_ends_quietly() -> None:
    """`chatrelay chat … | head -c 10`: the reader goes away mid-answer; no traceback, exit 141."""

    async def answer(ws: ServerConnection, chat_id: str) -> None:
        await ws.send(encode(Accepted(turn=1, id=chat_id)).decode())
        for seq in range(1, 100_000):  # until the CLI goes away
            await ws.send(encode(Chunk(seq=seq, turn=1, text="words and more words ")).decode())

    async with fake_gateway(answer) as url:
        read_fd, write_fd = os.pipe()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shared.client.cli", "chat", "--url", url, "hi",
            stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=asyncio.subprocess.PIPE,
        )
        os.close(write_fd)
        try:
            assert process.stderr is not None
            with os.fdopen(read_fd, "rb") as head:
                first = await asyncio.to_thread(head.read, 10)  # then close it, as head does
            async with asyncio.timeout(3 * WAIT_S):
                err = await process.stderr.read()
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert first == b"words and "
    assert code == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


async def test_a_password_in_the_url_is_masked() -> None:
    """ws://user:pw@host: notices show ws://user:***@host."""
    url = f"ws://alice:s3cret-pw@127.0.0.1:{free_port()}/ws"
    code, _, err = await run_cli("chat", "--url", url, "--connect-timeout", "0.5", "--backoff-initial", "0.05", "hi")
    assert code == 2
    assert "cannot reach ws://alice:***@127.0.0.1:" in err
    assert "s3cret-pw" not in err


# --session: the history request that says where to resume --------------------


def history_then_refuse(body: bytes) -> Answer:
    """History answers ``body``; the upgrade is refused (403), so the CLI ends there."""

    async def answer(line: str, writer: asyncio.StreamWriter) -> None:
        if "/history" in line:
            writer.write(http_response("200 OK", body))
        else:
            writer.write(http_response("403 Forbidden", b'{"type":"error","code":"forbidden","message":"no"}'))

    return answer


@pytest.mark.parametrize("body", [b"[1, 2]", b"null", b'{"resume_from": 1e400}', b'{"resume_from": -3}', b'{"resume_from": true}', b'{"resume_from": "7"}', b"[" * 100_000, b"not json"])
async def test_a_bad_history_answer_replays_the_session(body: bytes) -> None:
    """History that is not {"resume_from": seq}: a notice, then last_seq=0; no traceback."""
    async with crafted_server(history_then_refuse(body)) as (port, requests):
        code, _, err = await run_cli("chat", "--url", f"ws://127.0.0.1:{port}/ws", "--session", "abc", "hi")
    assert code == 2, err
    assert "Traceback" not in err
    assert "[could not read where session abc left off (its answer has no resume_from that is a seq): replaying it from the start]" in err
    assert any(line.startswith("GET /ws?") and "last_seq=0" in line for line in requests), requests


async def test_a_good_history_answer_sets_where_to_resume() -> None:
    async with crafted_server(history_then_refuse(b'{"resume_from": 42}')) as (port, requests):
        code, _, err = await run_cli("chat", "--url", f"ws://127.0.0.1:{port}/ws", "--session", "abc", "hi")
    assert code == 2, err
    assert "could not read" not in err
    assert any(line.startswith("GET /ws?") and "last_seq=42" in line for line in requests), requests


async def test_a_dripping_history_answer_is_bounded_by_the_connect_timeout() -> None:
    """A byte at a time, each well within any per-read timeout: --connect-timeout bounds the whole request."""
    stop = asyncio.Event()

    async def answer(line: str, writer: asyncio.StreamWriter) -> None:
        if "/history" not in line:
            await history_then_refuse(b"")(line, writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            writer.write(b" ")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)  # the drip's pace

    async with crafted_server(answer) as (port, requests):
        started = asyncio.get_running_loop().time()
        code, _, err = await run_cli("chat", "--url", f"ws://127.0.0.1:{port}/ws", "--session", "abc", "--connect-timeout", "1", "hi")
        elapsed = asyncio.get_running_loop().time() - started
        stop.set()
    assert code == 2, err
    assert "[could not read where session abc left off (no answer within 1 s): replaying it from the start]" in err
    assert any(line.startswith("GET /ws?") and "last_seq=0" in line for line in requests), requests
    assert elapsed < 1 + WAIT_S
