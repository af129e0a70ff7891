"""Settings from the environment: defaults, parsing, errors and secrets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from services.buffer.settings import Settings as BufferSettings
from services.gateway.settings import Settings as GatewaySettings
from services.llm_worker.settings import Settings as WorkerSettings
from shared.errors import ConfigError
from shared.settings import BrokerSettings, Secret

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_serve_make_run() -> None:
    """With no environment the services use local NATS/Redis and the demo model."""
    gateway = GatewaySettings.from_env({"CHAT_AUTH_MODE": "dev"})  # what make run sets
    assert (gateway.host, gateway.port) == ("127.0.0.1", 8000)
    assert not gateway.auth.required
    assert gateway.broker.nats_url == "nats://127.0.0.1:4222"
    worker = WorkerSettings.from_env({})
    assert worker.provider == "demo"
    # Slow enough for a person to pause: tens of tokens a second, hundreds per answer.
    assert 5 <= worker.demo.tokens_per_s <= 50 and worker.demo.answer_tokens >= 200
    assert BufferSettings.from_env({}).retention.retention_s == 86_400


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_PORT": "eighty"}, "Config 'CHAT_PORT' has value 'eighty'. Not a valid int."),
        ({"CHAT_PORT": "-1"}, "Must be at least 0"),
        ({"CHAT_GAP_TIMEOUT_S": "nan"}, "CHAT_GAP_TIMEOUT_S"),
        ({"CHAT_LOG_LEVEL": "LOUD"}, "Expected one of"),
        ({"CHAT_NATS_URL": "http://x"}, "CHAT_NATS_URL"),
    ],
)
def test_bad_values_name_variable_and_value(env: dict[str, str], message: str) -> None:
    """A bad value fails at start-up with the variable's name and value."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        GatewaySettings.from_env({"CHAT_AUTH_MODE": "dev", **env})


def _float_settings() -> list[tuple[str, object]]:
    """Every number setting read with env_float, with the settings class of the service that reads it."""
    found = []
    for service, settings in (("gateway", GatewaySettings), ("llm_worker", WorkerSettings), ("buffer", BufferSettings)):
        source = (ROOT / "services" / service / "settings.py").read_text()
        found += [(name, settings) for name in re.findall(r'env_float\(\s*environ,\s*"([A-Z_]+)"', source)]
    return found


@pytest.mark.parametrize(("name", "settings"), _float_settings())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_no_number_setting_takes_infinity_or_nan(name: str, settings: Any, value: str) -> None:
    """float() parses these, but no timeout, interval or rate means anything at them."""
    with pytest.raises(ConfigError, match=rf"^Config '{name}' has value '{re.escape(value)}'\. Must be a finite number"):
        settings.from_env({"CHAT_AUTH_MODE": "dev", name: value})


def test_the_buffer_linger_is_bounded() -> None:
    """Each frame waits up to the linger: past 100 ms that is latency, not batching."""
    assert BufferSettings.from_env({"CHAT_BUFFER_LINGER_MS": "100"}).linger_s == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"^Config 'CHAT_BUFFER_LINGER_MS' has value '101'\. Must be at most 100"):
        BufferSettings.from_env({"CHAT_BUFFER_LINGER_MS": "101"})


def test_gateway_requires_a_secret_by_default() -> None:
    """Out of the box the gateway requires tokens, so it needs a signing secret."""
    with pytest.raises(ConfigError, match="CHAT_AUTH_SECRET"):
        GatewaySettings.from_env({})


def test_worker_rejects_unknown_provider() -> None:
    """Only demo and openai providers exist."""
    with pytest.raises(ConfigError, match="CHAT_MODEL_PROVIDER"):
        WorkerSettings.from_env({"CHAT_MODEL_PROVIDER": "magic"})


