"""The original design's page, served from another origin (a front end on its
own port, the usual set-up), against a gateway with the defaults of
``make run``: it streams a turn and pauses and resumes it in Chromium. Its
plain-text socket and the POST's streamed body go through the strict wire
checker (tests/wire.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from playwright.async_api import BrowserContext
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.browser.test_chat_page import PageWire, browser, context, page_stack, wire  # noqa: F401 (fixtures)
from tests.fake_openai import serve_in_thread
from tests.stack import WAIT_S, Bus, Stack, history, new_session
from tests.wire import CompatConnection

# The original design's React page, as plain JavaScript: a WebSocket on the
# gateway's root with ?sessionId=, a fetch POST with no Content-Type (a
# "simple" cross-origin request), and {"action": "pause"|"resume"} frames.
PAGE = """<!doctype html>
<meta charset="utf-8"><title>original page</title>
<button id="chat">Start chat</button><button id="pause">Pause</button><button id="resume">Resume</button>
<pre id="out"></pre>
<script>
  const gateway = %(gateway)s, sessionId = %(session)s;
  window.chatStatus = null;
  const ws = new WebSocket(`ws://${gateway}?sessionId=${sessionId}`);
  ws.onopen = () => { window.wsOpen = true; };
  ws.onmessage = (event) => { document.getElementById("out").textContent += event.data; };
  document.getElementById("chat").onclick = async () => {
    try {
      const res = await fetch(`http://${gateway}/api/chat`, {
        method: "POST", body: JSON.stringify({ prompt: "Tell me a story about the universe", sessionId }),
      });
      window.chatStatus = res.status;
    } catch (error) { window.chatStatus = String(error); }
  };
  document.getElementById("pause").onclick = () => ws.send(JSON.stringify({ action: "pause" }));
  document.getElementById("resume").onclick = () => ws.send(JSON.stringify({ action: "resume" }));
</script>
"""


@pytest.fixture(scope="module")
def page_origin(page_stack: Stack) -> Iterator[tuple[str, str]]:  # noqa: F811
    """A server of its own for the page; returns the page's URL (on ``localhost``,
    another origin than the gateway's ``127.0.0.1``) and its session."""
    session = new_session()
    gateway = f"127.0.0.1:{page_stack.port}"

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE % {"gateway": json.dumps(gateway), "session": json.dumps(session)})

    with serve_in_thread(Starlette(routes=[Route("/", page)])) as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        yield f"http://localhost:{port}/", session


async def test_original_page_from_another_origin_streams_pauses_and_resumes(
    page_stack: Stack,  # noqa: F811
    context: BrowserContext,  # noqa: F811
    page_origin: tuple[str, str],
    wire: PageWire,  # noqa: F811
) -> None:
    url, session = page_origin
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    await page.wait_for_function("window.wsOpen === true")
    (socket,) = wire.sockets
    assert isinstance(socket, CompatConnection) and socket.session == session
    async with Bus(page_stack, session) as bus:
        async with page.expect_response(f"http://127.0.0.1:{page_stack.port}/api/chat") as posted:
            await page.click("#chat")
        await page.wait_for_function("document.getElementById('out').textContent.length > 0")
        await page.click("#pause")
        await bus.control("pause")
        held = await page.text_content("#out")
        await bus.stored_done(turn=1, wait_s=3 * WAIT_S)  # the turn ended upstream while paused
    assert await page.text_content("#out") == held  # nothing delivered while paused
    answer = (await history(page_stack, session))["turns"][0]["answer"]
    assert held is not None and 0 < len(held) < len(answer)
    await page.click("#resume")
    await page.wait_for_function(f"document.getElementById('out').textContent.length >= {len(answer)}")
    assert await page.text_content("#out") == answer  # every chunk once, in order
    stored = await history(page_stack, session)
    await wire.until(lambda: len(socket.text) >= len(answer))
    socket.assert_history(stored, from_start=True)  # the socket was open before the turn: all of it, as sent
    body = wire.checker.compat(session)  # the POST's text/plain body honours pause too, and is the whole answer
    body.feed((await (await posted.value).body()).decode())
    body.assert_history(stored, from_start=True)
    # The POST's answer was readable across origins (CORS), not only sent.
    await page.wait_for_function("window.chatStatus !== null")
    assert await page.evaluate("window.chatStatus") == 200
    assert errors == []
