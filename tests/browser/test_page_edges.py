"""The chat page at its edges, in Debian's Chromium: the token in the address
bar, a server that wants a token the page lacks, prompts too big for the
server, and a reload or a second tab while the answer is paused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.async_api import BrowserContext, Page

from devstack.servers import Server
from shared.auth import AuthSettings, TokenService
from tests.browser.test_chat_page import (  # noqa: F401  (fixtures)
    PACED,
    TIMEOUT_MS,
    PageWire,
    answer_length,
    assert_matches_history,
    browser,
    context,
    open_page,
    page_stack,
    send,
    wait_done,
    wire,
)
from tests.stack import Stack, history, isolated_stack

# Tokens required, and a frame limit far below the page's default (64 KiB): a
# deployment that lowered CHAT_MAX_FRAME_BYTES without the page knowing.
STRICT = {**PACED, "CHAT_AUTH_MODE": "required", "CHAT_MAX_FRAME_BYTES": "4096", "CHAT_DEMO_ANSWER_TOKENS": "40"}


@pytest.fixture(scope="module")
def strict_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, STRICT) as stack:
        yield stack


# Answers of about 16 s (25 tokens/s, 400 tokens): still generating after a pause, a reload and a second tab.
SLOW = {"CHAT_DEMO_TOKENS_PER_S": "25", "CHAT_DEMO_ANSWER_TOKENS": "400"}


@pytest.fixture(scope="module")
def slow_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, SLOW) as stack:
        yield stack


@pytest.fixture(scope="module")
def tokens(strict_stack: Stack) -> TokenService:
    return TokenService(AuthSettings.from_env(strict_stack.env))


def watch(page: Page) -> dict[str, list[str]]:
    """Record the page's WebSockets and the chat frames it sends on them."""
    seen: dict[str, list[str]] = {"sockets": [], "chats": []}

    def on_socket(ws) -> None:  # type: ignore[no-untyped-def]
        seen["sockets"].append(ws.url)
        ws.on("framesent", lambda payload: seen["chats"].append(payload) if '"type":"chat"' in str(payload)[:40] else None)

    page.on("websocket", on_socket)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    return seen


async def goto_connected(ctx: BrowserContext, url: str) -> tuple[Page, dict[str, list[str]]]:
    page = await ctx.new_page()
    seen = watch(page)
    await page.goto(url)
    await page.wait_for_selector('#status[data-state="connected"]')
    return page, seen


# 1. The token leaves the address bar once the page has kept it.


async def test_token_is_dropped_from_the_address_bar(
    strict_stack: Stack, tokens: TokenService, context: BrowserContext, wire: PageWire  # noqa: F811
) -> None:
    token = tokens.issue("bar-user")[0]
    page, _ = await goto_connected(context, f"{strict_stack.http_url}/?lang=en&token={token}&x=1#here")
    href = await page.evaluate("location.href")
    assert "token" not in href and token not in href
    assert href == f"{strict_stack.http_url}/?lang=en&x=1#here"  # the rest of the address is kept
    await page.reload()
    await page.wait_for_selector('#status[data-state="connected"]')
    await send(page, "after a reload, without the token in the address")
    await wait_done(page)
    await assert_matches_history(page, strict_stack, wire, token=token)
    await page.go_back()  # replaced, not pushed: Back does not bring the token back
    assert "token" not in page.url


# 2. A server that requires a token the page lacks says so, instead of retrying blind.


