"""The load generator: real WebSocket clients in a process of their own.

``python -m bench.load SPEC.json`` runs one scenario and prints its figures as
JSON. Every chunk is checked (seq gap-free, no duplicate, in order) and every
token's latency is its receive time minus the emit time the source stamped
on it. CPU of the measured processes is read from /proc at the edges of the
measurement window, so only steady streaming is counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import uvloop

from .wsclient import WsConnection, connect

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
_decode = msgspec.json.decode


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_KIB


def cpu_all(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.5),
        "p99_ms": percentile(values, 0.99),
        "p999_ms": percentile(values, 0.999),
        "max_ms": max(values, default=float("nan")),
    }


@dataclass
class Tally:
    """What every stream saw; latencies in ms, receive times in µs."""

    received_us: array[int] = field(default_factory=lambda: array("q"))
    latency_ms: array[float] = field(default_factory=lambda: array("d"))
    gaps: int = 0
    duplicates: int = 0
    tokens: int = 0
    bad_done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{type(exc).__name__}: {exc}")


class Stream:
    """One chat: checks each frame as it arrives, in the socket's callback."""

    def __init__(self, tally: Tally, last_seq: int = 0, *, words: bool = False) -> None:
        self.tally = tally
        self.last_seq = last_seq
        self.words = words  # chunks carry prose, not stamps: count its bytes
        self.text_bytes = 0
        self.frames = 0
        self.turn_firsts: list[tuple[int, int]] = []  # each turn's first chunk: (received, its first token's stamp), µs
        self.new_turn = False
        self.ready = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self.waiters: list[tuple[str, asyncio.Future[float]]] = []
        self.ws: WsConnection | None = None

    def on_text(self, text: str) -> None:
        now = time.time_ns() // 1000
        frame = _decode(text)
        kind = frame["type"]
        if kind == "chunk" or kind == "done":
            seq = frame["seq"]
            if seq <= self.last_seq:
                self.tally.duplicates += 1
                return
            if seq != self.last_seq + 1:
                self.tally.gaps += 1
            self.last_seq = seq
            self.frames += 1
            if kind == "chunk" and self.words:
                self.text_bytes += len(frame["text"].encode())
            elif kind == "chunk":
                received, latency = self.tally.received_us, self.tally.latency_ms
                if self.new_turn:
                    self.new_turn = False
                    self.turn_firsts.append((now, int(frame["text"].split()[0])))
                for token in frame["text"].split():
                    received.append(now)
                    latency.append((now - int(token)) / 1000)
                    self.tally.tokens += 1
            elif not self.done.done():
                self.done.set_result(frame["reason"])
        elif kind == "ready" and not self.ready.done():
            self.ready.set_result(frame)
        if self.waiters:
            still = []
            for want, future in self.waiters:
                if want == kind and not future.done():
                    future.set_result(time.perf_counter())
                else:
                    still.append((want, future))
            self.waiters = still

    def wait_for(self, kind: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters.append((kind, future))
        return future

    async def open(self, host: str, port: int, path: str) -> None:
        self.ws = await connect(host, port, path, self.on_text)
        await asyncio.wait_for(self.ready, 30)

    def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        self.ws.send_text(json.dumps(frame))

    def chat(self, rate: float, tokens: int) -> None:
        prompt = f"bench rate={rate} tokens={tokens}" + (" text=words" if self.words else "")
        self.new_turn = True
        self.send({"type": "chat", "prompt": prompt, "id": uuid.uuid4().hex})


def ws_path(spec: dict[str, Any], session: str | None = None, last_seq: int = 0) -> str:
    session = session or "b" + uuid.uuid4().hex[:20]
    return f"/ws?session={session}" + (f"&last_seq={last_seq}" if last_seq else "")


async def run_chat(spec: dict[str, Any], tally: Tally, t0: float, *, streams: int, rate: float, tokens: int, stagger_s: float) -> None:
    """``streams`` chats, started evenly over ``stagger_s``, each to its done."""
    host, port = spec["host"], spec["port"]

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, t0 + index * stagger_s / max(1, streams) - time.monotonic()))
        stream = Stream(tally)
        try:
            await stream.open(host, port, ws_path(spec))
            stream.chat(rate, tokens)
            reason = await asyncio.wait_for(stream.done, tokens / rate + 60)
            if reason != "stop":
                tally.bad_done += 1
        except Exception as exc:
            tally.fail(exc)
        finally:
            if stream.ws is not None:
                await stream.ws.close()

    await asyncio.gather(*(one(i) for i in range(streams)))


