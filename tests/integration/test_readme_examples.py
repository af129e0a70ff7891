"""Every example a reader can paste runs, twice in a row, against a real stack.

Each Python block of README.md and docs/client.md, and each ``chatrelay`` or
``curl`` command against the gateway (in ``sh`` blocks and inline code), is run
as written, only the gateway's address swapped for the test stack's: twice,
because a reader runs an example again, and a fixed session then holds the
earlier run's turn. Each run must exit 0, with no ``busy``, having shown its
own turn's whole answer, and leave no turn generating behind it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.servers import Server
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/client.md"]
GATEWAY = "127.0.0.1:8000"  # the address the docs use; replaced by the stack's
# A busy error as each example would show it (the demo's answers may say "busy" in prose).
BUSY = re.compile(r"""\bbusy: |error busy|["']code["']: ?["']busy["']""")


@dataclass(frozen=True)
class Example:
    source: str  # where it is, for the test id
    kind: str  # "python" or "shell"
    text: str

    def __str__(self) -> str:
        return self.source


def _blocks(text: str, language: str) -> Iterator[tuple[int, str]]:
    for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S):
        yield text.count("\n", 0, match.start()) + 1, match.group(1)


def _is_client_command(command: str) -> bool:
    if not command.lstrip().startswith(("chatrelay", "curl")):
        return False
    words = shlex.split(command, comments=True)
    return bool(words) and (words[0] == "chatrelay" or (words[0] == "curl" and GATEWAY in command))


def examples() -> list[Example]:
    found: list[Example] = []
    for name in DOCS:
        text = (ROOT / name).read_text()
        for line, code in _blocks(text, "python"):
            found.append(Example(f"{name}:{line}", "python", code))
        for line, code in [*_blocks(text, "sh"), *_blocks(text, "bash")]:
            for offset, command in enumerate(code.replace("\\\n", " ").splitlines()):
                if _is_client_command(command):
                    found.append(Example(f"{name}:{line + offset + 1}", "shell", command))
        prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
        for match in re.finditer(r"`((?:chatrelay|curl) [^`]+)`", prose):
            if _is_client_command(match.group(1)):
                found.append(Example(f"{name}:{prose.count(chr(10), 0, match.start()) + 1}", "shell", match.group(1)))
    return found


EXAMPLES = examples()


def test_the_docs_have_examples_to_run() -> None:
    """The extraction finds the README's Python example and the CLI commands (so the runs below mean something)."""
    kinds = {(e.source.split(":")[0], e.kind) for e in EXAMPLES}
    assert {("README.md", "python"), ("docs/client.md", "python"), ("docs/client.md", "shell"), ("README.md", "shell")} <= kinds


@pytest.fixture(scope="module")
def docs_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url) as running:
        yield running


async def run(example: Example, stack: Stack) -> tuple[int, str, str]:
    text = example.text.replace(GATEWAY, f"127.0.0.1:{stack.port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAT_URL": stack.ws_url()}
    stdin = b""
    if example.kind == "python":
        argv = [sys.executable, "-c", text]
    else:
        words = shlex.split(text, comments=True)
        if words[0] == "chatrelay":
            argv = [sys.executable, "-m", "shared.client.cli", *words[1:]]
            if words[1:] == ["chat"]:  # interactive: one prompt, then end of input
                stdin = b"Tell me about rivers\n"
        else:
            argv = words
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(3 * WAIT_S):
            out, err = await process.communicate(stdin)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def session_of(example: Example, err: str) -> str | None:
    """The session the example uses: named in its text, or announced by the CLI."""
    named = re.search(r"""session[= ]["']?([A-Za-z0-9_-]+)""", example.text)
    if named:
        return named.group(1)
    announced = re.search(r"\[session ([A-Za-z0-9_-]+) ", err)
    return announced.group(1) if announced else None


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
async def test_example_runs_twice_each_with_its_own_answer(example: Example, docs_stack: Stack) -> None:
    for attempt in (1, 2):
        named = session_of(example, "")
        before = len((await history(docs_stack, named))["turns"]) if named else 0
        code, out, err = await run(example, docs_stack)
        context = f"{example} run {attempt}\n--- stdout\n{out}\n--- stderr\n{err}"
        assert code == 0, context
        assert not BUSY.search(out + err) and "Traceback" not in err, context
        session = session_of(example, err)
        assert session is not None, context
        record = await history(docs_stack, session)
        assert record["active"] is None, f"a turn still generates after the run ended: {context}"
        assert len(record["turns"]) == before + 1, context
        turn = record["turns"][-1]
        assert turn["reason"] in ("stop", "length"), context  # the demo model's answers end at its token cap
        # Its own answer, whole, at the end of its output (not a replayed earlier turn, not frames).
        ending = turn["answer"] + "\n"
        assert out.endswith(ending) or out.endswith(f"{ending}[{turn['reason']}]\n"), context
        await replayed_matches_history(docs_stack, session, record)


async def replayed_matches_history(stack: Stack, session: str, record: dict[str, Any]) -> None:
    """The example's frames are out of the test's sight: replay the session from seq 1 through the
    strict wire checker; every seq once, each turn's done, the text the stored one."""
    async with Clients(stack) as clients:
        client, ready = await clients.open(session, last_seq=0)
        assert ready["last_seq"] == record["last_seq"]
        while client.last_seq < record["last_seq"]:
            await client.recv()
        clients.wire.assert_history(session, record)