@pytest.mark.parametrize("given", ["none", "garbage", "expired"])
async def test_sign_in_needed_instead_of_endless_reconnects(
    strict_stack: Stack, tokens: TokenService, context: BrowserContext, wire: PageWire, given: str  # noqa: F811
) -> None:
    token = {"none": None, "garbage": "not-a-token", "expired": tokens.issue("old-user", now=time.time() - 7200)[0]}[given]
    page = await context.new_page()
    seen = watch(page)
    await page.goto(strict_stack.http_url + "/" + (f"?token={token}" if token else ""))
    await page.wait_for_selector("#signin:not([hidden])")
    assert await page.get_attribute("#status", "data-state") == "closed"  # stopped for good, no countdown
    assert "sign-in" in (await page.inner_text("#status")).lower()
    assert "?token=" in await page.inner_text("#signin")  # says how
    assert f"X-API-Key: …' -H 'Content-Type: application/json' -d '{{\"user\":\"me\"}}' {strict_stack.http_url}/api/token" in (
        await page.inner_text("#signin")
    )  # and how an operator gets one
    assert len(seen["sockets"]) <= 2
    assert "token" not in await page.evaluate("location.href")
    assert await page.evaluate("localStorage.getItem('chatrelay.token')") is None  # the refused token is not kept
    # Paste a good token: the page connects and works.
    pasted = tokens.issue("pasted-user")[0]
    await page.fill("#signin-token", pasted)
    await page.click("#signin-use")
    await page.wait_for_selector('#status[data-state="connected"]')
    assert await page.is_hidden("#signin")
    assert "token" not in await page.evaluate("location.href")
    await send(page, "signed in")
    await wait_done(page)
    await assert_matches_history(page, strict_stack, wire, token=pasted)


async def test_other_handshake_failures_keep_reconnecting(page_stack: Stack, context: BrowserContext) -> None:  # noqa: F811
    """A gateway that is down is not a sign-in problem: the page counts down and comes back."""
    page, _ = await goto_connected(context, page_stack.http_url + "/")
    gateway = page_stack.gateways[0]
    gateway.stop()
    try:
        await page.wait_for_selector('#status[data-state="reconnecting"]')
        # Attempt 2 or later: the gateway's stop may take seconds, and the page counts on meanwhile.
        await page.wait_for_function(
            "Number((document.querySelector('#status').innerText.match(/attempt (\\d+)/) || [])[1]) >= 2"
        )
        assert await page.is_hidden("#signin")
    finally:
        gateway.start()
    await page.wait_for_selector('#status[data-state="connected"]')


# 3. Prompts too big for the server: refused before sending, text kept, never resent in a loop.


async def unaware_of_limits(browser_context: BrowserContext) -> None:
    """Serve the page a client that believes in no frame limit and ignores ready's
    bounds (an older page, or a proxy with a lower limit): its chats reach the server."""

    async def unlimited(route) -> None:  # type: ignore[no-untyped-def]
        response = await route.fetch()
        body = (await response.text()).replace("DEFAULT_MAX_FRAME_BYTES = 65536", "DEFAULT_MAX_FRAME_BYTES = 1e9")
        body = body.replace("ready.max_frame_bytes", "ready.unknown").replace("ready.max_prompt_chars", "ready.unknown")
        await route.fulfill(response=response, body=body)

    await browser_context.route("**/static/chat-client.js", unlimited)


@pytest.mark.parametrize("prompt", ["x" * 100_000, "€" * 70_000], ids=["100KB-ascii", "210KB-utf8"])
async def test_prompt_over_the_frame_limit_is_refused_before_sending(
    page_stack: Stack, context: BrowserContext, wire: PageWire, prompt: str  # noqa: F811
) -> None:
    page, seen = await goto_connected(context, page_stack.http_url + "/")
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")
    await page.wait_for_selector("#notice:not([hidden])")
    assert "too large" in (await page.inner_text("#notice")).lower()
    assert await page.input_value("#prompt") == prompt
    assert await page.get_attribute("#status", "data-state") == "connected"
    assert seen["chats"] == [] and await page.locator(".turn").count() == 0
    assert await page.is_enabled("#send")
    # The page still works: a prompt that fits goes through.
    await send(page, "a short one")
    await wait_done(page)
    await assert_matches_history(page, page_stack, wire)


