"""compose.yaml and the Dockerfile, validated as far as this machine allows.

The compose file is resolved as compose does it (YAML merge keys, ``${VAR:-default}``),
then checked against the compose specification by the ``compose-spec`` parser,
and for what the stack needs. ``docker compose config`` runs where the
compose plugin exists (it needs no engine).
"""

from __future__ import annotations

import json
import os
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
    # Docker maps the special address `host-gateway` to the host's; this parser wants an IP.
    text = json.dumps(resolved()).replace(":host-gateway", ":192.0.2.1")
    project = compose_spec.PyCompose.from_json(text)
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
    command = ["docker", "compose", "-f", str(COMPOSE), "--env-file", os.devnull, "config", "--quiet"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    settings = {"CHAT_AUTH_SECRET": "x" * 32, "CHAT_API_KEYS": "a-key"}
    result = subprocess.run(command, capture_output=True, text=True, env={**environ, **settings})
    assert result.returncode == 0, result.stderr
    # Without the secret, compose stops and says where to set it.
    result = subprocess.run(command, capture_output=True, text=True, env={**environ, "CHAT_API_KEYS": "a-key"})
    assert result.returncode != 0 and "CHAT_AUTH_SECRET" in result.stderr and ".env" in result.stderr


# --- deploy/nginx.conf --------------------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")
# Variables that carry the query string (tokens travel in `?token=`), or headers with credentials.
LEAKY_VARIABLE = re.compile(
    r"\$\{?(request|request_uri|args|query_string|is_args|request_body|http_referer|http_authorization"
    r"|http_cookie|http_x_api_key|arg_\w+|cookie_\w+)\b"
)


class Directive:
    def __init__(self, name: str, args: list[str], block: list[Directive] | None) -> None:
        self.name, self.args, self.block = name, args, block

    def find(self, name: str) -> list[Directive]:
        """Directives called ``name`` in this block, at any depth."""
        found: list[Directive] = []
        for child in self.block or []:
            if child.name == name:
                found.append(child)
            found += child.find(name)
        return found

    def children(self, name: str) -> list[Directive]:
        return [child for child in self.block or [] if child.name == name]


def parse_nginx(text: str) -> Directive:
    """nginx's configuration syntax: directives ending in ``;``, blocks in braces, quoted strings, comments."""
    tokens = [t for t in NGINX_TOKEN.findall(text) if not t.startswith("#")]
    position = 0

    def block() -> list[Directive]:
        nonlocal position
        directives: list[Directive] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                directives.append(Directive(words[0], words[1:], None))
                words = []
            elif token == "{":
                directives.append(Directive(words[0], words[1:], block()))
                words = []
            elif token == "}":
                assert not words, f"unterminated directive {words}"
                return directives
            else:
                words.append(token[1:-1] if token[0] in "\"'" else token)
        assert not words, f"unterminated directive {words}"
        return directives

    return Directive("main", [], block())


def nginx_conf() -> Directive:
    return parse_nginx(NGINX_CONF.read_text())


def test_nginx_access_log_never_writes_a_token() -> None:
    """The access log uses a format of its own, without the query string, Referer or credentials.

    Browsers can send a token only as ``?token=`` (and the page's own URL carries
    one, which its first requests then send as Referer): the default ``combined``
    format would write both."""
    conf = nginx_conf()
    (http,) = conf.children("http")
    formats = {
        d.args[0]: "".join(a for a in d.args[1:] if not a.startswith("escape=")) for d in conf.find("log_format")
    }
    maps = {d.args[1]: d for d in conf.find("map")}
    access_logs = conf.find("access_log")
    assert http.children("access_log"), "the http block sets its access log (else nginx writes `combined`)"
    for directive in access_logs:
        if directive.args == ["off"]:
            continue
        assert len(directive.args) >= 2 and directive.args[1] in formats, (
            f"access_log without a format of ours: {directive.args}"
        )
        fmt = formats[directive.args[1]]
        assert not LEAKY_VARIABLE.search(fmt), f"log_format {directive.args[1]} writes {LEAKY_VARIABLE.search(fmt)}"
        for variable in re.findall(r"\$\{?(\w+)", fmt):
            mapping = maps.get(f"${variable}")
            if mapping is None:
                continue
            source_leaks = LEAKY_VARIABLE.fullmatch(mapping.args[0]) is not None
            for entry in mapping.block or []:
                key, value = entry.name, "".join(entry.args)
                assert not LEAKY_VARIABLE.search(value), f"map {mapping.args} gives {value}"
                if source_leaks and "$" in value:
                    # A capture of the source: only what comes before the query string.
                    assert key.startswith("~^") and "[^?]" in key, f"map {mapping.args}: {key} may keep the query"


def test_nginx_error_log_of_requests_is_quiet() -> None:
    """nginx quotes the request line (token included) in every error it logs about a request
    (an unreachable gateway is level `error`): the http block's error log keeps only `alert`
    and worse, which concern nginx itself."""
    (http,) = nginx_conf().children("http")
    assert http.children("error_log"), "without one, requests inherit the main error log and its level"
    for directive in http.find("error_log"):
        assert len(directive.args) == 2 and directive.args[1] in ("alert", "emerg"), directive.args


def test_nginx_follows_scaled_gateways() -> None:
    """`docker compose up --scale gateway=N` reaches nginx without a restart: the upstream's
    name is resolved again through Docker's DNS (`resolve`, open-source nginx 1.27.3+)."""
    conf = nginx_conf()
    (http,) = conf.children("http")
    upstream = next(d for d in http.children("upstream") if d.args == ["gateways"])
    assert upstream.children("zone"), "`resolve` needs the upstream in shared memory"
    servers = upstream.children("server")
    assert servers and all("resolve" in s.args for s in servers)
    resolvers = http.children("resolver") + upstream.children("resolver")
    assert resolvers and resolvers[0].args[0] == "127.0.0.11"  # Docker's embedded DNS
    assert any(re.fullmatch(r"valid=\d+s", a) for a in resolvers[0].args)
    assert {d.args[0] for d in conf.find("proxy_pass")} == {"http://gateways"}
    image = resolved()["services"]["lb"]["image"]
    match = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?(-alpine)?", image)
    assert match, image
    assert (int(match[1]), int(match[2]), int(match[3] or 0)) >= (1, 27, 3), image


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_logs_no_token_when_run(tmp_path: Path) -> None:
    """The real nginx, with this configuration pointed at a gateway that is down: requests
    carrying tokens in the URL and the Referer leave no token in any log."""
    import http.client
    import time

    port, dead = _free_port(), _free_port()
    text = NGINX_CONF.read_text()
    text = text.replace("/dev/stdout", str(tmp_path / "access.log")).replace("/dev/stderr", str(tmp_path / "error.log"))
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    text = text.replace("worker_processes auto;", "worker_processes 1;")
    # An address needs no resolving (and nginx before 1.27.3 lacks `resolve`).
    text = re.sub(r"server gateway:8000 resolve", f"server 127.0.0.1:{dead}", text)
    assert f"127.0.0.1:{dead}" in text
    (tmp_path / "nginx.conf").write_text(text)
    base = ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "startup.log")]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with (tmp_path / "stderr.log").open("w") as stderr:
        server = subprocess.Popen([*base, "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        statuses = []
        for path, referer in (
            ("/ws?session=s1&token=SECRET-ONE", "http://x/?token=SECRET-TWO"),
            ("/?token=SECRET-THREE", ""),
        ):
            while True:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", path, headers={"Referer": referer} if referer else {})
                    statuses.append(connection.getresponse().status)
                    connection.close()
                    break
                except ConnectionRefusedError:
                    assert server.poll() is None and time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.1)
        assert statuses == [502, 502]
        while (tmp_path / "access.log").read_text().count("\n") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(10)
    access = (tmp_path / "access.log").read_text()
    lines = [json.loads(line) for line in access.splitlines()]
    assert [(entry["path"], entry["status"]) for entry in lines] == [("/ws", 502), ("/", 502)]
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))  # access, error, startup, stderr
    assert "SECRET" not in logs


