"""Start-up and shutdown of the service processes: brokers that are away,
misconfigured or refusing, a port already taken, and signals in every state.

Every service waits for NATS and Redis serving /healthz (200) and /readyz (503,
saying what it waits for), logs which URL it cannot reach and why at a sane
rate and without passwords, stops at once on SIGTERM/SIGINT, and goes on when
the brokers come up. What waiting cannot fix is one line and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, LocalRedis, Server, free_port, nats_server_binary, wait_for_line
from tests.fake_openai import FakeOpenAI, serve_in_thread
from tests.stack import FAST_DEMO, WAIT_S, Clients, Stack, isolated_stack, new_session, openai_env

MODULES = {"gateway": "services.gateway", "worker": "services.llm_worker", "buffer": "services.buffer"}
NAMES = {"gateway": "gateway", "worker": "llm_worker", "buffer": "buffer"}
STOP_WITHIN_S = 5.0 * max(1.0, WAIT_S / 10.0)
PASSWORD = "s3cretPassw0rd"


@dataclass
class Started:
    process: ServiceProcess
    port: int  # the gateway's port, or the worker's/buffer's health port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def own_nats() -> Iterator[LocalNats]:
    """This module's own NATS: the services started here, some with other Redis
    databases, must never take the session stack's turn requests or frames."""
    nats = LocalNats()
    nats.start()
    yield nats
    nats.stop()


class Services:
    """Service processes started without waiting for them to be ready; all killed at the end."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def start(self, kind: str, env: Mapping[str, str]) -> Started:
        port = free_port()
        own = {"CHAT_PORT": str(port)} if kind == "gateway" else {"CHAT_HEALTH_PORT": str(port)}
        base = {
            "CHAT_LOG_LEVEL": "INFO",
            "CHAT_AUTH_MODE": "dev",
            "CHAT_AUTH_SECRET": secrets.token_urlsafe(32),
            **FAST_DEMO,
        }
        process = ServiceProcess(MODULES[kind], {**base, **own, **env}, name=kind)
        process.start(wait=False)
        self.started.append(process)
        return Started(process, port)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in self.started)

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def services() -> Iterator[Services]:
    running = Services()
    try:
        yield running
    finally:
        running.kill_all()


async def wait_status(url: str, path: str, status: int, *, timeout_s: float = WAIT_S) -> httpx.Response:
    """GET ``url + path`` until it answers ``status``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as http:
        while True:
            try:
                response = await http.get(path)
                if response.status_code == status:
                    return response
                last = (response.status_code, response.text)
            except httpx.TransportError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}{path} did not answer {status} within {timeout_s} s; last: {last!r}")
            await asyncio.sleep(0.1)


def events(process: ServiceProcess, name: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == name]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


def stop_and_check(process: ServiceProcess, sig: int = signal.SIGTERM) -> int:
    """Send ``sig``; the process must end within STOP_WITHIN_S, without a traceback."""
    sent = time.monotonic()
    process.signal(sig)
    code = process.wait_exit(STOP_WITHIN_S)
    assert time.monotonic() - sent < STOP_WITHIN_S
    assert "Traceback" not in process.output(), process.output()
    return code


