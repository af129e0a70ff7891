"""The chat page in a real headless Chromium (Debian's), driven by Playwright.

Each test checks the page's final answer against the session's stored
history, so lost or duplicated text fails it, and the strict wire checker
(tests/wire.py) sees the raw frames of every socket the page opens, so a
contract fault the page's client smooths over (a duplicate it drops, a gap
it reconnects on) fails it too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import Browser, BrowserContext, Page, WebSocket, async_playwright

from devstack.servers import Server
from shared.auth import AuthSettings, TokenService
from tests.stack import WAIT_S, Bus, Clients, Stack, history, isolated_stack
from tests.wire import CompatConnection, WireChecker, WireViolation, WsConnection

# Answers of about 3 s (60 tokens/s, 200 tokens): time to pause, go offline or reload mid-answer.
PACED = {"CHAT_DEMO_TOKENS_PER_S": "60", "CHAT_DEMO_ANSWER_TOKENS": "200"}
OUTPUT = Path(os.environ.get("CHAT_TEST_OUTPUT", "test-output"))
# Root in a container has no user namespace sandbox; the rest keeps Chromium off the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = int(WAIT_S * 2000)


def chromium_path() -> str:
    path = os.environ.get("CHAT_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium not found: `make test` installs Debian's chromium, or set CHAT_TEST_CHROMIUM")
    return path


class PageWire:
    """Feeds the raw frames of every WebSocket that the watched browser
    contexts' pages open (new tabs and reloads included: a reload opens a new
    socket) to one strict :class:`WireChecker`, one connection per socket."""

    def __init__(self) -> None:
        self.checker = WireChecker()
        self.sockets: list[WsConnection | CompatConnection] = []
        self.fed = asyncio.Event()  # set at every frame: tests wait on the checker, not on time

    def attach(self, ctx: BrowserContext) -> None:
        """Watch every page of ``ctx``, those open now and those to come."""
        ctx.on("page", self.watch)
        for page in ctx.pages:
            self.watch(page)

    def watch(self, page: Page) -> None:
        page.on("websocket", self.opened)

    def opened(self, ws: WebSocket) -> None:
        query = parse_qs(urlsplit(ws.url).query)
        connection: WsConnection | CompatConnection
        if "sessionId" in query:  # the original design's plain-text socket
            connection = self.checker.compat(query["sessionId"][0])
        else:
            connection = self.checker.ws_url(ws.url)
        self.sockets.append(connection)
        ws.on("framereceived", lambda payload: self.received(connection, payload))

    def received(self, connection: WsConnection | CompatConnection, payload: str | bytes) -> None:
        # Called from Playwright's event dispatch: a raise there would not fail the
        # test, so violations are only recorded; the fixture asserts them.
        try:
            connection.feed(payload)
        except WireViolation:
            pass
        self.fed.set()

    async def until(self, predicate: Callable[[], bool], wait_s: float = WAIT_S) -> None:
        """Wait until ``predicate()`` holds, checked at every frame fed."""
        async with asyncio.timeout(wait_s):
            while not predicate():
                self.fed.clear()
                await self.fed.wait()

    async def assert_history(self, session: str, stored: dict, stack: Stack, token: str | None = None) -> None:  # type: ignore[type-arg]
        """Every frame up to the stored last seq was seen on the wire (the
        browser reports a frame to Playwright and to the page independently),
        and the text delivered is the stored history. A frame the page got
        just before a reload may never reach Playwright (the page then resumes
        after it): a replay of the whole session, checked like any connection,
        fills it in, so each seq is still compared with what the page's sockets
        carried wherever Playwright saw it."""
        await self.until(lambda: max(self.checker.record(session).frames, default=0) >= stored["last_seq"])
        async with Clients(stack, self.checker) as replay:
            client, _ = await replay.open(session, **({"token": token} if token else {}))
            while client.last_seq < stored["last_seq"]:
                await client.recv()
        self.checker.assert_history(session, stored)


@pytest.fixture
def wire() -> Iterator[PageWire]:
    """The wire of every page the test opens; any contract violation fails the test."""
    watched = PageWire()
    yield watched
    watched.checker.assert_clean()


@pytest.fixture(scope="module")
def page_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, PACED) as stack:
        yield stack


@pytest.fixture
def output_dir() -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def context(browser: Browser, wire: PageWire) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1000, "height": 760})
    ctx.set_default_timeout(TIMEOUT_MS)
    wire.attach(ctx)
    try:
        yield ctx
    finally:
        await ctx.close()


def track_errors(page: Page) -> None:
    """Keep the page's uncaught errors in ``page.errors``."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]