# --- compose settings: .env -----------------------------------------------------

ENV_EXAMPLE = ROOT / ".env.example"


def compose_variables() -> dict[str, str]:
    """Each ``${VAR…}`` compose.yaml reads, with its operator (``:-`` default, ``:?`` required)."""
    return dict(re.findall(r"\$\{(\w+)(:[-?]|)", COMPOSE.read_text()))


def env_example() -> dict[str, str]:
    """Every variable .env.example names, set or commented out, with its value."""
    found = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    return {name: value.strip() for name, value in found}


def test_compose_requires_the_token_settings() -> None:
    """With tokens required, compose stops with a message unless the secret and the API keys are set."""
    variables = compose_variables()
    assert variables["CHAT_AUTH_SECRET"] == ":?" and variables["CHAT_API_KEYS"] == ":?"
    for name in ("CHAT_AUTH_SECRET", "CHAT_API_KEYS"):
        message = re.search(rf"\$\{{{name}:\?([^}}]*)\}}", COMPOSE.read_text())
        assert message and ".env" in message[1], f"{name}: the message says where to set it"


def test_env_example_names_every_variable_and_holds_no_secret() -> None:
    """.env.example lists every variable compose reads; required ones are left empty, nothing looks like a key."""
    example = env_example()
    assert set(compose_variables()) <= set(example)
    for name, operator in compose_variables().items():
        if operator == ":?":
            assert example[name] == "", f"{name} must be filled in by the operator"
    for name, value in example.items():
        assert not re.search(r"sk-\w{8,}|[A-Za-z0-9+/_=-]{20,}", value) or value.startswith("http"), (name, value)
    tracked = subprocess.run(["git", "ls-files", "--", ".env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout.strip() == "", ".env is never committed"


def test_readme_explains_compose_tokens() -> None:
    """README: the .env values, `docker compose up`, a token from /api/token with the key, the page with it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run it with Docker") :]
    section = section[: section.index("\n## ", 1)]
    for needed in (
        "CHAT_AUTH_SECRET",
        "CHAT_API_KEYS",
        ".env",
        "docker compose up",
        "/api/token",
        "X-API-Key",
        "?token=",
    ):
        assert needed in section, needed
    for name in compose_variables():
        assert name in readme or name in (ROOT / "docs/configuration.md").read_text(), name


def test_worker_reaches_the_host() -> None:
    """A model server on the host answers at host.docker.internal, on Linux too."""
    worker = resolved()["services"]["worker"]
    assert "host.docker.internal:host-gateway" in worker["extra_hosts"]
    assert "host.docker.internal" in (ROOT / "README.md").read_text()


def test_every_setting_in_env_reaches_the_services() -> None:
    """A documented setting put in .env (CHAT_OPENAI_API_KEY_HEADER, CHAT_UPSTREAM_RETRIES, …)
    reaches the services, not only the few that compose names."""
    services = resolved()["services"]
    for name in ("buffer", "worker", "gateway"):
        env_files = services[name]["env_file"]
        assert {"path": ".env", "required": False} in env_files, name
