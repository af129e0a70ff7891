"""Turns the benchmark's figures into docs/benchmarks.md, two PNG plots and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

ANALYSIS = Path(__file__).with_name("analysis.md")
PROCESSES = ("gateway", "worker", "buffer", "relay", "nats-server", "redis-server")


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        mem_kib = int(info.readline().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats-server": _first_line(["nats-server", "--version"]),
        "redis-server": _first_line(["redis-server", "--version"]),
        "packages": {name: version(name) for name in ("uvicorn", "starlette", "websockets", "nats-py", "redis", "uvloop", "msgspec", "httpx")},
        "load_generator": "bench/load.py, one process on the same machine",
    }


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, goal, measured, met) for each of the benchmark's targets."""
    rows: list[tuple[str, str, str, bool]] = []
    cpu_point, saturation = results["cpu_point"], results["saturation"]
    c50 = cpu_point["ours"]["cpu_s_per_1k_tokens"]["total"]
    rows.append(("CPU per 1,000 tokens, 50 streams × 50 tokens/s", "≤ 0.10 s", f"{c50:.3f} s", c50 <= 0.10))
    csat = saturation["ours"]["cpu_s_per_1k_tokens"]["total"]
    rate = saturation["ours"]["delivered_tokens_per_s"]
    rows.append((f"CPU per 1,000 tokens at saturation ({rate:,.0f} tokens/s)", "≤ 0.06 s", f"{csat:.3f} s", csat <= 0.06))
    checks = [p["check"] for p in results["latency"] + results["capacity"]] + [cpu_point["ours"]["check"], results["controls"]["check"], results["reconnect"]["check"]]
    bad = {k: v for c in checks for k, v in c.items() if v}
    rows.append(("Loss, duplication, reordering (every point)", "0", "0" if not bad else json.dumps(bad), not bad))
    at500 = [p for p in results["capacity"] if p["streams"] == 500]
    if at500:
        p99 = at500[0]["latency"]["p99_ms"]
        rows.append(("p99 added latency, 500 streams × 20 tokens/s", "≤ 10 ms", f"{p99:.1f} ms", p99 <= 10 and _keeps(at500[0])))
    else:
        last = results["capacity"][-1]
        rows.append((
            "p99 added latency, 500 streams × 20 tokens/s", "≤ 10 ms",
            f"not reached: p99 {last['latency']['p99_ms']:.0f} ms at {last['streams']:,} streams", False,
        ))
    capacity = max((p["delivered_tokens_per_s"] for p in results["capacity"] if _keeps(p)), default=0.0)
    rows.append(("Capacity with p99 ≤ 50 ms", "≥ 15,000 tokens/s", f"{capacity:,.0f} tokens/s", capacity >= 15_000))
    for label, pair in (("50 × 50", cpu_point), ("saturation", saturation)):
        ratio = pair["ours"]["cpu_s_per_1k_tokens"]["total"] / max(1e-9, pair["relay"]["cpu_s_per_1k_tokens"]["total"])
        rows.append((f"CPU per token vs the bare relay, {label}", "≤ 3×", f"{ratio:.1f}×", ratio <= 3))
    resume = results["controls"]["resume_ms"]["p99_ms"]
    rows.append(("Resume to first chunk, p99", "≤ 5 ms", f"{resume:.1f} ms", resume <= 5))
    catch = results["reconnect"]["catch_up_ms"]
    missed = results["reconnect"]["missed_tokens"]
    rows.append((f"Catch-up of {missed:,.0f} missed tokens", "≤ 250 ms", f"{catch:.0f} ms", catch <= 250))
    idle = results["idle"]
    rows.append((f"Idle connections on one gateway ({idle['connections']:,.0f})", "10,000 at ≤ 20 KB each",
                 f"{idle['kib_per_connection']:.1f} KiB each", idle["connections"] >= 10_000 and idle["kib_per_connection"] * 1.024 <= 20))
    return rows


def _keeps(point: dict[str, Any]) -> bool:
    from .__main__ import keeps_up

    return keeps_up(point)


def _ms(latency: dict[str, float]) -> str:
    return f"{latency['p50_ms']:.1f} / {latency['p99_ms']:.1f} / {latency['p999_ms']:.1f}"


def _stream_rows(points: list[dict[str, Any]]) -> list[str]:
    rows = []
    for p in points:
        cpu = p["cpu_s_per_1k_tokens"]
        rows.append(
            f"| {p['streams']:,} × {p['rate']:g} | {p['offered_tokens_per_s']:,.0f} | {p['delivered_tokens_per_s']:,.0f} | "
            f"{_ms(p['latency'])} | {cpu['total']:.3f} | {'yes' if not any(p['check'].values()) else p['check']} |"
        )
    return rows