async def open_page(context: BrowserContext, stack: Stack) -> Page:
    page = await context.new_page()
    track_errors(page)
    await page.goto(stack.http_url + "/")
    await page.wait_for_selector('#status[data-state="connected"]')
    return page


async def send(page: Page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")


async def answer_length(page: Page, turn: int = 1) -> int:
    await page.evaluate("new Promise((resolve) => requestAnimationFrame(() => resolve()))")  # rendered
    return int(await page.evaluate(f"document.querySelector('.answer[data-turn=\"{turn}\"]')?.innerText.length ?? 0"))


async def wait_done(page: Page, turn: int = 1) -> None:
    await page.wait_for_selector(f'.answer[data-turn="{turn}"]:is([data-status="stop"], [data-status="length"])')


async def assert_matches_history(page: Page, stack: Stack, wire: PageWire, turn: int = 1, token: str | None = None) -> None:
    """The rendered answer is the stored answer, once (whitespace aside: Markdown makes paragraphs),
    and so is what the page's sockets received, frame by frame."""
    session = await page.evaluate("localStorage.getItem('chatrelay.session')")
    record = await history(stack, session, token=token)
    stored = record["turns"][turn - 1]["answer"]
    shown = await page.inner_text(f'.answer[data-turn="{turn}"]')
    assert " ".join(shown.split()) == " ".join(stored.split())
    assert page.errors == []  # type: ignore[attr-defined]
    await wire.assert_history(session, record, stack, token)


async def test_send_streams_and_keyboard(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """Enter sends, Shift+Enter adds a line; the answer grows while it streams, then completes."""
    page = await open_page(context, page_stack)
    await page.fill("#prompt", "first line")
    await page.press("#prompt", "Shift+Enter")
    await page.type("#prompt", "second line")
    assert await page.input_value("#prompt") == "first line\nsecond line"
    await page.press("#prompt", "Enter")
    assert await page.input_value("#prompt") == ""
    await page.wait_for_selector('.answer[data-turn="1"][data-status="streaming"]')
    first = await answer_length(page)
    await page.wait_for_function(f"document.querySelector('.answer[data-turn=\"1\"]').innerText.length > {first + 40}")
    assert await page.is_disabled("#send") and await page.is_enabled("#stop")
    await wait_done(page)
    assert await page.inner_text(".prompt") == "first line\nsecond line"
    await assert_matches_history(page, page_stack, wire)
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


async def test_pause_stops_growth_and_resume_completes(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """Pause: the text stops growing while the turn finishes upstream; resume: it completes."""
    page = await open_page(context, page_stack)
    session = await page.evaluate("localStorage.getItem('chatrelay.session')")
    async with Bus(page_stack, session) as bus:
        await send(page, "pause me")
        await page.wait_for_selector('.answer[data-turn="1"][data-status="streaming"]')
        await page.click("#pause")
        await page.wait_for_selector('#pause[aria-pressed="true"]')
        held = await answer_length(page)
        await bus.stored_done(turn=1, wait_s=3 * WAIT_S)  # generation went on and ended upstream
    assert await answer_length(page) == held
    assert await page.inner_text("#status") == "Connected · paused"
    await page.click("#pause")
    await page.wait_for_selector('#pause[aria-pressed="false"]')
    await wait_done(page)
    assert await answer_length(page) > held
    await assert_matches_history(page, page_stack, wire)


async def test_offline_mid_answer_reconnects_and_completes_once(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """Offline mid-answer shows the offline/reconnecting state; back online, the answer completes exactly once."""
    page = await open_page(context, page_stack)
    await send(page, "survive the network")
    await page.wait_for_selector('.answer[data-turn="1"][data-status="streaming"]')
    await context.set_offline(True)
    await page.wait_for_selector('#status:is([data-state="offline"], [data-state="reconnecting"])')
    assert "attempt" in await page.inner_text("#status")
    await context.set_offline(False)
    await page.wait_for_selector('#status[data-state="connected"]')
    await wait_done(page)
    await assert_matches_history(page, page_stack, wire)


async def test_reload_mid_answer_completes_without_duplicates(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """A reload mid-answer continues the same session and shows every word once."""
    page = await open_page(context, page_stack)
    await send(page, "reload me")
    await page.wait_for_function("document.querySelector('.answer[data-turn=\"1\"]')?.innerText.length > 40")
    await page.reload()
    await page.wait_for_selector('#status[data-state="connected"]')
    await wait_done(page)
    assert await page.locator(".turn").count() == 1
    await assert_matches_history(page, page_stack, wire)


async def test_gateway_restart_mid_answer(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """The gateway restarts mid-answer: the page shows reconnecting, then completes the answer once."""
    page = await open_page(context, page_stack)
    await send(page, "outlive the gateway")
    await page.wait_for_selector('.answer[data-turn="1"][data-status="streaming"]')
    gateway = page_stack.gateways[0]
    gateway.stop()
    await page.wait_for_selector('#status[data-state="reconnecting"]')
    gateway.start()
    await page.wait_for_selector('#status[data-state="connected"]')
    await wait_done(page)
    await assert_matches_history(page, page_stack, wire)


async def test_model_output_with_script_is_text(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """Model output containing <script> is shown as text and never runs."""
    page = await open_page(context, page_stack)
    await send(page, "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">")
    await wait_done(page)
    assert await page.evaluate("window.pwned") is None
    assert await page.locator(".answer script, .answer img, .prompt script").count() == 0
    assert "<script>window.pwned = 1</script>" in await page.inner_text('.answer[data-turn="1"]')
    await assert_matches_history(page, page_stack, wire)


async def test_phone_width_and_finished_conversation_screenshot(
    page_stack: Stack, browser: Browser, output_dir: Path, wire: PageWire
) -> None:
    """At 390 px nothing scrolls sideways; a finished two-turn conversation is saved as a screenshot."""
    phone = await browser.new_context(viewport={"width": 390, "height": 780})
    wire.attach(phone)
    try:
        page = await open_page(phone, page_stack)
        await send(page, "hello from a phone")
        await wait_done(page)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await assert_matches_history(page, page_stack, wire)
    finally:
        await phone.close()
    desktop = await browser.new_context(viewport={"width": 1000, "height": 1250})
    wire.attach(desktop)
    try:
        page = await open_page(desktop, page_stack)
        await send(page, "Tell me how pausing works, with `code`")
        await wait_done(page, turn=1)
        await send(page, "And what if I lose the network?")
        await wait_done(page, turn=2)
        await assert_matches_history(page, page_stack, wire, turn=2)
        await page.screenshot(path=str(output_dir / "chat-page.png"))
    finally:
        await desktop.close()


async def test_controls_have_roles_and_names_and_work_by_keyboard(page_stack: Stack, context: BrowserContext, wire: PageWire) -> None:
    """Every control is reachable by role and accessible name; a turn can be sent and paused by keyboard alone."""
    page = await open_page(context, page_stack)
    assert await page.get_by_role("status").count() == 1
    prompt = page.get_by_label("Your message")
    for name in ("Send", "Pause", "Stop", "New chat"):
        assert await page.get_by_role("button", name=name).count() == 1, name
    await prompt.focus()
    await page.keyboard.type("by keyboard only")
    await page.keyboard.press("Enter")
    await page.wait_for_selector('.answer[data-turn="1"][data-status="streaming"]')
    pause = page.get_by_role("button", name="Pause")
    await pause.focus()
    await page.keyboard.press("Enter")
    await page.wait_for_selector('#pause[aria-pressed="true"]')
    await page.keyboard.press("Enter")  # focus stays on the toggle, now "Resume"
    await page.wait_for_selector('#pause[aria-pressed="false"]')
    await wait_done(page)
    await assert_matches_history(page, page_stack, wire)


async def test_page_with_a_token_when_auth_is_required(redis_server: Server, browser: Browser, wire: PageWire) -> None:
    """With tokens required, the page opened with ?token= connects, chats, and keeps the token."""
    env = {**PACED, "CHAT_AUTH_MODE": "required", "CHAT_DEMO_ANSWER_TOKENS": "40"}
    with isolated_stack(redis_server.url, env) as stack:
        tokens = TokenService(AuthSettings.from_env(stack.env))
        context = await browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        wire.attach(context)
        try:
            page = await context.new_page()
            track_errors(page)
            token = tokens.issue("page-user")[0]
            await page.goto(stack.http_url + "/?token=" + token)
            await page.wait_for_selector('#status[data-state="connected"]')
            await send(page, "hello with a token")
            await wait_done(page)
            await assert_matches_history(page, stack, wire, token=token)
            assert await page.evaluate("localStorage.getItem('chatrelay.token')")
            second = await context.new_page()
            await second.goto(stack.http_url + "/")  # same browser, no ?token=: the kept token is used
            await second.wait_for_selector('#status[data-state="connected"]')
        finally:
            await context.close()
