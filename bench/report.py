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


def machine_facts(nats_binary: str = "nats-server") -> dict[str, Any]:
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
        "nats-server": f"{_first_line([nats_binary, '--version'])} ({nats_binary})",
        "redis-server": _first_line(["redis-server", "--version"]),
        "packages": {name: version(name) for name in ("uvicorn", "starlette", "websockets", "nats-py", "redis", "uvloop", "msgspec", "httpx")},
        "load_generator": "bench/load.py, one process on the same machine",
    }


# The goals for its three points: (streams × tokens/s, CPU ratio to the relay, p99 ms).
POINT_GOALS = {"50x50": (2.5, 25.0), "200x20": (2.5, 50.0), "20x500": (1.5, 40.0)}
CAPACITY_GOAL = 10_000  # tokens/s with p99 ≤ 50 ms
IDLE_GOAL_KIB = 24
REDIS_GOAL = 3.0  # Redis bytes per byte of answer text
TTFT_GOAL_MS = 20.0
Row = tuple[str, str, str, bool, str]  # target, goal, measured, met, by how much


def _row(target: str, measured: float, goal: float, shown: str, *, at_least: bool = False, fmt: str = "{:g}") -> Row:
    """A target row; the margin is how far ``measured`` is from ``goal``, as a share of the goal."""
    met = measured >= goal if at_least else measured <= goal
    margin = abs(measured - goal) / goal if goal else 0.0
    side = ("above" if measured >= goal else "below")
    return (target, ("≥ " if at_least else "≤ ") + fmt.format(goal), shown, met, f"{margin:.0%} {side} the goal")


def ratio(point: dict[str, Any], relay: dict[str, Any]) -> float:
    """Our CPU per token over the bare relay's, in the same run."""
    return float(point["cpu_s_per_1k_tokens"]["total"] / max(1e-9, relay["cpu_s_per_1k_tokens"]["total"]))


def _label(point: dict[str, Any]) -> str:
    return f"{point['streams']:,} streams × {point['rate']:g} tokens/s"


def _intact(check: dict[str, int]) -> bool:
    return not any(check.values())


def targets(results: dict[str, Any]) -> list[Row]:
    """The issue's targets that this run measured."""
    rows: list[Row] = []
    cap = results["settings"]["frame_interval_ms"]
    for name, variants in results.get("points", {}).items():
        goal_ratio, goal_p99 = POINT_GOALS[name]
        ours, relay = variants["cap"], variants["relay"]
        r = ratio(ours, relay)
        rows.append(_row(f"CPU per token vs the bare relay, {_label(ours)} (cap {cap:g} ms)", r, goal_ratio, f"{r:.2f}×", fmt="{:g}×"))
        p99 = ours["latency"]["p99_ms"]
        rows.append(_row(f"p99 added latency, {_label(ours)} (cap {cap:g} ms)", p99, goal_p99, f"{p99:.1f} ms", fmt="{:g} ms"))
    if "capacity" in results:
        best = max((p["delivered_tokens_per_s"] for p in results["capacity"] if _keeps(p)), default=0.0)
        rows.append(_row("Capacity: streams of 20 tokens/s with p99 ≤ 50 ms", best, CAPACITY_GOAL, f"{best:,.0f} tokens/s",
                         at_least=True, fmt="{:,} tokens/s"))
    if "idle" in results:
        idle = results["idle"]
        kib = idle["kib_per_connection"]
        row = _row(f"Idle WebSockets on one gateway ({idle['connections']:,.0f} open)", kib, IDLE_GOAL_KIB, f"{kib:.1f} KiB each", fmt="{:g} KiB each")
        rows.append((*row[:3], row[3] and idle["connections"] >= 10_000 and not idle["failed"], row[4]))
    if "redis" in results:
        redis = results["redis"]
        rows.append(_row(f"Redis memory per byte of answer ({redis['turns']:.0f} turns × {redis['tokens_per_turn']:.0f} tokens)",
                         redis["ratio"], REDIS_GOAL, f"{redis['ratio']:.1f}× ({redis['redis_bytes_total']:,.0f} B for "
                         f"{redis['answer_bytes']:,.0f} B)", fmt="{:g}×"))
    if "ttft" in results:
        p99 = results["ttft"]["ttft_ms"]["p99_ms"]
        rows.append(_row("Time to first token added, p99 (bursts of chats)", p99, TTFT_GOAL_MS, f"{p99:.1f} ms", fmt="{:g} ms"))
    if "controls" in results:
        resume = results["controls"]["resume_ms"]["p99_ms"]
        rows.append(_row("Resume to first chunk, p99", resume, 5.0, f"{resume:.1f} ms", fmt="{:g} ms"))
    if "reconnect" in results:
        catch = results["reconnect"]["catch_up_ms"]
        rows.append(_row(f"Catch-up of {results['reconnect']['missed_tokens']:,.0f} missed tokens", catch, 250.0, f"{catch:.0f} ms", fmt="{:g} ms"))
    bad = {k: v for c in _checks(results) for k, v in c.items() if v}
    rows.append(("Loss, duplication, reordering (every point)", "0", "0" if not bad else json.dumps(bad), not bad, "–"))
    return rows


