"""``python -m bench`` (``make bench``): run the benchmark and write its report.

Starts its own NATS, Redis, token source, one gateway, worker and buffer
process, and the bare relay; drives each scenario from a separate load
process (bench/load.py); takes the median of ``--runs`` runs of every point;
writes docs/benchmarks.md, docs/benchmarks.json and PNG plots. ``--smoke``
runs every scenario once at a tiny scale, into ``--out``, in seconds.
"""

from __future__ import annotations

import argparse
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

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, LocalRedis, free_port, port_open

from . import report

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """The points each scenario runs; full scale or smoke."""

    runs: int
    window_s: float
    latency_streams: tuple[int, ...]
    latency_rate: float
    cpu_point: tuple[int, float]  # streams, tokens/s each
    capacity_streams: tuple[int, ...]
    capacity_rate: float
    controls: dict[str, Any]
    reconnect: dict[str, Any]
    idle: dict[str, Any]


FULL = Plan(
    runs=3,
    window_s=6.0,
    latency_streams=(1, 100, 1000),
    latency_rate=30,
    cpu_point=(50, 50),
    capacity_streams=(100, 150, 200, 250, 350, 500, 750, 1000, 1500),
    capacity_rate=20,
    controls={"controllers": 20, "cycles": 10, "hold_s": 0.1, "background_streams": 100, "background_s": 20, "rate": 30},
    reconnect={"tokens": 10_000, "rate": 2000},
    idle={"connections": 10_000, "hold_s": 21},  # the gateway pings every 20 s
)
SMOKE = Plan(
    runs=1,
    window_s=1.0,
    latency_streams=(1, 10),
    latency_rate=30,
    cpu_point=(5, 50),
    capacity_streams=(20,),
    capacity_rate=20,
    controls={"controllers": 1, "cycles": 3, "hold_s": 0.05, "background_streams": 5, "background_s": 4, "rate": 30},
    reconnect={"tokens": 300, "rate": 1000},
    idle={"connections": 50, "hold_s": 0.5},
)


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

    def start(self) -> None:
        nats, redis = LocalNats(), LocalRedis()
        for server in (nats, redis):
            server.start()
            self.stack.callback(server.stop)
        assert nats.process is not None and redis.process is not None
        upstream_port = free_port()
        upstream = self._spawn("upstream", [sys.executable, "-m", "bench.upstream", "--http", str(upstream_port), "--nats", nats.url], {})
        self._wait_port(upstream_port, upstream)
        env = {
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
        }
        processes: dict[str, ServiceProcess] = {}
        for module in ("services.buffer", "services.llm_worker", "services.gateway"):
            extra = {"CHAT_PORT": str(free_port())} if module == "services.gateway" else {}
            process = ServiceProcess(module, {**env, **extra})
            process.start()
            self.stack.callback(process.stop)
            processes[process.name] = process
        self.processes = processes
        relay_port = free_port()
        relay = self._spawn(
            "relay", [sys.executable, "-m", "bench.relay"], {"BENCH_NATS_URL": nats.url, "BENCH_RELAY_PORT": str(relay_port)}
        )
        self._wait_port(relay_port, relay)
        def pid(process: ServiceProcess) -> int:
            assert process.process is not None
            return process.process.pid

        self.ours = Target(
            "ours",
            int(processes["gateway"].env["CHAT_PORT"]),
            {
                "gateway": pid(processes["gateway"]),
                "worker": pid(processes["llm_worker"]),
                "buffer": pid(processes["buffer"]),
                "nats-server": nats.process.pid,
                "redis-server": redis.process.pid,
            },
        )
        self.relay = Target("relay", relay_port, {"relay": relay.pid, "nats-server": nats.process.pid})
        self.sources = {"upstream": upstream.pid}

    def fresh_gateway(self) -> None:
        gateway = self.processes["gateway"]
        self.save_logs()
        gateway.stop()
        gateway.start()
        assert gateway.process is not None
        self.ours.pids["gateway"] = gateway.process.pid

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
        spec = {"scenario": scenario, "host": "127.0.0.1", "port": target.port, "pids": target.pids, **spec}
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

    def stream_point(self, target: Target, streams: int, rate: float) -> dict[str, Any]:
        """Steady streaming at ``streams`` × ``rate``, median of the plan's runs."""
        stagger = 0.0 if streams == 1 else max(0.5, streams / 400)
        start = stagger + 1.0
        end = start + self.plan.window_s
        tokens = int((end + 0.5) * rate)
        runs = []
        for _ in range(self.plan.runs):
            runs.append(self.load(target, "stream", streams=streams, rate=rate, tokens=tokens, stagger_s=stagger, window_s=[start, end]))
        result = median_of(runs)
        cpu = result["cpu_s"]
        per_k = {name: seconds / max(1, result["window_tokens"]) * 1000 for name, seconds in cpu.items()}
        result["cpu_s_per_1k_tokens"] = {**per_k, "total": sum(per_k.values())}
        note(f"{target.name} {streams}×{rate:g}/s: {result['delivered_tokens_per_s']:.0f} tok/s, "
             f"p99 {result['latency']['p99_ms']:.1f} ms, {result['cpu_s_per_1k_tokens']['total']:.3f} CPU-s/1k, check {result['check']}")
        return result

    def run(self) -> dict[str, Any]:
        plan = self.plan
        results: dict[str, Any] = {}
        results["latency"] = [self.stream_point(self.ours, n, plan.latency_rate) for n in plan.latency_streams]
        results["cpu_point"] = {
            "ours": self.stream_point(self.ours, *plan.cpu_point),
            "relay": self.stream_point(self.relay, *plan.cpu_point),
        }
        capacity = []
        for streams in plan.capacity_streams:
            point = self.stream_point(self.ours, streams, plan.capacity_rate)
            capacity.append(point)
            if not keeps_up(point):
                break
        results["capacity"] = capacity
        # Saturation: the most tokens/s delivered intact at any point, whatever the latency.
        intact = [p for p in [*results["latency"], *capacity] if not any(p["check"].values())] or capacity
        saturation = max(intact, key=lambda p: p["delivered_tokens_per_s"])
        results["saturation"] = {
            "ours": saturation,
            "relay": self.stream_point(self.relay, saturation["streams"], saturation["rate"]),
        }
        results["controls"] = median_of([self.load(self.ours, "controls", **plan.controls) for _ in range(plan.runs)])
        note(f"controls: {results['controls']['pause_ms']} {results['controls']['resume_ms']}")
        results["reconnect"] = median_of([self.load(self.ours, "reconnect", **plan.reconnect) for _ in range(plan.runs)])
        note(f"reconnect: {results['reconnect']}")
        idle = []
        for _ in range(plan.runs):
            self.fresh_gateway()  # memory per connection is measured from a gateway's start
            idle.append(self.load(self.ours, "idle", **plan.idle))
        results["idle"] = median_of(idle)
        note(f"idle: {results['idle']}")
        return results


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
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where benchmarks.md, .json and plots go")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page and plots from the JSON in --out")
    args = parser.parse_args()
    if args.report_only:
        report.write(json.loads((args.out / "benchmarks.json").read_text()), args.out)
        return
    plan = SMOKE if args.smoke else FULL
    if args.runs:
        plan = Plan(**{**plan.__dict__, "runs": args.runs})
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with more_files(), ExitStack() as stack:
        bench = Bench(plan, stack, logs)
        stack.callback(bench.save_logs)
        bench.start()
        results = bench.run()
    note(f"service logs: {logs}")
    results["meta"] = {
        "smoke": args.smoke,
        "runs": plan.runs,
        "window_s": plan.window_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "make bench" if not args.smoke else "python -m bench --smoke",
        "machine": report.machine_facts(),
    }
    report.write(results, args.out)
    note(f"wrote {args.out / 'benchmarks.md'} in {results['meta']['duration_s']} s")


if __name__ == "__main__":
    main()
