"""Token settings, issuing and verifying with HS256, RS256 and ES256."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.auth import ANONYMOUS, AuthSettings, Principal, TokenService
from shared.errors import ConfigError, ProtocolError

SECRET = "a-test-secret-of-32-characters!!"


def hs(**env: str) -> TokenService:
    return TokenService(AuthSettings.from_env({"CHAT_AUTH_SECRET": SECRET, **env}))


def test_issue_and_verify_round_trip() -> None:
    """A token names its user and expiry, and verifies."""
    service = hs(CHAT_TOKEN_TTL_S="60")
    token, exp = service.issue("alice")
    assert abs(exp - (time.time() + 60)) < 2
    assert service.verify(token) == Principal(user="alice", exp=exp)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s: s.issue("alice", now=time.time() - 10_000)[0], "expired"),
        (lambda s: "not.a.token", "not valid"),
        (lambda s: jwt.encode({"sub": "alice", "exp": time.time() + 60}, "another-secret-of-32-characters!!", algorithm="HS256"), "not valid"),
        (lambda s: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "not valid"),
        (lambda s: jwt.encode({"exp": time.time() + 60}, SECRET, algorithm="HS256"), "not valid"),
        (lambda s: jwt.encode({"sub": "a.b", "exp": time.time() + 60}, SECRET, algorithm="HS256"), "subject"),
        (lambda s: jwt.encode({"sub": "alice", "exp": time.time() + 60}, None, algorithm="none"), "not valid"),
    ],
)
def test_bad_tokens_are_unauthorized(make, message: str) -> None:  # type: ignore[no-untyped-def]
    """Expired, forged, malformed, subject-less and alg=none tokens are refused with code unauthorized."""
    service = hs()
    with pytest.raises(ProtocolError, match=message) as error:
        service.verify(make(service))
    assert error.value.code == "unauthorized"


def test_modes() -> None:
    """Required mode needs a token; dev mode lets a request without one in as anonymous."""
    with pytest.raises(ProtocolError) as error:
        hs(CHAT_AUTH_MODE="required").principal(None)
    assert error.value.code == "unauthorized"
    assert hs(CHAT_AUTH_MODE="dev").principal(None) == ANONYMOUS
    dev = TokenService(AuthSettings.from_env({"CHAT_AUTH_MODE": "dev"}))  # a random secret of its own
    assert dev.verify(dev.issue("bob")[0]).user == "bob"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "CHAT_AUTH_SECRET' is missing"),
        ({"CHAT_AUTH_SECRET": "short"}, "too short"),
        ({"CHAT_AUTH_SECRET": SECRET, "CHAT_AUTH_ALGORITHM": "RS256"}, "CHAT_AUTH_PUBLIC_KEY' is missing"),
        ({"CHAT_AUTH_SECRET": SECRET, "CHAT_AUTH_MODE": "open"}, "CHAT_AUTH_MODE"),
        ({"CHAT_AUTH_ALGORITHM": "ES256", "CHAT_AUTH_PUBLIC_KEY": "@/nonexistent.pem"}, "cannot be read"),
    ],
)
def test_bad_settings(env: dict[str, str], message: str) -> None:
    """Unsafe or impossible auth settings stop the service at start-up."""
    with pytest.raises(ConfigError, match=message):
        AuthSettings.from_env(env)


def _pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)), ("ES256", lambda: ec.generate_private_key(ec.SECP256R1()))],
)
def test_identity_provider_tokens(algorithm: str, key) -> None:  # type: ignore[no-untyped-def]
    """With a public key only, tokens from an identity provider verify and none can be issued here."""
    private, public = _pem(key())
    settings = AuthSettings.from_env({"CHAT_AUTH_ALGORITHM": algorithm, "CHAT_AUTH_PUBLIC_KEY": public, "CHAT_AUTH_AUDIENCE": "chat"})
    service = TokenService(settings)
    assert not service.can_issue
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60, "aud": "chat"}, private, algorithm=algorithm)
    assert service.verify(token).user == "carol"
    wrong_audience = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60, "aud": "other"}, private, algorithm=algorithm)
    with pytest.raises(ProtocolError):
        service.verify(wrong_audience)
    with pytest.raises(ProtocolError):  # an HS256 token signed with the public key as a secret
        service.verify(jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "k" * 32, algorithm="HS256"))


def test_api_keys_compare_and_hide() -> None:
    """API keys match exactly and never show in repr."""
    service = hs(CHAT_API_KEYS="key-one, key-two")
    assert service.api_key_valid("key-two") and not service.api_key_valid("key-three") and not service.api_key_valid(None)
    assert "key-one" not in repr(service.settings) and SECRET not in repr(service.settings)


def signed(**claims: object) -> str:
    return jwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": 2, "exp": 60},  # minted by a host whose clock is 2 s ahead
        {"iat": 25, "nbf": 25, "exp": 60},
        {"iat": -100, "exp": -20},  # expired 20 s ago: within the leeway
    ],
)
def test_clock_skew_within_the_leeway_is_accepted(claims: dict[str, int]) -> None:
    """iat, nbf and exp are checked with 30 s of leeway by default."""
    now = int(time.time())
    token = signed(**{name: now + offset for name, offset in claims.items()})
    assert hs().verify(token).user == "alice"


def test_clock_skew_beyond_the_leeway_is_refused() -> None:
    """A token from a clock far ahead, or long expired, is refused; with leeway 0, 2 s ahead is too."""
    now = int(time.time())
    with pytest.raises(ProtocolError, match="not valid yet"):
        hs().verify(signed(iat=now + 120, exp=now + 600))
    with pytest.raises(ProtocolError, match="expired"):
        hs().verify(signed(iat=now - 600, exp=now - 60))
    with pytest.raises(ProtocolError, match="not valid yet"):
        hs(CHAT_AUTH_LEEWAY_S="0").verify(signed(iat=now + 5, exp=now + 600))
    assert hs(CHAT_AUTH_LEEWAY_S="120").verify(signed(iat=now + 100, exp=now + 600)).user == "alice"