async def scenario_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """Steady streaming: latency, delivered tokens/s and CPU in the window."""
    tally = Tally()
    pids: dict[str, int] = spec["pids"]
    t0 = time.monotonic() + 0.2
    wall0 = time.time() + 0.2
    start_s, end_s = spec["window_s"]
    load = asyncio.create_task(
        run_chat(spec, tally, t0, streams=spec["streams"], rate=spec["rate"], tokens=spec["tokens"], stagger_s=spec["stagger_s"])
    )
    await asyncio.sleep(max(0.0, t0 + start_s - time.monotonic()))
    cpu_before, own_before = cpu_all(pids), time.process_time()
    await asyncio.sleep(max(0.0, t0 + end_s - time.monotonic()))
    cpu_after, own_after = cpu_all(pids), time.process_time()
    await load
    lo, hi = int((wall0 + start_s) * 1e6), int((wall0 + end_s) * 1e6)
    in_window = [lat for at, lat in zip(tally.received_us, tally.latency_ms, strict=True) if lo <= at < hi]
    window = end_s - start_s
    return {
        "streams": spec["streams"],
        "rate": spec["rate"],
        "offered_tokens_per_s": spec["streams"] * spec["rate"],
        "delivered_tokens_per_s": len(in_window) / window,
        "latency": latency_summary(in_window),
        "cpu_s": {name: cpu_after[name] - cpu_before[name] for name in pids},
        "window_tokens": len(in_window),
        "load_cpu_s": own_after - own_before,
        "check": check(tally, expected_tokens=spec["streams"] * spec["tokens"]),
        "errors": tally.errors,
    }


def check(tally: Tally, *, expected_tokens: int) -> dict[str, int]:
    """Zero everywhere means nothing lost, duplicated or reordered."""
    return {
        "lost_tokens": expected_tokens - tally.tokens,
        "gaps": tally.gaps,
        "duplicates": tally.duplicates,
        "bad_done": tally.bad_done,
        "failed_streams": tally.failed,
    }


async def scenario_controls(spec: dict[str, Any]) -> dict[str, Any]:
    """Pause → ``paused`` and resume → first chunk, under background streams."""
    tally, background_tally = Tally(), Tally()
    host, port = spec["host"], spec["port"]
    rate, cycles, hold_s = spec["rate"], spec["cycles"], spec["hold_s"]
    t0 = time.monotonic()
    background = asyncio.create_task(
        run_chat(spec, background_tally, t0, streams=spec["background_streams"], rate=rate,
                 tokens=int(rate * spec["background_s"]), stagger_s=1.0)
    )
    await asyncio.sleep(1.5)
    pauses: list[float] = []
    resumes: list[float] = []
    leaked = 0

    async def controller() -> None:
        nonlocal leaked
        stream = Stream(tally)
        await stream.open(host, port, ws_path(spec))
        stream.chat(rate, 1_000_000)
        await stream.wait_for("chunk")
        for _ in range(cycles):
            sent = time.perf_counter()
            stream.send({"type": "pause"})
            pauses.append((await asyncio.wait_for(stream.wait_for("paused"), 10) - sent) * 1000)
            frames = stream.frames
            await asyncio.sleep(hold_s)
            leaked += stream.frames - frames  # chunks delivered while paused
            first_chunk = stream.wait_for("chunk")
            sent = time.perf_counter()
            stream.send({"type": "resume"})
            resumes.append((await asyncio.wait_for(first_chunk, 10) - sent) * 1000)
            await asyncio.sleep(hold_s)
        stream.send({"type": "stop"})
        await asyncio.wait_for(stream.done, 10)
        assert stream.ws is not None
        await stream.ws.close()

    await asyncio.gather(*(controller() for _ in range(spec["controllers"])))
    await background
    return {
        "cycles": len(pauses),
        "background_streams": spec["background_streams"],
        "pause_ms": latency_summary(pauses),
        "resume_ms": latency_summary(resumes),
        "chunks_while_paused": leaked,
        "check": {"gaps": tally.gaps + background_tally.gaps, "duplicates": tally.duplicates + background_tally.duplicates,
                  "failed_streams": background_tally.failed, "bad_done": background_tally.bad_done},
    }