def _checks(results: dict[str, Any]) -> list[dict[str, int]]:
    checks = [p["check"] for variants in results.get("points", {}).values() for p in variants.values()]
    checks += [p["check"] for p in [*results.get("latency", []), *results.get("capacity", []), *results.get("storage", {}).values()]]
    checks += [p["check"] for p in results.get("pauses", {}).values()]
    checks += [results[k]["check"] for k in ("controls", "reconnect", "ttft", "redis") if k in results]
    return checks


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
            f"{_ms(p['latency'])} | {cpu['total']:.3f} | {'yes' if _intact(p['check']) else p['check']} |"
        )
    return rows


def _process_table(rows: dict[str, dict[str, Any]], lead: str) -> list[str]:
    """Per-process CPU-s per 1,000 tokens, a row per ``label -> figures``."""
    lines = [f"| {lead} | " + " | ".join(PROCESSES) + " | Total |",
             "|---|" + "---|" * (len(PROCESSES) + 1)]
    for label, point in rows.items():
        cpu = point["cpu_s_per_1k_tokens"]
        cells = " | ".join(f"{cpu[name]:.3f}" if name in cpu else "–" for name in PROCESSES)
        lines.append(f"| {label} | {cells} | {cpu['total']:.3f} |")
    return lines


def point_tables(results: dict[str, Any]) -> list[str]:
    """For each point: latency, ratio and integrity, then CPU by process, for each variant."""
    cap = results["settings"]["frame_interval_ms"]
    names = {"cap": f"ours, cap {cap:g} ms", "nocap": "ours, cap off", "relay": "bare relay"}
    lines: list[str] = []
    for variants in results.get("points", {}).values():
        relay = variants["relay"]
        shown = {names[v]: variants[v] for v in ("cap", "nocap", "relay") if v in variants}
        lines += [f"### {_label(relay)}", "",
                  "| Variant | Delivered tokens/s | p50 / p99 / p99.9 ms | CPU-s per 1k tokens | × relay | Intact |",
                  "|---|---|---|---|---|---|"]
        for label, p in shown.items():
            lines.append(f"| {label} | {p['delivered_tokens_per_s']:,.0f} | {_ms(p['latency'])} | "
                         f"{p['cpu_s_per_1k_tokens']['total']:.3f} | {ratio(p, relay):.2f} | {'yes' if _intact(p['check']) else p['check']} |")
        lines += ["", *_process_table(shown, "CPU-s per 1k tokens"), ""]
    return lines


