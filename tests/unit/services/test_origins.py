"""The gateway's browser-origin policy, without servers."""

from __future__ import annotations

import pytest

from services.gateway.origins import OriginPolicy
from services.gateway.settings import Settings

DEV = {"CHAT_AUTH_MODE": "dev"}
REQUIRED = {"CHAT_AUTH_MODE": "required", "CHAT_AUTH_SECRET": "a-secret-of-more-than-16-chars"}


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:5173", "http://127.0.0.1:3000", "https://localhost", "http://[::1]:8080", "http://127.0.0.2:1"],
)
def test_dev_mode_allows_pages_on_this_machine(origin: str) -> None:
    assert Settings.from_env(DEV).origins.allows(origin)


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io", "null", "file://", ""],
)
def test_dev_mode_refuses_other_pages(origin: str) -> None:
    policy = Settings.from_env(DEV).origins
    assert not policy.allows(origin)
    assert not policy.allows_request(origin, "127.0.0.1:8000")


def test_a_page_from_the_gateways_own_host_is_allowed() -> None:
    dev = Settings.from_env({**DEV, "CHAT_ALLOWED_ORIGINS": "https://app.example"}).origins
    assert dev.allows_request("http://192.168.1.20:8000", "192.168.1.20:8000")  # dev mode on a LAN address
    required = Settings.from_env({**REQUIRED, "CHAT_ALLOWED_ORIGINS": "https://app.example"}).origins
    assert required.allows_request("https://chat.example", "chat.example")  # behind a proxy that drops the port
    assert not required.allows_request("https://chat.example", "other.example")
    assert not required.allows_request("http://[::1", "x")  # malformed: refused, not an exception


@pytest.mark.parametrize("origin", ["http://rebound.example:8000", None])
def test_dev_mode_refuses_a_dns_name_a_foreign_site_could_rebind(origin: str | None) -> None:
    """DNS rebinding: evil.example points at 127.0.0.1, so its page's requests carry
    Host: evil.example (and, being same-origin to the browser, often no Origin)."""
    policy = Settings.from_env(DEV).origins
    assert not policy.allows_request(origin, "rebound.example:8000")
    assert "localhost" in policy.refusal(origin, "rebound.example:8000")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "chat.localhost:8000", "10.0.0.5:8000"])
def test_dev_mode_accepts_hosts_no_site_controls(host: str) -> None:
    assert Settings.from_env(DEV).origins.allows_request(None, host)


def test_dev_mode_accepts_a_listed_origins_host_and_required_mode_any() -> None:
    listed = Settings.from_env({**DEV, "CHAT_ALLOWED_ORIGINS": "https://app.example"}).origins
    assert listed.allows_request("https://app.example", "app.example")
    assert Settings.from_env(REQUIRED).origins.allows_request(None, "anything.example")


def test_a_listed_origin_is_exact_and_replaces_the_dev_default() -> None:
    policy = Settings.from_env({**DEV, "CHAT_ALLOWED_ORIGINS": "https://app.example/, http://localhost:3000"}).origins
    assert policy.allows("https://app.example") and policy.allows("http://localhost:3000")
    assert not policy.allows("http://localhost:5173")
    assert not policy.allows("https://app.example:444")


def test_requests_without_origin_are_not_browser_cross_origin_calls() -> None:
    assert Settings.from_env(DEV).origins.allows_request(None, None)


def test_tokens_required_allows_any_origin_unless_listed() -> None:
    assert Settings.from_env(REQUIRED).origins == OriginPolicy(origins=("*",))
    assert Settings.from_env(REQUIRED).origins.allows("https://anywhere.example")
    listed = Settings.from_env({**REQUIRED, "CHAT_ALLOWED_ORIGINS": "*"}).origins
    assert listed.any