def test_secrets_are_masked() -> None:
    """API keys and Redis passwords never show in repr or describe()."""
    worker = WorkerSettings.from_env({"CHAT_OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(worker)
    assert str(worker.openai.api_key) == "sk-very-secret"
    broker = BrokerSettings.from_env({"CHAT_REDIS_URL": "redis://user:hunter2@redis:6379/0"})
    assert "hunter2" not in repr(broker) and "hunter2" not in str(broker.describe())
    assert repr(Secret("")) == "Secret('')"
    with pytest.raises(ConfigError) as error:
        BrokerSettings.from_env({"CHAT_REDIS_URL": "http://user:hunter2@redis"})
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    "value",
    ["localhost:11434/v1", "127.0.0.1:8080", "ftp://models.example/v1", "http://", "http://host:99999/v1", "/v1"],
)
def test_model_base_url_must_be_an_http_url(value: str) -> None:
    """A base URL without its scheme is caught at start-up, naming the variable (not at the first chat)."""
    with pytest.raises(ConfigError, match="CHAT_OPENAI_BASE_URL.*http://host"):
        WorkerSettings.from_env({"CHAT_OPENAI_BASE_URL": value})


@pytest.mark.parametrize(
    ("value", "base"),
    [
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/v1/chat/completions", "http://127.0.0.1:11434/v1"),
        (
            "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21",
            "https://x.openai.azure.com/openai/deployments/d?api-version=2024-10-21",
        ),
    ],
)
def test_model_base_url_is_the_base_even_when_the_endpoint_is_given(value: str, base: str) -> None:
    assert WorkerSettings.from_env({"CHAT_OPENAI_BASE_URL": value}).openai.base_url == base


def test_a_bad_url_with_a_password_is_reported_without_it() -> None:
    with pytest.raises(ConfigError) as error:
        WorkerSettings.from_env({"CHAT_OPENAI_BASE_URL": "htp://user:hunter22@host/v1"})
    assert "hunter22" not in str(error.value)


def test_model_settings_without_the_openai_provider_are_named() -> None:
    """Setting the model's URL but not CHAT_MODEL_PROVIDER=openai leaves the demo answering: say so."""
    env = {"CHAT_OPENAI_BASE_URL": "http://127.0.0.1:11434/v1", "CHAT_OPENAI_MODEL": "llama3.2"}
    assert WorkerSettings.from_env(env).unused_model_settings(env) == ["CHAT_OPENAI_BASE_URL", "CHAT_OPENAI_MODEL"]
    assert WorkerSettings.from_env({**env, "CHAT_MODEL_PROVIDER": "openai"}).unused_model_settings(env) == []
    compose_defaults = {"CHAT_OPENAI_BASE_URL": "https://api.openai.com/v1", "CHAT_OPENAI_API_KEY": "", "CHAT_OPENAI_MODEL": "gpt-4o-mini"}
    assert WorkerSettings.from_env(compose_defaults).unused_model_settings(compose_defaults) == []


def test_the_worker_says_which_model_answers_without_its_key() -> None:
    env = {"CHAT_MODEL_PROVIDER": "openai", "CHAT_OPENAI_BASE_URL": "http://u:pw123456@h:1/v1", "CHAT_OPENAI_API_KEY": "sk-abcdefgh12345678"}
    described = WorkerSettings.from_env(env).describe_model()
    assert described["model"] == "gpt-4o-mini" and "pw123456" not in described["upstream"]
    assert "sk-abcdefgh12345678" not in str(described)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_PORT": "70000"}, "CHAT_PORT.*at most 65535"),
        ({"CHAT_HEALTH_PORT": "70000"}, "CHAT_HEALTH_PORT.*at most 65535"),
        ({"CHAT_NATS_URL": "nats://[::1"}, "CHAT_NATS_URL.*Not a valid URL"),
        ({"CHAT_NATS_URL": "nats://u:pw123456@h:notaport"}, "CHAT_NATS_URL.*Not a valid URL"),
        ({"CHAT_REDIS_URL": "redis://127.0.0.1:6379/abc"}, "CHAT_REDIS_URL.*must be a number"),
    ],
)
def test_ports_and_broker_urls_are_checked_at_start_up(env: dict[str, str], message: str) -> None:
    """Caught with the variable's name, not as a traceback from a library (or a port that wraps)."""
    reader = GatewaySettings if "CHAT_PORT" in env else BufferSettings  # the buffer reads the health port
    with pytest.raises(ConfigError, match=message) as error:
        reader.from_env({"CHAT_AUTH_MODE": "dev", **env})
    assert "pw123456" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "name"),
    [(WorkerSettings, "CHAT_LEASE_S"), (WorkerSettings, "CHAT_QUEUE_TIMEOUT_S"), (GatewaySettings, "CHAT_QUEUE_TIMEOUT_S")],
)
def test_lease_and_queue_timeout_are_at_most_an_hour(settings: Any, name: str) -> None:
    """Past an hour a queued request has left its stream, and a lease's deadline makes a TTL Redis refuses."""
    assert settings.from_env({"CHAT_AUTH_MODE": "dev", name: "3600"})
    with pytest.raises(ConfigError, match=rf"^Config '{name}' has value '1e308'\. Must be at most 3600"):
        settings.from_env({"CHAT_AUTH_MODE": "dev", name: "1e308"})