async def scenario_reconnect(spec: dict[str, Any]) -> dict[str, Any]:
    """A client leaves, misses a whole answer, and comes back with its last seq."""
    host, port = spec["host"], spec["port"]
    tokens, rate = spec["tokens"], spec["rate"]
    session = "b" + uuid.uuid4().hex[:20]
    tally = Tally()
    first = Stream(tally)
    await first.open(host, port, ws_path(spec, session))
    accepted = first.wait_for("accepted")
    first.chat(rate, tokens)
    await asyncio.wait_for(accepted, 10)
    assert first.ws is not None
    await first.ws.close()
    left_at, left_tokens = first.last_seq, tally.tokens
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        deadline = time.monotonic() + tokens / rate + 60
        while time.monotonic() < deadline:  # a benchmark may poll: the answer is being written
            turns = (await http.get(f"/api/sessions/{session}/history")).json()["turns"]
            if turns:
                break
            await asyncio.sleep(0.05)
    again = Stream(tally, last_seq=left_at)
    started = time.perf_counter()
    await again.open(host, port, ws_path(spec, session, left_at))
    await asyncio.wait_for(again.done, 60)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert again.ws is not None
    await again.ws.close()
    return {
        "missed_tokens": tally.tokens - left_tokens,
        "missed_frames": again.frames,
        "catch_up_ms": elapsed_ms,
        "check": {"lost_tokens": tokens - tally.tokens, "gaps": tally.gaps, "duplicates": tally.duplicates},
    }


async def scenario_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Idle connections held by one gateway process: memory and heartbeat CPU."""
    host, port = spec["host"], spec["port"]
    gateway = spec["pids"].get("gateway") or spec["pids"]["relay"]  # the one process holding the sockets
    rss_before = rss_kib(gateway)
    opened: list[Stream] = []
    gate = asyncio.Semaphore(64)
    tally = Tally()

    async def one() -> None:
        async with gate:
            stream = Stream(tally)
            try:
                await stream.open(host, port, ws_path(spec))
                opened.append(stream)
            except Exception as exc:
                tally.fail(exc)

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(spec["connections"])))
    open_s = time.monotonic() - started
    await asyncio.sleep(1.0)  # let the gateway settle after the burst
    rss_after = rss_kib(gateway)
    cpu_before = cpu_seconds(gateway)
    await asyncio.sleep(spec["hold_s"])
    cpu_held = cpu_seconds(gateway) - cpu_before
    alive = sum(1 for s in opened if s.ws is not None and not s.ws.closed.done())
    await asyncio.gather(*(s.ws.close() for s in opened if s.ws is not None))
    held = max(1, len(opened))
    return {
        "connections": len(opened),
        "failed": tally.failed,
        "errors": tally.errors,
        "alive_after_hold": alive,
        "open_s": open_s,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "kib_per_connection": (rss_after - rss_before) / held,
        "hold_s": spec["hold_s"],
        "gateway_cpu_s_per_s": cpu_held / spec["hold_s"],
    }


async def open_streams(spec: dict[str, Any], tally: Tally, count: int, **kwargs: Any) -> list[Stream]:
    streams = [Stream(tally, **kwargs) for _ in range(count)]
    await asyncio.gather(*(s.open(spec["host"], spec["port"], ws_path(spec)) for s in streams))
    return streams


async def close_streams(streams: list[Stream]) -> None:
    await asyncio.gather(*(s.ws.close() for s in streams if s.ws is not None))


async def scenario_pauses(spec: dict[str, Any]) -> dict[str, Any]:
    """Fast streams paused for ``hold_s`` after every ``on_s`` of delivery: CPU per
    1,000 delivered tokens over the whole run (held tokens are delivered on resume)."""
    tally, pids = Tally(), spec["pids"]
    streams = await open_streams(spec, tally, spec["streams"])
    cycles = 0

    async def one(stream: Stream) -> None:
        nonlocal cycles
        first = stream.wait_for("chunk")
        stream.chat(spec["rate"], spec["tokens"])
        await asyncio.wait_for(first, 30)
        while not stream.done.done():
            await asyncio.wait([stream.done], timeout=spec["on_s"])
            if stream.done.done():
                break
            paused = stream.wait_for("paused")
            stream.send({"type": "pause"})
            await asyncio.wait_for(paused, 10)
            await asyncio.sleep(spec["hold_s"])
            stream.send({"type": "resume"})
            cycles += 1
        if stream.done.result() != "stop":
            tally.bad_done += 1

    cpu_before = cpu_all(pids)
    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(s) for s in streams), return_exceptions=True)
    elapsed = time.monotonic() - started
    cpu_after = cpu_all(pids)
    await close_streams(streams)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            tally.fail(outcome)
    cpu = {name: cpu_after[name] - cpu_before[name] for name in pids}
    return {
        "streams": spec["streams"],
        "rate": spec["rate"],
        "pause_cycles": cycles,
        "delivered_tokens": tally.tokens,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "cpu_s_per_1k_tokens": per_thousand(cpu, tally.tokens),
        "check": check(tally, expected_tokens=spec["streams"] * spec["tokens"]),
        "errors": tally.errors,
    }


def per_thousand(cpu: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU-seconds per 1,000 tokens, by process and in total."""
    per_k = {name: seconds / max(1, tokens) * 1000 for name, seconds in cpu.items()}
    return {**per_k, "total": sum(per_k.values())}