# -- waiting for brokers that are away ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", ["gateway", "worker", "buffer"])
async def test_waits_for_brokers_serving_health_and_stops_on_signal(services: Services, kind: str, sig: int) -> None:
    """NATS and Redis down: liveness 200, readiness 503 naming both URLs (no
    password) and why, the same in the log; a signal stops it at once."""
    nats_port, redis_port = closed_port(), closed_port()
    nats_url = f"nats://chat:{PASSWORD}@127.0.0.1:{nats_port}"
    redis_url = f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0"
    started = services.start(kind, {"CHAT_NATS_URL": nats_url, "CHAT_REDIS_URL": redis_url})
    process = started.process

    assert (await wait_status(started.url, "/healthz", 200)).json() == {"status": "ok"}
    process.wait_for_line('"event": "redis_waiting"', timeout_s=WAIT_S)
    process.wait_for_line('"event": "nats_waiting"', timeout_s=WAIT_S)
    ready = (await wait_status(started.url, "/readyz", 503)).json()
    assert ready["ready"] is False and ready["nats"] is False and ready["redis"] is False
    waiting = " | ".join(ready["waiting"])
    assert f"nats://chat:***@127.0.0.1:{nats_port}" in waiting and f"redis://:***@127.0.0.1:{redis_port}/0" in waiting
    assert "connection refused" in waiting.lower()

    (nats_line,) = events(process, "nats_waiting")[:1]
    assert nats_line["nats"] == f"nats://chat:***@127.0.0.1:{nats_port}" and nats_line["cause"] == "connection refused"
    assert f"127.0.0.1:{nats_port}" in nats_line["msg"]
    redis_line = events(process, "redis_waiting")[0]
    assert redis_line["redis"] == f"redis://:***@127.0.0.1:{redis_port}/0"
    assert "connection refused" in redis_line["cause"].lower()
    assert PASSWORD not in process.output()
    if kind == "gateway":  # anything else than health waits for the brokers too
        async with httpx.AsyncClient(base_url=started.url) as http:
            response = await http.get(f"/api/sessions/{new_session()}/history")
            page = await http.get("/")  # the page loads, and shows that it is connecting
        assert response.status_code == 503 and "starting" in response.json()["message"]
        assert response.json()["code"] == "unavailable" and response.headers["retry-after"] == "2"
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        with pytest.raises(InvalidStatus) as refused:  # an upgrade too, in the same JSON shape
            await connect(started.url.replace("http", "ws") + "/ws", open_timeout=WAIT_S)
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body or b"{}")["code"] == "unavailable"

    assert stop_and_check(process, sig) == 0


async def test_an_absent_broker_is_logged_at_a_sane_rate(services: Services) -> None:
    """The first failure is said at once, then at most every few seconds (not every retry)."""
    nats_port = closed_port()
    started = services.start("gateway", {"CHAT_NATS_URL": f"nats://127.0.0.1:{nats_port}"})
    process = started.process
    process.wait_for_line('"event": "nats_waiting"')
    first = events(process, "nats_waiting")[0]
    deadline = time.monotonic() + 15 * max(1.0, WAIT_S / 10.0)
    while len(events(process, "nats_waiting")) < 2:
        assert time.monotonic() < deadline, process.output()
        await asyncio.to_thread(process.wait_for_line, '"event": "nats_waiting"', timeout_s=1.0)
        await asyncio.sleep(0.2)
    second = events(process, "nats_waiting")[1]
    assert second["ts"] - first["ts"] >= 4.0, (first, second)
    assert "still waiting after" in second["msg"]
    assert "nats error" not in process.output()  # the client's own per-retry line is quiet while starting
    assert stop_and_check(process) == 0