def _cpu_rows(pairs: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for label, point in pairs.items():
        cpu = point["cpu_s_per_1k_tokens"]
        cells = " | ".join(f"{cpu[name]:.3f}" if name in cpu else "–" for name in PROCESSES)
        rows.append(f"| {label} | {cells} | {cpu['total']:.3f} |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`); the figures below are from the run of "
        f"{meta['started']} ({meta['duration_s']:.0f} s). Every figure is the median of {meta['runs']} runs; "
        "raw figures are in [benchmarks.json](benchmarks.json). How it measures is at the end.",
        "",
        "## Targets",
        "",
        "| Target | Goal | Measured | Met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {goal} | {got} | {'yes' if ok else '**no**'} |" for t, goal, got, ok in targets(results)]
    lines += [
        "",
        "## Added latency per token",
        "",
        "From the source stamping a token to the client reading it, through the worker's HTTP client, "
        f"JetStream, the buffer, Redis, core NATS and the gateway. Measured over a {meta['window_s']:g} s window of steady streaming.",
        "",
        "| Streams × tokens/s | Offered tokens/s | Delivered tokens/s | p50 / p99 / p99.9 ms | CPU-s per 1k tokens | Intact |",
        "|---|---|---|---|---|---|",
        *_stream_rows(results["latency"]),
        "",
        "![Latency against concurrency](images/bench-latency.png)",
        "",
        "## Capacity",
        "",
        "Streams of 20 tokens/s added until p99 passes 50 ms or delivery falls behind the offer. "
        "Saturation, below, is the most tokens/s delivered intact at any point of the run, whatever its latency.",
        "",
        "| Streams × tokens/s | Offered tokens/s | Delivered tokens/s | p50 / p99 / p99.9 ms | CPU-s per 1k tokens | Intact |",
        "|---|---|---|---|---|---|",
        *_stream_rows(results["capacity"]),
        "",
        "## CPU per 1,000 delivered tokens, by process",
        "",
        "CPU-seconds (user + system, from /proc) spent by each process during the window, per 1,000 tokens the "
        "clients received in it. The bare relay is one NATS hop into one WebSocket (bench/relay.py), run at the same "
        "load in the same run; the load generator and token source are not counted for either.",
        "",
        "| Load | " + " | ".join(PROCESSES) + " | Total |",
        "|---|" + "---|" * (len(PROCESSES) + 1),
        *_cpu_rows({
            f"ours, {results['cpu_point']['ours']['streams']} × {results['cpu_point']['ours']['rate']:g}": results["cpu_point"]["ours"],
            f"bare relay, {results['cpu_point']['relay']['streams']} × {results['cpu_point']['relay']['rate']:g}": results["cpu_point"]["relay"],
            f"ours, saturation {results['saturation']['ours']['streams']} × {results['saturation']['ours']['rate']:g}": results["saturation"]["ours"],
            f"bare relay, {results['saturation']['relay']['streams']} × {results['saturation']['relay']['rate']:g}": results["saturation"]["relay"],
        }),
        "",
        "![CPU per token by process](images/bench-cpu.png)",
        "",
        "## Pause, resume, reconnect",
        "",
    ]
    controls, reconnect, idle = results["controls"], results["reconnect"], results["idle"]
    lines += [
        f"{controls['cycles']:.0f} pause/resume cycles per run on streaming sessions, beside {controls['background_streams']:.0f} "
        "background streams of 30 tokens/s.",
        "",
        "| Control | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| pause → `paused` | {controls['pause_ms']['p50_ms']:.1f} | {controls['pause_ms']['p99_ms']:.1f} |",
        f"| resume → first chunk | {controls['resume_ms']['p50_ms']:.1f} | {controls['resume_ms']['p99_ms']:.1f} |",
        "",
        f"Chunks delivered while paused: {controls['chunks_while_paused']:.0f}.",
        "",
        f"Reconnect: a client leaves as its turn starts and comes back with `last_seq` after the whole answer "
        f"({reconnect['missed_tokens']:,.0f} tokens in {reconnect['missed_frames']:,.0f} frames) is stored: "
        f"**{reconnect['catch_up_ms']:.0f} ms** from opening the socket to reading the `done`.",
        "",
        "## Idle connections",
        "",
        f"{idle['connections']:,.0f} idle WebSockets on one gateway process (opened in {idle['open_s']:.1f} s, "
        f"{idle['failed']:.0f} refused, {idle['alive_after_hold']:,.0f} alive after {idle['hold_s']:g} s): "
        f"resident memory {idle['rss_before_mib']:.0f} → {idle['rss_after_mib']:.0f} MiB, "
        f"**{idle['kib_per_connection']:.1f} KiB per connection**; heartbeat CPU "
        f"{idle['gateway_cpu_s_per_s'] * 1000:.1f} ms per second for all of them.",
        "",
        "## The machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores; {machine['memory_gib']} GiB; Linux {machine['kernel']}",
        f"- Python {machine['python']}; {machine['nats-server']}; {machine['redis-server']}",
        "- " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()),
        f"- Load: {machine['load_generator']}; everything shares the same cores.",
        "",
        "## How to rerun",
        "",
        "```",
        "make bench                      # the full run, about 10 minutes; rewrites this page",
        ".venv/bin/python -m bench --smoke --out /tmp/bench   # every scenario once, tiny (make test runs this)",
        "```",
        "",
    ]
    if ANALYSIS.exists():
        lines += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], images: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, points, title, x_key in (
        (left, results["latency"], "Streams of 30 tokens/s", "streams"),
        (right, results["capacity"], "Streams of 20 tokens/s (capacity)", "delivered_tokens_per_s"),
    ):
        xs = [p[x_key] for p in points]
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            ax.plot(xs, [p["latency"][key] for p in points], marker="o", label=label)
        ax.set_title(title)
        ax.set_ylabel("added latency per token (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    left.set_xscale("log")
    left.set_xlabel("concurrent streams")
    right.set_xlabel("delivered tokens/s")
    fig.tight_layout()
    fig.savefig(images / "bench-latency.png", dpi=100)
    plt.close(fig)

    pairs = {
        "ours\n50×50": results["cpu_point"]["ours"],
        "relay\n50×50": results["cpu_point"]["relay"],
        "ours\nsaturation": results["saturation"]["ours"],
        "relay\nsaturation": results["saturation"]["relay"],
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    bottoms = [0.0] * len(pairs)
    for name in PROCESSES:
        heights = [p["cpu_s_per_1k_tokens"].get(name, 0.0) for p in pairs.values()]
        ax.bar(list(pairs), heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("CPU-seconds per 1,000 tokens")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(images / "bench-cpu.png", dpi=100)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    plots(results, out / "images")
    (out / "benchmarks.md").write_text(markdown(results))
