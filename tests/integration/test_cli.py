"""The chatrelay CLI as a real process against real services."""

from __future__ import annotations

import asyncio
import signal
import sys

from tests.faultproxy import FaultProxy
from tests.stack import WAIT_S, Stack, history, new_session


async def run_cli(*args: str, stop_after_output: bool = False) -> tuple[int, str, str]:
    """Run ``chatrelay`` with args; optionally send SIGINT once output begins."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.client.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    out = b""
    async with asyncio.timeout(3 * WAIT_S):
        if stop_after_output:
            out = await process.stdout.read(1)
            process.send_signal(signal.SIGINT)
        rest, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
        code = await process.wait()
    return code, (out + rest).decode(), err.decode()


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