async def test_an_unresolvable_host_is_awaited_and_named(services: Services) -> None:
    started = services.start(
        "worker", {"CHAT_NATS_URL": "nats://no-such-host.invalid:4222", "CHAT_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    )
    process = started.process
    process.wait_for_line('"event": "nats_waiting"')
    ready = (await wait_status(started.url, "/readyz", 503)).json()
    assert any("no-such-host.invalid:4222" in line for line in ready["waiting"]), ready
    assert stop_and_check(process) == 0


async def test_services_go_on_when_the_brokers_come_up(redis_server: Server, services: Services) -> None:
    """All three started with NATS and Redis down; NATS comes up (readiness now
    waits for Redis alone), then Redis; then a turn works end to end."""
    nats = LocalNats()
    redis = LocalRedis()
    stack = Stack(nats_url=nats.url, redis_url=redis.url)
    try:
        env = {**stack.env}
        buffer = services.start("buffer", env)
        worker = services.start("worker", env)
        gateway = services.start("gateway", env)
        everyone = (buffer, worker, gateway)
        for one in everyone:
            one.process.wait_for_line('"event": "nats_waiting"')
            one.process.wait_for_line('"event": "redis_waiting"')
        await wait_status(gateway.url, "/healthz", 200)

        nats.start()
        for one in everyone:
            one.process.wait_for_line('"event": "nats_up"')
            ready = (await wait_status(one.url, "/readyz", 503)).json()
            assert ready["nats"] is True and ready["redis"] is False, ready
            assert ready["waiting"] == [f"cannot reach redis at {stack.env['CHAT_REDIS_URL']}: connection refused"]

        redis.start()
        for one in everyone:
            one.process.wait_for_line('"event": "ready"')
            assert (await wait_status(one.url, "/readyz", 200)).json() == {"ready": True, "nats": True, "redis": True}

        stack.port = gateway.port
        async with Clients(stack) as clients:
            client, _ = await clients.open(new_session())
            _, text, done = await client.turn("hello after the outage")
            assert done["reason"] in ("stop", "length") and text
        for one in everyone:
            assert stop_and_check(one.process) == 0
    finally:
        services.kill_all()
        Stack.databases_in_use.discard(stack.database)
        nats.stop()
        redis.stop()


async def test_services_stop_promptly_after_losing_nats(redis_server: Server) -> None:
    """Running, then NATS goes away: SIGTERM still stops every service in seconds."""
    nats = LocalNats()
    nats.start()
    try:
        with isolated_stack(redis_server.url, nats=nats) as stack:
            nats.stop()
            for process in stack.processes:
                process.wait_for_line("nats disconnected")
            for process in stack.processes:
                stop_and_check(process)
    finally:
        nats.stop()


# -- what waiting cannot fix: one line, non-zero exit --------------------------------------------


@pytest.fixture(scope="module")
def nats_without_jetstream() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for_line(server, b"Server is ready", what="nats-server without -js")
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def failed_with(process: ServiceProcess, kind: str) -> str:
    """The process's exit: non-zero, no traceback; its last line (which names the service)."""
    code = process.wait_exit(WAIT_S * 2)
    output = process.output()
    assert code != 0, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"{NAMES[kind]}: "), output
    return last


@pytest.mark.parametrize("kind", ["gateway", "worker", "buffer"])
def test_nats_without_jetstream_is_one_clear_line(
    services: Services, nats_without_jetstream: str, redis_server: Server, kind: str
) -> None:
    started = services.start(kind, {"CHAT_NATS_URL": nats_without_jetstream, "CHAT_REDIS_URL": redis_server.url})
    last = failed_with(started.process, kind)
    assert last == (
        f"{NAMES[kind]}: JetStream is not enabled on nats at {nats_without_jetstream}: "
        "start nats-server with -js (or enable jetstream in its config)"
    )
    assert "description=" not in started.process.output()


def test_a_storage_unlike_the_streams_is_one_clear_line(services: Services, redis_server: Server) -> None:
    """The generated stream exists in file storage; a buffer set to memory says which setting differs."""
    nats = LocalNats()
    nats.start()
    try:
        env = {"CHAT_NATS_URL": nats.url, "CHAT_REDIS_URL": redis_server.url}
        first = services.start("buffer", env)  # creates the streams, file storage
        asyncio.run(wait_status(first.url, "/readyz", 200))
        last = failed_with(services.start("buffer", {**env, "CHAT_JS_STORAGE": "memory"}).process, "buffer")
        assert "CHAT_JS_STORAGE=memory differs from the existing CHAT_GENERATED stream's storage" in last, last
    finally:
        nats.stop()


@pytest.mark.parametrize(
    ("kind", "setting", "advice"),
    [("gateway", "CHAT_PORT", "CHAT_PORT (and CHAT_HOST)"), ("buffer", "CHAT_HEALTH_PORT", "CHAT_HEALTH_PORT (and CHAT_HEALTH_HOST)")],
)
def test_port_in_use_is_one_clear_line(
    services: Services, own_nats: LocalNats, redis_server: Server, kind: str, setting: str, advice: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {setting: str(port), "CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": redis_server.url,
               "CHAT_AUTH_MODE": "dev", "CHAT_AUTH_SECRET": secrets.token_urlsafe(32)}
        process = ServiceProcess(MODULES[kind], env)
        process.start(wait=False)
        services.started.append(process)
        last = failed_with(process, NAMES[kind])
    assert last == f"{NAMES[kind]}: cannot listen on 127.0.0.1:{port}: address in use; set {advice}"


@dataclass
class PasswordRedis(LocalRedis):
    def arguments(self) -> list[str]:
        return [*super().arguments(), "--requirepass", PASSWORD]


@dataclass
class PasswordNats(LocalNats):
    def arguments(self) -> list[str]:
        return [*super().arguments(), "--user", "chat", "--pass", PASSWORD]


@pytest.fixture(scope="module")
def password_redis() -> Iterator[LocalRedis]:
    server = PasswordRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def password_nats() -> Iterator[LocalNats]:
    server = PasswordNats()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("kind", ["gateway", "worker"])
def test_a_wrong_redis_password_is_one_clear_line(
    services: Services, own_nats: LocalNats, password_redis: LocalRedis, kind: str
) -> None:
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{password_redis.port}/0"
    started = services.start(kind, {"CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": url})
    last = failed_with(started.process, kind)
    assert re.fullmatch(
        rf"{NAMES[kind]}: redis at redis://:\*\*\*@127\.0\.0\.1:{password_redis.port}/0 refused the password "
        r"\(.+\): check CHAT_REDIS_URL",
        last,
    ), last
    assert PASSWORD not in started.process.output()


def test_a_missing_redis_password_is_one_clear_line(
    services: Services, own_nats: LocalNats, password_redis: LocalRedis
) -> None:
    started = services.start("buffer", {"CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": password_redis.url})
    last = failed_with(started.process, "buffer")
    assert last.startswith(f"buffer: redis at {password_redis.url} refused the password"), last


def test_a_wrong_nats_password_is_one_clear_line(
    services: Services, password_nats: LocalNats, redis_server: Server
) -> None:
    url = f"nats://chat:wrong-{PASSWORD}@127.0.0.1:{password_nats.port}"
    started = services.start("gateway", {"CHAT_NATS_URL": url, "CHAT_REDIS_URL": redis_server.url})
    last = failed_with(started.process, "gateway")
    assert last == (
        f"gateway: nats at nats://chat:***@127.0.0.1:{password_nats.port} refused the connection "
        "(Authorization Violation): check the user and password (or token) in CHAT_NATS_URL"
    )
    assert PASSWORD not in started.process.output()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CHAT_NATS_URL", f"http://chat:{PASSWORD}@127.0.0.1:4222"), ("CHAT_REDIS_URL", "127.0.0.1:6379")],
)
@pytest.mark.parametrize("kind", ["gateway", "worker"])
def test_a_bad_url_scheme_is_one_clear_line(services: Services, kind: str, variable: str, value: str) -> None:
    started = services.start(kind, {variable: value})
    last = failed_with(started.process, kind)
    assert last.startswith(f"{NAMES[kind]}: Config '{variable}' has value"), last
    assert PASSWORD not in started.process.output()


# -- a worker whose model server is away ----------------------------------------------------------


async def test_a_failed_turn_logs_the_upstream_url_status_and_cause(redis_server: Server) -> None:
    """Model server unreachable: the failure's log line names the URL (no key) and the cause;
    a model server answering an error status: the line names the status too."""
    key = "sk-test-not-a-secret"
    closed = f"http://127.0.0.1:{closed_port()}/v1"
    with isolated_stack(redis_server.url, openai_env(closed, CHAT_UPSTREAM_RETRIES="0")) as stack:
        async with Clients(stack) as clients:
            client, _ = await clients.open(new_session())
            _, _, done = await client.turn("is anyone there?")
        assert done["reason"] == "error"
        worker = next(p for p in stack.processes if p.module == "services.llm_worker")
        worker.wait_for_line('"event": "turn_finished"')
        (failed,) = events(worker, "upstream_failed")
        assert failed["upstream"] == closed and closed in failed["msg"]
        assert "connection refused" in failed["cause"].lower(), failed
        (finished,) = events(worker, "turn_finished")
        assert finished["reason"] == "error" and finished["upstream"] == closed, finished
        assert "connection refused" in finished["cause"].lower(), finished
        assert key not in worker.output()

    fake = FakeOpenAI()
    with serve_in_thread(fake.app) as url, isolated_stack(redis_server.url, openai_env(url)) as stack:
        async with Clients(stack) as clients:
            client, _ = await clients.open(new_session())
            _, _, done = await client.turn("[500]")
        assert done["reason"] == "error"
        worker = next(p for p in stack.processes if p.module == "services.llm_worker")
        worker.wait_for_line('"event": "turn_finished"')
        (failed,) = events(worker, "upstream_failed")
        assert failed["upstream"] == url and failed["status"] == 500, failed
        (finished,) = events(worker, "turn_finished")
        assert finished["status"] == 500 and finished["upstream"] == url, finished
        assert key not in worker.output()


# -- make run --------------------------------------------------------------------------------------


def test_make_run_says_which_brokers_it_reuses_and_starts(tmp_path: Path) -> None:
    from devstack.__main__ import _infra

    running = LocalNats()
    running.start()
    lines: list[str] = []
    started: list[Server] = []
    try:
        redis_port = free_port()
        started = _infra({}, nats_port=running.port, redis_port=redis_port, run_dir=tmp_path, say=lines.append)
        assert any(
            line.startswith(f"reusing the NATS already running at nats://127.0.0.1:{running.port}") for line in lines
        ), lines
        assert any(
            line.startswith(f"starting redis-server at redis://127.0.0.1:{redis_port}/0") for line in lines
        ), lines
        assert len(started) == 1

        lines.clear()
        env = {"CHAT_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0"}
        assert _infra(env, nats_port=running.port, redis_port=redis_port, run_dir=tmp_path, say=lines.append) == []
        assert any(line.startswith(f"using Redis at redis://:***@127.0.0.1:{redis_port}/0") for line in lines), lines
        assert "CHAT_REDIS_URL" in " ".join(lines)
        assert PASSWORD not in " ".join(lines)
    finally:
        for server in started:
            server.stop()
        running.stop()


@pytest.mark.parametrize("moment", ["starting", "running"])
def test_make_run_stops_on_signals_even_two_at_once(own_nats: LocalNats, redis_server: Server, moment: str) -> None:
    """make forwards its SIGTERM to the run it started, so the run gets two at once; a user
    presses Ctrl-C twice. Either way, while its services start or once they run, it stops
    them all and exits (a signal handler that set an Event could deadlock on the second)."""
    port = free_port()
    env = {
        **os.environ, "CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": redis_server.url,
        "CHAT_PORT": str(port), "CHAT_WORKERS": "1", **FAST_DEMO,
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "devstack"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        marker = b"using NATS" if moment == "starting" else b"chat page:"
        wait_for_line(run, marker, what="make run")
        for _ in range(3):
            run.send_signal(signal.SIGTERM)
            run.send_signal(signal.SIGINT)
        assert run.wait(STOP_WITHIN_S * 3) == 0
        # No service left running, not even one started just as the signals came.
        assert _processes_with(f"CHAT_PORT={port}") == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)


def _processes_with(setting: str) -> list[int]:
    """Pids of live processes whose environment holds ``setting`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and setting.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_make_run_gives_each_process_its_own_health_port(own_nats: LocalNats, redis_server: Server) -> None:
    """CHAT_HEALTH_PORT under make run: the buffer on it, each worker on the next one up."""
    first = next(port for port in iter(free_port, None) if _bindable(port + 1))
    env = {
        **os.environ, "CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": redis_server.url,
        "CHAT_PORT": str(free_port()), "CHAT_WORKERS": "1", "CHAT_HEALTH_PORT": str(first), **FAST_DEMO,
    }
    run = subprocess.Popen([sys.executable, "-m", "devstack"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = wait_for_line(run, b"chat page:", what="make run")
        said = b"".join(seen).decode()
        assert f"buffer http://127.0.0.1:{first}/" in said and f"worker1 http://127.0.0.1:{first + 1}/" in said
        for port, name in ((first, "buffer"), (first + 1, "llm_worker")):
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=WAIT_S)
            assert ready.status_code == 200, (name, ready.text)
            assert f"chat_{name.split('_')[-1]}" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S).text
        run.send_signal(signal.SIGTERM)
        assert run.wait(STOP_WITHIN_S * 3) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_readiness_answers_at_once_while_redis_hangs(services: Services, own_nats: LocalNats) -> None:
    """A Redis that hangs (stopped, not gone) makes /readyz say not ready within its own
    timeout, instead of hanging the probe for the client's 20 s."""
    redis = LocalRedis()
    redis.start()
    try:
        started = services.start("buffer", {"CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": redis.url})
        await wait_status(started.url, "/readyz", 200)
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            async with httpx.AsyncClient(base_url=started.url, timeout=WAIT_S) as http:
                ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await wait_status(started.url, "/readyz", 200)
    finally:
        redis.stop()


def test_make_run_says_at_once_that_its_port_is_taken(own_nats: LocalNats, redis_server: Server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "CHAT_NATS_URL": own_nats.url, "CHAT_REDIS_URL": redis_server.url, "CHAT_PORT": str(port)}
        run = subprocess.run([sys.executable, "-m", "devstack"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"make run: 127.0.0.1:{port} is already in use (another make run?); set CHAT_PORT to another port"
    )
    assert "services.buffer" not in run.stdout and "worker" not in run.stdout  # nothing was started first
