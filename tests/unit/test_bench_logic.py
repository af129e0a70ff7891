"""The benchmark's pure parts: the load generator's frame parser, stream specs, medians."""

from __future__ import annotations

import asyncio

from bench.__main__ import keeps_up, median_of
from bench.report import _row, targets
from bench.upstream import parse_stream_spec
from bench.wsclient import WsConnection, _frame


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_frames_split_anywhere_are_reassembled() -> None:
    texts: list[str] = []
    ws = WsConnection(b"GET / HTTP/1.1\r\n\r\n", texts.append)
    ws.connection_made(FakeTransport())  # type: ignore[arg-type]
    big = "x" * 70_000
    stream = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        + server_frame(1, b'{"a":1}')
        + server_frame(1, big.encode())
        + server_frame(1, b"hel", fin=False)
        + server_frame(0, b"lo")
        + server_frame(1, ("é" * 200).encode())
    )
    for i in range(0, len(stream), 7):  # the worst case: 7 bytes at a time
        ws.data_received(stream[i : i + 7])
    assert ws.upgraded.done()
    assert texts == ['{"a":1}', big, "hello", "é" * 200]


async def test_ping_is_answered_and_a_refused_upgrade_fails() -> None:
    ws = WsConnection(b"", lambda _: None)
    transport = FakeTransport()
    ws.connection_made(transport)  # type: ignore[arg-type]
    ws.data_received(b"HTTP/1.1 101 OK\r\n\r\n" + server_frame(9, b"beat"))
    assert transport.written[-1] == _frame(10, b"beat")

    refused = WsConnection(b"", lambda _: None)
    refused.connection_made(FakeTransport())  # type: ignore[arg-type]
    refused.data_received(b"HTTP/1.1 429 Too Many Requests\r\n\r\n")
    try:
        await asyncio.wait_for(refused.upgraded, 1)
    except ConnectionError as exc:
        assert "429" in str(exc)
    else:
        raise AssertionError("a refused upgrade must fail")


def test_client_frames_are_masked_with_lengths_encoded() -> None:
    assert _frame(1, b"hi") == b"\x81\x82\x00\x00\x00\x00hi"
    assert _frame(1, b"x" * 300)[:4] == b"\x81\xfe\x01\x2c"


def test_stream_spec_from_a_prompt() -> None:
    assert parse_stream_spec("bench rate=20.5 tokens=300") == (20.5, 300)
    assert parse_stream_spec("hello") == (30.0, 30)


def test_median_of_runs_takes_medians_and_sums_checks() -> None:
    runs = [
        {"p": {"x": 1.0}, "n": 3, "check": {"gaps": 0}, "name": "a"},
        {"p": {"x": 5.0}, "n": 1, "check": {"gaps": 1}, "name": "a"},
        {"p": {"x": 2.0}, "n": 2, "check": {"gaps": 0}, "name": "a"},
    ]
    assert median_of(runs) == {"p": {"x": 2.0}, "n": 2, "check": {"gaps": 1}, "name": "a", "runs": 3}


def test_a_point_keeps_up_only_when_fast_complete_and_intact() -> None:
    good = {"latency": {"p99_ms": 40.0}, "delivered_tokens_per_s": 980.0, "offered_tokens_per_s": 1000, "check": {"gaps": 0}}
    assert keeps_up(good)
    assert not keeps_up({**good, "latency": {"p99_ms": 51.0}})
    assert not keeps_up({**good, "delivered_tokens_per_s": 900.0})
    assert not keeps_up({**good, "check": {"gaps": 1}})


def _point(cpu_total: float, p99: float, streams: int = 50, rate: float = 50) -> dict[str, object]:
    return {"streams": streams, "rate": rate, "latency": {"p99_ms": p99}, "cpu_s_per_1k_tokens": {"total": cpu_total},
            "check": {"gaps": 0}}


def test_target_rows_say_met_and_by_how_much() -> None:
    assert _row("t", 2.0, 2.5, "2.0×") == ("t", "≤ 2.5", "2.0×", True, "20% below the goal")
    assert _row("t", 30.0, 25.0, "30 ms")[3:] == (False, "20% above the goal")
    assert _row("t", 12_000, 10_000, "x", at_least=True)[3:] == (True, "20% above the goal")
    assert _row("t", 5_000, 10_000, "x", at_least=True)[3:] == (False, "50% below the goal")


def test_targets_compare_each_point_with_its_relay_and_flag_any_loss() -> None:
    results = {
        "settings": {"frame_interval_ms": 40.0},
        "points": {"50x50": {"cap": _point(0.2, 30.0), "relay": _point(0.1, 1.0)},
                   "20x500": {"cap": _point(0.3, 10.0, 20, 500), "relay": {**_point(0.1, 1.0, 20, 500), "check": {"gaps": 2}}}},
    }
    rows = {row[0]: row for row in targets(results)}
    assert rows["CPU per token vs the bare relay, 50 streams × 50 tokens/s (cap 40 ms)"][2:4] == ("2.00×", True)
    assert rows["p99 added latency, 50 streams × 50 tokens/s (cap 40 ms)"][2:4] == ("30.0 ms", False)  # goal 25 ms
    assert rows["CPU per token vs the bare relay, 20 streams × 500 tokens/s (cap 40 ms)"][2:4] == ("3.00×", False)  # goal 1.5×
    assert rows["p99 added latency, 20 streams × 500 tokens/s (cap 40 ms)"][3] is True  # goal 40 ms
    assert rows["Loss, duplication, reordering (every point)"][2:4] == ('{"gaps": 2}', False)
