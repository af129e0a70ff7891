"""compose.yaml and the Dockerfile, validated as far as this machine allows.

The compose file is resolved as compose does it (YAML merge keys, ``${VAR:-default}``),
then checked against the compose specification by the ``compose-spec`` parser,
and for what the stack needs. ``docker compose config`` runs where the
compose plugin exists (it needs no engine).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import compose_spec
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"


def resolved() -> dict[str, Any]:
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), COMPOSE.read_text())
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", "set-by-the-operator", text)  # required variables
    data: dict[str, Any] = yaml.safe_load(text)
    return {k: v for k, v in data.items() if not k.startswith("x-")}


def test_compose_file_matches_the_spec() -> None:
    """The resolved compose file parses under the compose specification."""
    project = compose_spec.PyCompose.from_json(json.dumps(resolved()))
    project.validate()
    assert set(project.service_names()) == {"nats", "redis", "buffer", "worker", "gateway", "lb"}


def test_compose_stack_shape() -> None:
    """JetStream and AOF on volumes, services built from the Dockerfile, health checks, worker replicas."""
    services = resolved()["services"]
    volumes = resolved()["volumes"]
    assert "-js" in services["nats"]["command"]
    assert "--appendonly" in services["redis"]["command"]
    for name in ("nats", "redis"):
        mounted = [v.split(":")[0] for v in services[name]["volumes"]]
        assert mounted and all(v in volumes for v in mounted)
    for name in ("buffer", "worker", "gateway"):
        service = services[name]
        assert service["build"] == "." and service["image"] == "chatrelay:local"
        assert service["command"][0].startswith("chatrelay-")
        assert "readyz" in " ".join(service["healthcheck"]["test"])
        assert set(service["depends_on"]) == {"nats", "redis"}
        assert all(dep["condition"] == "service_healthy" for dep in service["depends_on"].values())
        assert service["environment"]["CHAT_NATS_URL"] == "nats://nats:4222"
        assert service["environment"]["CHAT_AUTH_MODE"] == "required"  # dev mode is for make run only
    for name in services:
        assert "healthcheck" in services[name], name
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["gateway"]["deploy"]["replicas"] >= 2 and "ports" not in services["gateway"]
    assert services["lb"]["ports"] == ["8000:8000"]
    assert services["lb"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_load_balancer_passes_websocket_upgrades() -> None:
    """nginx forwards Upgrade/Connection, does not buffer streams, and keeps them open."""
    services = resolved()["services"]
    mount = services["lb"]["volumes"][0].split(":")[0]
    config = (ROOT / mount).read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in config
    assert "proxy_set_header Connection $connection_upgrade" in config
    assert "proxy_buffering off" in config and "proxy_read_timeout 1h" in config
    assert "server gateway:8000" in config


def test_compose_commands_are_console_scripts() -> None:
    """Each service command is a console script the package installs."""
    scripts = set(re.findall(r"^(chatrelay-\w+) =", (ROOT / "pyproject.toml").read_text(), re.M))
    for service in resolved()["services"].values():
        if "command" in service and service.get("build"):
            assert service["command"][0] in scripts


def test_dockerfile_is_multistage_and_non_root() -> None:
    """The image builds in one stage, runs in another, as a non-root user."""
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "COPY --from=build" in text


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config() -> None:
    """`docker compose config` accepts the file, where the compose plugin exists."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