def markdown(results: dict[str, Any], *, full: bool = True) -> str:
    """The report page; ``full=False`` leaves out the page's preamble, plots and prose (for ``--only``)."""
    meta, machine, settings = results["meta"], results["meta"]["machine"], results["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}`; the figures below are from the run of "
        f"{meta['started']} ({meta['duration_s']:.0f} s). Every figure is the median of {meta['runs']} runs"
        + ("; raw figures are in [benchmarks.json](benchmarks.json). How it measures is at the end." if full else "."),
        "",
        f"Settings: the worker's frame cap (`CHAT_FRAME_INTERVAL_MS`) {settings['frame_interval_ms']:g} ms unless a row says "
        f"otherwise; the generated-frames stream in {settings['js_storage']} storage (`CHAT_JS_STORAGE`); {machine['nats-server']}.",
        "",
        "## Targets",
        "",
        *(["A smoke run's loads are tiny: its figures check the benchmark runs, not the targets.", ""]
          if meta.get("smoke") else []),
        "| Target | Goal | Measured | Met | By how much |",
        "|---|---|---|---|---|",
    ]
    def met(ok: bool) -> str:
        return "(smoke)" if meta.get("smoke") else "yes" if ok else "**no**"

    lines += [f"| {t} | {goal} | {got} | {met(ok)} | {margin} |" for t, goal, got, ok, margin in targets(results)]
    if "points" in results:
        lines += [
            "",
            "## The three points: CPU per 1,000 delivered tokens and added latency",
            "",
            "CPU-seconds (user + system, from /proc) each process spent in a "
            f"{meta['window_s']:g} s window of steady streaming, per 1,000 tokens the clients received in it; the bare relay "
            "(bench/relay.py: one NATS hop into one WebSocket) ran the same load in the same run. Added latency is per token, "
            "from the source stamping it to the client reading it: a token the frame cap holds counts its wait. "
            "The load generator and token source are not counted.",
            "",
            *point_tables(results),
        ]
        if full:
            lines += ["![CPU per token by process](images/bench-cpu.png)", ""]
    if "storage" in results:
        storage = results["storage"]
        lines += [
            "## JetStream storage of the generated frames",
            "",
            f"{_label(next(iter(storage.values())))}, cap {settings['frame_interval_ms']:g} ms; the other storage on restarted "
            "services and a recreated stream.",
            "",
            "| Storage | nats-server CPU-s per 1k | Total CPU-s per 1k | p50 / p99 / p99.9 ms | Intact |",
            "|---|---|---|---|---|",
            *[f"| {kind} | {p['cpu_s_per_1k_tokens']['nats-server']:.3f} | {p['cpu_s_per_1k_tokens']['total']:.3f} | "
              f"{_ms(p['latency'])} | {'yes' if _intact(p['check']) else p['check']} |" for kind, p in sorted(storage.items())],
            "",
        ]
    if "latency" in results:
        lines += [
            "## Added latency per token",
            "",
            "From the source stamping a token to the client reading it, through the worker's HTTP client, "
            "JetStream, the buffer, Redis, core NATS and the gateway.",
            "",
            "| Streams × tokens/s | Offered tokens/s | Delivered tokens/s | p50 / p99 / p99.9 ms | CPU-s per 1k tokens | Intact |",
            "|---|---|---|---|---|---|",
            *_stream_rows(results["latency"]),
            "",
        ]
        if full:
            lines += ["![Latency against concurrency](images/bench-latency.png)", ""]
    if "capacity" in results:
        lines += [
            "## Capacity",
            "",
            "Streams of 20 tokens/s added until p99 passes 50 ms or delivery falls behind the offer.",
            "",
            "| Streams × tokens/s | Offered tokens/s | Delivered tokens/s | p50 / p99 / p99.9 ms | CPU-s per 1k tokens | Intact |",
            "|---|---|---|---|---|---|",
            *_stream_rows(results["capacity"]),
            "",
        ]
    if "ttft" in results:
        ttft = results["ttft"]
        lines += [
            "## Time to first token",
            "",
            f"{ttft['bursts']:.0f} bursts of {ttft['chats']:.0f} chats, each burst about a second after the previous one "
            "finished: from sending `chat` to reading the first chunk. The token source sends its first token as the "
            "request arrives, so all of this is the stack's: the gateway, the request stream, the worker's start and "
            "HTTP request, and the frame's way back.",
            "",
            "| Part | p50 ms | p99 ms | max ms |",
            "|---|---|---|---|",
            *[f"| {part} | {ttft[key]['p50_ms']:.1f} | {ttft[key]['p99_ms']:.1f} | {ttft[key]['max_ms']:.1f} |" for part, key in (
                ("`chat` sent → first chunk read (the target's figure)", "ttft_ms"),
                ("`chat` sent → the source emitting the first token", "to_source_ms"),
                ("the first token's way from the source to the client", "from_source_ms"))],
            "",
            "The parts' percentiles are each taken on their own, so they need not add up.",
            "",
        ]
    if "redis" in results:
        redis = results["redis"]
        by_key = ", ".join(f"{k} {v:,.0f}" for k, v in redis["redis_bytes"].items())
        lines += [
            "## Redis memory per session",
            "",
            f"A session of {redis['turns']:.0f} turns of {redis['tokens_per_turn']:.0f} tokens of English word pieces at "
            f"{redis['rate']:g} tokens/s (the median of {redis['sessions']:.0f} sessions run side by side): "
            f"`MEMORY USAGE` of its keys ({by_key} bytes) is **{redis['redis_bytes_total']:,.0f} bytes** for "
            f"{redis['answer_bytes']:,.0f} bytes of answer text (UTF-8): **{redis['ratio']:.1f}×**.",
            "",
        ]
    if "pauses" in results:
        ours, relay = results["pauses"]["ours"], results["pauses"]["relay"]
        lines += [
            "## Pause and resume under fast streams",
            "",
            f"{ours['streams']:.0f} streams of {ours['rate']:g} tokens/s, each paused for a second after every second of "
            "delivery; CPU over the whole run per 1,000 tokens delivered (held tokens are delivered on resume). The relay "
            "holds a paused connection's frames in a list.",
            "",
            *_process_table({f"ours ({ours['pause_cycles']:.0f} pauses)": ours,
                             f"bare relay ({relay['pause_cycles']:.0f} pauses)": relay}, "Load"),
            "",
            f"Ours / relay: **{ratio(ours, relay):.2f}×**; intact: "
            f"{'yes' if _intact(ours['check']) and _intact(relay['check']) else [ours['check'], relay['check']]}.",
            "",
        ]
    if "controls" in results or "reconnect" in results:
        lines += ["## Pause, resume, reconnect latency", ""]
    if "controls" in results:
        controls = results["controls"]
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
        ]
    if "reconnect" in results:
        reconnect = results["reconnect"]
        lines += [
            f"Reconnect: a client leaves as its turn starts and comes back with `last_seq` after the whole answer "
            f"({reconnect['missed_tokens']:,.0f} tokens in {reconnect['missed_frames']:,.0f} frames) is stored: "
            f"**{reconnect['catch_up_ms']:.0f} ms** from opening the socket to reading the `done`.",
            "",
        ]
    if "idle" in results:
        idle = results["idle"]
        lines += [
            "## Idle connections",
            "",
            f"{idle['connections']:,.0f} idle WebSockets on one gateway process (opened in {idle['open_s']:.1f} s, "
            f"{idle['failed']:.0f} refused, {idle['alive_after_hold']:,.0f} alive after {idle['hold_s']:g} s): "
            f"resident memory {idle['rss_before_mib']:.0f} → {idle['rss_after_mib']:.0f} MiB, "
            f"**{idle['kib_per_connection']:.1f} KiB per connection**; heartbeat CPU "
            f"{idle['gateway_cpu_s_per_s'] * 1000:.1f} ms per second for all of them.",
            "",
        ]
    if not full:
        return "\n".join(lines)
    lines += [
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
        "make bench                      # the full run, about 20 minutes; rewrites this page",
        ".venv/bin/python -m bench --only 50x50 --runs 3     # one point (cap on, cap off, relay), tables to stdout",
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

    cap = results["settings"]["frame_interval_ms"]
    pairs = {f"{label}\n{name}": variants[key] for name, variants in results["points"].items()
             for key, label in (("cap", f"cap {cap:g}"), ("nocap", "cap off"), ("relay", "relay")) if key in variants}
    fig, ax = plt.subplots(figsize=(10, 4))
    bottoms = [0.0] * len(pairs)
    for name in PROCESSES:
        heights = [p["cpu_s_per_1k_tokens"].get(name, 0.0) for p in pairs.values()]
        ax.bar(list(pairs), heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("CPU-seconds per 1,000 tokens")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(images / "bench-cpu.png", dpi=100)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    plots(results, out / "images")  # first: the likeliest to fail, and the JSON and page stay a pair
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "benchmarks.md").write_text(markdown(results))
