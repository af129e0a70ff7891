"""``python -m bench`` (``make bench``): run the benchmark and write its report.

Starts its own NATS, Redis, token source, one gateway, worker and buffer
process, and the bare relay; drives each scenario from a separate load
process (bench/load.py); takes the median of ``--runs`` runs of every point;
writes docs/benchmarks.md, docs/benchmarks.json and PNG plots. ``--smoke``
runs every scenario once at a tiny scale, in seconds, into ``--out`` (by
default a new temporary directory, so it never rewrites the committed page).
``--only 50x50,ttft`` runs just those and prints their tables (for A/B work).

The issue's three points run three ways: the worker's frame cap at its
default (or as ``CHAT_FRAME_INTERVAL_MS`` in this environment says), the cap
off (the worker restarted with 0), and the bare relay. Last, the 50 × 50 point
runs again with the generated-frames stream in the other JetStream storage
(services restarted, stream recreated).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import NotFoundError

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, LocalRedis, free_port, port_open
from services.llm_worker.settings import frame_interval_s
from shared.subjects import STREAM_GENERATED

from . import report
from .load import per_thousand

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """The points each scenario runs; full scale or smoke."""

    runs: int
    window_s: float
    warmup_s: float  # after the last stream started, before the window opens
    min_stagger_s: float  # streams start evenly over at least this long
    points: dict[str, tuple[int, float]]  # the points: name -> (streams, tokens/s each)
    latency_streams: tuple[int, ...]
    latency_rate: float
    capacity_streams: tuple[int, ...]
    capacity_rate: float
    controls: dict[str, Any]
    reconnect: dict[str, Any]
    idle: dict[str, Any]
    pauses: dict[str, Any]
    ttft: dict[str, Any]
    redis: dict[str, Any]


POINTS = ("50x50", "200x20", "20x500")
FULL = Plan(
    runs=3,
    window_s=6.0,
    warmup_s=1.0,
    min_stagger_s=0.5,
    points={"50x50": (50, 50), "200x20": (200, 20), "20x500": (20, 500)},
    latency_streams=(1, 100, 1000),
    latency_rate=30,
    capacity_streams=(50, 100, 150, 250, 350, 500, 750, 1000, 1500, 2000),
    capacity_rate=20,
    controls={"controllers": 20, "cycles": 10, "hold_s": 0.1, "background_streams": 100, "background_s": 20, "rate": 30},
    reconnect={"tokens": 10_000, "rate": 2000},
    idle={"connections": 10_000, "hold_s": 21},  # the gateway pings every 20 s
    pauses={"streams": 10, "rate": 500, "tokens": 4000, "on_s": 1.0, "hold_s": 1.0},
    ttft={"chats": 20, "bursts": 20, "gap_s": 1.0, "tokens": 5, "rate": 1000},
    redis={"sessions": 3, "turns": 5, "tokens": 300, "rate": 50},  # a model's pace: the frame cap's batching depends on it
)
SMOKE = Plan(
    runs=1,
    window_s=0.5,
    warmup_s=0.3,
    min_stagger_s=0.2,
    points={"50x50": (5, 50), "200x20": (10, 20), "20x500": (2, 500)},
    latency_streams=(10,),
    latency_rate=30,
    capacity_streams=(20,),
    capacity_rate=20,
    controls={"controllers": 1, "cycles": 3, "hold_s": 0.05, "background_streams": 5, "background_s": 2.5, "rate": 30},
    reconnect={"tokens": 300, "rate": 1000},
    idle={"connections": 50, "hold_s": 0.5},
    pauses={"streams": 2, "rate": 500, "tokens": 400, "on_s": 0.2, "hold_s": 0.2},
    ttft={"chats": 3, "bursts": 3, "gap_s": 0.2, "tokens": 5, "rate": 1000},
    redis={"sessions": 1, "turns": 2, "tokens": 30, "rate": 1000},
)
# What --only accepts: a point's name, or one of these scenarios.
SCENARIOS = (*POINTS, "storage", "latency", "capacity", "controls", "reconnect", "redis", "ttft", "pauses", "idle")


@dataclass
class Target:
    """Where the load goes and whose CPU counts."""

    name: str
    port: int
    pids: dict[str, int]


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number across runs; checks are summed (any nonzero is a failure)."""
    merged = _median(results)
    merged["runs"] = len(results)
    return merged


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    first = results[0]
    merged: dict[str, Any] = {}
    for key, value in first.items():
        values = [r[key] for r in results]
        if key == "check":
            merged[key] = {k: sum(v[k] for v in values) for k in value}
        elif isinstance(value, dict):
            merged[key] = _median(values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(values)
        elif isinstance(value, list):
            merged[key] = [item for v in values for item in v][:10]  # errors: keep the first few
        else:
            merged[key] = value
    return merged


class Bench:
    def __init__(self, plan: Plan, stack: ExitStack, log_dir: Path) -> None:
        self.plan = plan
        self.stack = stack
        self.log_dir = log_dir
        self.processes: dict[str, ServiceProcess] = {}
        self.env: dict[str, str] = {}

    def start(self) -> None:
        nats, redis = LocalNats(), LocalRedis()
        for server in (nats, redis):
            server.start()
            self.stack.callback(server.stop)
        assert nats.process is not None and redis.process is not None
        self.nats_url, self.redis_url, self.nats_binary = nats.url, redis.url, nats.binary
        upstream_port = free_port()
        upstream = self._spawn("upstream", [sys.executable, "-m", "bench.upstream", "--http", str(upstream_port), "--nats", nats.url], {})
        self._wait_port(upstream_port, upstream)
        self.env = {
            "CHAT_NATS_URL": nats.url,
            "CHAT_REDIS_URL": redis.url,
            "CHAT_AUTH_MODE": "dev",
            "CHAT_AUTH_SECRET": secrets.token_urlsafe(32),
            "CHAT_MODEL_PROVIDER": "openai",
            "CHAT_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
            # Room for every stream the benchmark opens: these bound abuse, not capacity.
            "CHAT_WORKER_CONCURRENCY": "4000",
            "CHAT_UPSTREAM_MAX_CONNECTIONS": "4000",
            "CHAT_MAX_CONNECTIONS": "15000",
            "CHAT_MAX_CONNECTIONS_PER_USER": "15000",  # dev mode: every anonymous client is one user
            "CHAT_MAX_TURNS_PER_USER": "100000",
            "CHAT_PORT": str(free_port()),  # read by the gateway only
        }
        for module in ("services.buffer", "services.llm_worker", "services.gateway"):
            process = ServiceProcess(module, self.env)
            self.stack.callback(process.stop)
            self.processes[process.name] = process
            process.start()
        relay_port = free_port()
        relay = self._spawn(
            "relay", [sys.executable, "-m", "bench.relay"], {"BENCH_NATS_URL": nats.url, "BENCH_RELAY_PORT": str(relay_port)}
        )
        self._wait_port(relay_port, relay)
        self.ours = Target("ours", int(self.env["CHAT_PORT"]), {"nats-server": nats.process.pid, "redis-server": redis.process.pid})
        self._track_pids()
        self.relay = Target("relay", relay_port, {"relay": relay.pid, "nats-server": nats.process.pid})

    def _track_pids(self) -> None:
        for name, label in (("gateway", "gateway"), ("llm_worker", "worker"), ("buffer", "buffer")):
            process = self.processes[name].process
            assert process is not None
            self.ours.pids[label] = process.pid

    def restart(self, names: tuple[str, ...], overrides: dict[str, str], *, drop_generated: bool = False) -> None:
        """Restart these services with ``overrides`` on top of the base settings;
        ``drop_generated`` deletes the generated-frames stream first (its storage
        is fixed when a service creates it)."""
        self.save_logs()
        for name in names:
            self.processes[name].stop()
        if drop_generated:
            asyncio.run(_delete_stream(self.nats_url, STREAM_GENERATED))
        for name in ("buffer", "llm_worker", "gateway"):  # the order of the first start
            if name in names:
                process = self.processes[name]
                process.env = {**self.env, **overrides}
                process.start()
        self._track_pids()

    def fresh_gateway(self) -> None:
        self.restart(("gateway",), dict(self.processes["gateway"].env))

    def save_logs(self) -> None:
        for name, process in self.processes.items():
            with open(self.log_dir / f"{name}.log", "a") as log:
                log.write(process.output())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        def stop() -> None:
            process.terminate()
            process.wait(10)
            log.close()

        self.stack.callback(stop)
        return process

    @staticmethod
    def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):  # a server of ours with no ready line to wait on
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} did not start")
            time.sleep(0.05)

    def load(self, target: Target, scenario: str, **spec: Any) -> dict[str, Any]:
        spec = {"scenario": scenario, "host": "127.0.0.1", "port": target.port, "pids": target.pids,
                "redis_url": self.redis_url, **spec}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            json.dump(spec, file)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bench.load", file.name], capture_output=True, text=True, cwd=ROOT, timeout=900
            )
        finally:
            os.unlink(file.name)
        if done.returncode != 0:
            raise RuntimeError(f"load {scenario} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def repeat(self, target: Target, scenario: str, **spec: Any) -> dict[str, Any]:
        """The median of the plan's runs of one scenario."""
        return median_of([self.load(target, scenario, **spec) for _ in range(self.plan.runs)])

    def stream_point(self, target: Target, streams: int, rate: float) -> dict[str, Any]:
        """Steady streaming at ``streams`` × ``rate``, median of the plan's runs."""
        stagger = 0.0 if streams == 1 else max(self.plan.min_stagger_s, streams / 400)
        start = stagger + self.plan.warmup_s
        end = start + self.plan.window_s
        tokens = int((end + min(0.5, self.plan.warmup_s)) * rate)
        result = self.repeat(target, "stream", streams=streams, rate=rate, tokens=tokens, stagger_s=stagger, window_s=[start, end])
        result["cpu_s_per_1k_tokens"] = per_thousand(result["cpu_s"], result["window_tokens"])
        note(f"{target.name} {streams}×{rate:g}/s: {result['delivered_tokens_per_s']:.0f} tok/s, "
             f"p99 {result['latency']['p99_ms']:.1f} ms, {result['cpu_s_per_1k_tokens']['total']:.3f} CPU-s/1k, check {result['check']}")
        return result

    def run(self, only: frozenset[str] = frozenset(SCENARIOS)) -> dict[str, Any]:
        """Every scenario in ``only``; those under the default settings first, then
        the worker without its frame cap, then the generated stream in memory."""
        plan = self.plan
        cap_ms = frame_interval_s(os.environ) * 1000  # the worker's default, unless this run's environment sets it
        storage = os.environ.get("CHAT_JS_STORAGE", "file")
        results: dict[str, Any] = {"settings": {"frame_interval_ms": cap_ms, "js_storage": storage, "nats_server": self.nats_binary}}
        points = {name: plan.points[name] for name in POINTS if name in only}
        if points:
            results["points"] = {name: {"cap": self.stream_point(self.ours, *point), "relay": self.stream_point(self.relay, *point)}
                                 for name, point in points.items()}
        if "latency" in only:
            results["latency"] = [self.stream_point(self.ours, n, plan.latency_rate) for n in plan.latency_streams]
        if "capacity" in only:
            capacity = []
            for streams in plan.capacity_streams:
                step = self.stream_point(self.ours, streams, plan.capacity_rate)
                capacity.append(step)
                if not keeps_up(step):
                    break
            results["capacity"] = capacity
        if "controls" in only:
            results["controls"] = self.repeat(self.ours, "controls", **plan.controls)
            note(f"controls: {results['controls']['pause_ms']} {results['controls']['resume_ms']}")
        if "reconnect" in only:
            results["reconnect"] = self.repeat(self.ours, "reconnect", **plan.reconnect)
            note(f"reconnect: {results['reconnect']}")
        if "redis" in only:
            results["redis"] = self.load(self.ours, "redis_memory", **plan.redis)  # its sessions are the repeats
            note(f"redis: {results['redis']}")
        if "ttft" in only:
            results["ttft"] = self.repeat(self.ours, "ttft", **plan.ttft)
            note(f"ttft: {results['ttft']}")
        if "pauses" in only:
            results["pauses"] = {"ours": self.repeat(self.ours, "pauses", **plan.pauses),
                                 "relay": self.repeat(self.relay, "pauses", **plan.pauses)}
            note(f"pauses: {results['pauses']}")
        if "idle" in only:
            idle = []
            for _ in range(plan.runs):
                self.fresh_gateway()  # memory per connection is measured from a gateway's start
                idle.append(self.load(self.ours, "idle", **plan.idle))
            results["idle"] = median_of(idle)
            note(f"idle: {results['idle']}")
        if points:
            self.restart(("llm_worker",), {"CHAT_FRAME_INTERVAL_MS": "0"})
            for name, (streams, rate) in points.items():
                results["points"][name]["nocap"] = self.stream_point(self.ours, streams, rate)
            self.restart(("llm_worker",), {})
        if "storage" in only:
            other = "memory" if storage == "file" else "file"
            self.restart(("buffer", "llm_worker", "gateway"), {"CHAT_JS_STORAGE": other}, drop_generated=True)
            results["storage"] = {other: self.stream_point(self.ours, *plan.points["50x50"])}
            if "50x50" in results.get("points", {}):
                results["storage"][storage] = results["points"]["50x50"]["cap"]
            else:
                self.restart(("buffer", "llm_worker", "gateway"), {"CHAT_JS_STORAGE": storage}, drop_generated=True)
                results["storage"][storage] = self.stream_point(self.ours, *plan.points["50x50"])
        return results


async def _delete_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(name)
    except NotFoundError:
        pass
    finally:
        await nc.close()


def keeps_up(point: dict[str, Any]) -> bool:
    """Delivered what was offered, within 50 ms at p99, with nothing lost."""
    return (
        point["latency"]["p99_ms"] <= 50
        and point["delivered_tokens_per_s"] >= 0.95 * point["offered_tokens_per_s"]
        and not any(point["check"].values())
    )


def note(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def more_files() -> Iterator[None]:
    """10,000 connections need 10,000 descriptors in the gateway (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every scenario once, tiny, in seconds")
    parser.add_argument("--runs", type=int, help="runs per point (median); default 3, smoke 1")
    parser.add_argument("--out", type=Path, help="where benchmarks.md, .json and plots go; default docs/, "
                        "or a new temporary directory for --smoke (the committed page is left alone)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page and plots from the JSON in --out")
    parser.add_argument("--only", help=f"comma-separated, from {', '.join(SCENARIOS)}: run just these and print "
                        "their tables to stdout (the JSON goes to a temporary file; --out is left alone)")
    args = parser.parse_args()
    only = frozenset(args.only.split(",")) if args.only else frozenset(SCENARIOS)
    if unknown := only - set(SCENARIOS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else ROOT / "docs"
    if not args.only and importlib.util.find_spec("matplotlib") is None:
        parser.error("the report's plots need matplotlib: pip install -e '.[bench]' (make bench does), "
                     "or use --only to print the tables alone")
    if args.report_only:
        report.write(json.loads((args.out / "benchmarks.json").read_text()), args.out)
        return
    plan = SMOKE if args.smoke else FULL
    if args.runs:
        plan = Plan(**{**plan.__dict__, "runs": args.runs})
    started = time.time()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with more_files(), ExitStack() as stack:
        bench = Bench(plan, stack, logs)
        stack.callback(bench.save_logs)
        bench.start()
        results = bench.run(only)
        nats_binary = bench.nats_binary
    note(f"service logs: {logs}")
    results["meta"] = {
        "smoke": args.smoke,
        "runs": plan.runs,
        "window_s": plan.window_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m bench --smoke" if args.smoke else "make bench" if not args.only else f"python -m bench --only {args.only}",
        "machine": report.machine_facts(nats_binary),
    }
    if args.only:
        path = Path(tempfile.mkdtemp(prefix="bench-only-")) / "benchmarks.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(report.markdown(results, full=False))
        note(f"figures in {path}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report.write(results, args.out)
    note(f"wrote {args.out / 'benchmarks.md'} in {results['meta']['duration_s']} s")


if __name__ == "__main__":
    main()
