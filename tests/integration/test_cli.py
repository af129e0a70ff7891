"""The chatrelay CLI as a real process against real services."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager

import pytest

from devstack.servers import Server, free_port
from shared.auth import AuthSettings, TokenService
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