async def test_prompt_over_the_character_limit_keeps_the_text(page_stack: Stack, context: BrowserContext) -> None:  # noqa: F811
    """Under the frame limit but over CHAT_MAX_PROMPT_CHARS (which ready gives): refused before sending,
    the bound named, the text kept in the box."""
    page, seen = await goto_connected(context, page_stack.http_url + "/")
    prompt = "y" * 20_000
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")
    await page.wait_for_selector("#notice:not([hidden])")
    assert "16000" in await page.inner_text("#notice")
    assert await page.input_value("#prompt") == prompt
    assert await page.is_enabled("#send")
    assert seen["chats"] == []
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [10_000, 60_000])
async def test_server_closing_on_a_big_chat_is_not_retried_forever(
    strict_stack: Stack, tokens: TokenService, context: BrowserContext, wire: PageWire, size: int  # noqa: F811
) -> None:
    """The server's limit is lower than the page knows (a client unaware of ready's bounds): it closes the
    socket on the chat (1009, or 1006 when Chromium is still writing). The page reports it, keeps the text,
    stops resending, and carries on."""
    token = tokens.issue("big-user")[0]
    await unaware_of_limits(context)
    page, seen = await goto_connected(context, f"{strict_stack.http_url}/?token={token}")
    prompt = "z" * size
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")
    await page.wait_for_selector('.note[data-reason="error"]')
    assert "too large" in (await page.inner_text("#notice")).lower()
    await page.wait_for_function(f"document.querySelector('#prompt').value.length === {size}")
    await page.wait_for_selector('#status[data-state="connected"]')
    assert 1 <= len(seen["chats"]) <= 3
    assert await page.is_enabled("#send")
    await page.fill("#prompt", "small again")
    await page.press("#prompt", "Enter")
    await wait_done(page)
    assert len(seen["chats"]) <= 4  # the big chat was not sent again with the small one
    await assert_matches_history(page, strict_stack, wire, token=token)


async def test_chat_that_keeps_dropping_the_connection_is_not_resent_forever(
    page_stack: Stack, context: BrowserContext, wire: PageWire  # noqa: F811
) -> None:
    """The page's own check off (as if it believed in a far bigger limit): a 210 KB chat makes Chromium see
    1006, not 1009, each time it is sent. The page gives it up after a few connections instead of looping."""

    await unaware_of_limits(context)
    page, seen = await goto_connected(context, page_stack.http_url + "/")
    prompt = "€" * 70_000
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")
    await page.wait_for_selector('.note[data-reason="error"]')
    assert "too large" in (await page.inner_text("#notice")).lower()
    await page.wait_for_function("document.querySelector('#prompt').value.length === 70000")
    await page.wait_for_selector('#status[data-state="connected"]')
    assert 1 <= len(seen["chats"]) <= 3
    await send(page, "small again")
    await wait_done(page)
    assert len(seen["chats"]) <= 4
    await assert_matches_history(page, page_stack, wire)


# 4. A reload or a second tab while the answer is paused shows the text already delivered.


async def test_reload_and_second_tab_while_paused_show_the_delivered_text(
    slow_stack: Stack, context: BrowserContext, wire: PageWire  # noqa: F811
) -> None:
    page = await open_page(context, slow_stack)
    await send(page, "pause, then reload")
    await page.wait_for_function("document.querySelector('.answer[data-turn=\"1\"]')?.innerText.length > 40")
    await page.click("#pause")
    await page.wait_for_selector('#pause[aria-pressed="true"]')
    held = await page.inner_text('.answer[data-turn="1"]')
    await page.reload()
    await page.wait_for_selector('#status[data-state="connected"]')
    await page.wait_for_selector('#pause[aria-pressed="true"]')
    session = await page.evaluate("localStorage.getItem('chatrelay.session')")
    assert (await history(slow_stack, session))["active"] is not None  # still generating: the case in question
    await answer_length(page)  # rendered
    assert await page.inner_text('.answer[data-turn="1"]') == held
    second = await open_page(context, slow_stack)
    await second.wait_for_selector('#pause[aria-pressed="true"]')
    await answer_length(second)
    assert await second.inner_text('.answer[data-turn="1"]') == held
    assert await second.locator(".turn").count() == 1
    await second.click("#pause")  # resume from the second tab: both complete, every word once
    await wait_done(second)
    await answer_length(second)  # rendered
    await assert_matches_history(second, slow_stack, wire)
    await page.bring_to_front()  # a tab in the background gets no animation frames: nothing is drawn there
    await wait_done(page)
    assert await answer_length(page) > len(held)
    await assert_matches_history(page, slow_stack, wire)
