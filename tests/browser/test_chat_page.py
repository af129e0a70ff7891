"""The chat page in a real headless Chromium (Debian's), driven by Playwright.

Each test checks the page's final answer against the session's stored
history, so lost or duplicated text fails it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from devstack.servers import Server
from shared.auth import AuthSettings, TokenService
from tests.stack import WAIT_S, Bus, Stack, history, isolated_stack

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
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1000, "height": 760})
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        yield ctx
    finally:
        await ctx.close()


async def open_page(context: BrowserContext, stack: Stack) -> Page:
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
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


async def assert_matches_history(page: Page, stack: Stack, turn: int = 1) -> None:
    """The rendered answer is the stored answer, once (whitespace aside: Markdown makes paragraphs)."""
    session = await page.evaluate("localStorage.getItem('chatrelay.session')")
    stored = (await history(stack, session))["turns"][turn - 1]["answer"]
    shown = await page.inner_text(f'.answer[data-turn="{turn}"]')
    assert " ".join(shown.split()) == " ".join(stored.split())
    assert page.errors == []  # type: ignore[attr-defined]


async def test_send_streams_and_keyboard(page_stack: Stack, context: BrowserContext) -> None:
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
    await assert_matches_history(page, page_stack)
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


async def test_pause_stops_growth_and_resume_completes(page_stack: Stack, context: BrowserContext) -> None:
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
    await assert_matches_history(page, page_stack)


async def test_offline_mid_answer_reconnects_and_completes_once(page_stack: Stack, context: BrowserContext) -> None:
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
    await assert_matches_history(page, page_stack)


async def test_reload_mid_answer_completes_without_duplicates(page_stack: Stack, context: BrowserContext) -> None:
    """A reload mid-answer continues the same session and shows every word once."""
    page = await open_page(context, page_stack)
    await send(page, "reload me")
    await page.wait_for_function("document.querySelector('.answer[data-turn=\"1\"]')?.innerText.length > 40")
    await page.reload()
    await page.wait_for_selector('#status[data-state="connected"]')
    await wait_done(page)
    assert await page.locator(".turn").count() == 1
    await assert_matches_history(page, page_stack)


async def test_gateway_restart_mid_answer(page_stack: Stack, context: BrowserContext) -> None:
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
    await assert_matches_history(page, page_stack)


async def test_model_output_with_script_is_text(page_stack: Stack, context: BrowserContext) -> None:
    """Model output containing <script> is shown as text and never runs."""
    page = await open_page(context, page_stack)
    await send(page, "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">")
    await wait_done(page)
    assert await page.evaluate("window.pwned") is None
    assert await page.locator(".answer script, .answer img, .prompt script").count() == 0
    assert "<script>window.pwned = 1</script>" in await page.inner_text('.answer[data-turn="1"]')
    await assert_matches_history(page, page_stack)


async def test_phone_width_and_finished_conversation_screenshot(page_stack: Stack, browser: Browser, output_dir: Path) -> None:
    """At 390 px nothing scrolls sideways; a finished two-turn conversation is saved as a screenshot."""
    phone = await browser.new_context(viewport={"width": 390, "height": 780})
    try:
        page = await open_page(phone, page_stack)
        await send(page, "hello from a phone")
        await wait_done(page)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        await phone.close()
    desktop = await browser.new_context(viewport={"width": 1000, "height": 1250})
    try:
        page = await open_page(desktop, page_stack)
        await send(page, "Tell me how pausing works, with `code`")
        await wait_done(page, turn=1)
        await send(page, "And what if I lose the network?")
        await wait_done(page, turn=2)
        await assert_matches_history(page, page_stack, turn=2)
        await page.screenshot(path=str(output_dir / "chat-page.png"))
    finally:
        await desktop.close()


async def test_controls_have_roles_and_names_and_work_by_keyboard(page_stack: Stack, context: BrowserContext) -> None:
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
    await assert_matches_history(page, page_stack)


async def test_page_with_a_token_when_auth_is_required(redis_server: Server, browser: Browser) -> None:
    """With tokens required, the page opened with ?token= connects, chats, and keeps the token."""
    env = {**PACED, "CHAT_AUTH_MODE": "required", "CHAT_DEMO_ANSWER_TOKENS": "40"}
    with isolated_stack(redis_server.url, env) as stack:
        tokens = TokenService(AuthSettings.from_env(stack.env))
        context = await browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        try:
            page = await context.new_page()
            await page.goto(stack.http_url + "/?token=" + tokens.issue("page-user")[0])
            await page.wait_for_selector('#status[data-state="connected"]')
            await send(page, "hello with a token")
            await wait_done(page)
            assert await page.evaluate("localStorage.getItem('chatrelay.token')")
            second = await context.new_page()
            await second.goto(stack.http_url + "/")  # same browser, no ?token=: the kept token is used
            await second.wait_for_selector('#status[data-state="connected"]')
        finally:
            await context.close()