async def scenario_ttft(spec: dict[str, Any]) -> dict[str, Any]:
    """Bursts of chats, each burst ``gap_s`` after the previous one finished: ms
    from sending ``chat`` to reading the first chunk (the source sends its first
    token as the request arrives, so all of it is our stack's)."""
    tally = Tally()
    streams = await open_streams(spec, tally, spec["chats"])
    ttft: list[float] = []
    to_source: list[float] = []  # chat sent → the source emitting the first token
    for _ in range(spec["bursts"]):
        firsts = [s.wait_for("chunk") for s in streams]
        dones = [s.wait_for("done") for s in streams]
        sent = []
        for stream in streams:
            sent.append(time.time_ns() // 1000)
            stream.chat(spec["rate"], spec["tokens"])
        await asyncio.wait_for(asyncio.gather(*firsts), 30)
        for stream, at in zip(streams, sent, strict=True):
            received, stamped = stream.turn_firsts[-1]
            ttft.append((received - at) / 1000)
            to_source.append((stamped - at) / 1000)
        await asyncio.wait_for(asyncio.gather(*dones), 30)
        await asyncio.sleep(spec["gap_s"])
    await close_streams(streams)
    return {
        "chats": spec["chats"],
        "bursts": spec["bursts"],
        "ttft_ms": latency_summary(ttft),
        "to_source_ms": latency_summary(to_source),
        "from_source_ms": latency_summary([t - s for t, s in zip(ttft, to_source, strict=True)]),
        "check": check(tally, expected_tokens=spec["chats"] * spec["bursts"] * spec["tokens"]),
    }


async def scenario_redis_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """``sessions`` sessions side by side, each ``turns`` answers of ``tokens`` prose
    tokens at ``rate``: Redis ``MEMORY USAGE`` (bytes) of a session's keys against
    its answers' UTF-8 bytes; the figures of the session with the median ratio."""
    import redis.asyncio as aioredis

    from shared.subjects import history_key, log_key, retired_key, session_key

    host, port = spec["host"], spec["port"]
    client = aioredis.from_url(spec["redis_url"])

    async def one() -> dict[str, Any]:
        session = "b" + uuid.uuid4().hex[:20]
        stream = Stream(Tally(), words=True)
        await stream.open(host, port, ws_path(spec, session))
        for _ in range(spec["turns"]):
            done = stream.wait_for("done")
            stream.chat(spec["rate"], spec["tokens"])
            await asyncio.wait_for(done, spec["tokens"] / spec["rate"] + 60)
        assert stream.ws is not None
        await stream.ws.close()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the last turn's history entry may trail its done
                if len((await http.get(f"/api/sessions/{session}/history")).json()["turns"]) >= spec["turns"]:
                    break
                await asyncio.sleep(0.05)
        keys = {name: key(session) for name, key in
                (("meta", session_key), ("log", log_key), ("history", history_key), ("retired", retired_key))}
        usage = {name: await client.memory_usage(key, samples=0) or 0 for name, key in keys.items()}
        total = sum(usage.values())
        return {
            "answer_bytes": stream.text_bytes,
            "redis_bytes": usage,
            "redis_bytes_total": total,
            "ratio": total / max(1, stream.text_bytes),
            "check": {"gaps": stream.tally.gaps, "duplicates": stream.tally.duplicates},
        }

    try:
        sessions = await asyncio.gather(*(one() for _ in range(spec["sessions"])))
    finally:
        await client.aclose()
    median = sorted(sessions, key=lambda s: s["ratio"])[len(sessions) // 2]
    return {
        "sessions": spec["sessions"],
        "turns": spec["turns"],
        "tokens_per_turn": spec["tokens"],
        "rate": spec["rate"],
        **median,
        "check": {k: sum(s["check"][k] for s in sessions) for k in median["check"]},
    }


SCENARIOS = {
    "stream": scenario_stream,
    "pauses": scenario_pauses,
    "ttft": scenario_ttft,
    "redis_memory": scenario_redis_memory,
    "controls": scenario_controls,
    "reconnect": scenario_reconnect,
    "idle": scenario_idle,
}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = uvloop.run(SCENARIOS[spec["scenario"]](spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
