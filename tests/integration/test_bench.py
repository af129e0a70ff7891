"""The benchmark's smoke run: every scenario once, tiny, so `make bench` cannot rot.

It asserts what the benchmark checks (nothing lost, duplicated or reordered,
every report file written), never a speed: speed is what the full run reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_smoke_run_writes_a_complete_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=230,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())

    stream_points = [*results["latency"], *results["capacity"], results["cpu_point"]["ours"], results["cpu_point"]["relay"]]
    for point in stream_points:
        assert point["check"] == {"lost_tokens": 0, "gaps": 0, "duplicates": 0, "bad_done": 0, "failed_streams": 0}, point
        assert point["window_tokens"] > 0
        assert set(point["cpu_s_per_1k_tokens"]) >= {"total"}
    assert set(results["cpu_point"]["ours"]["cpu_s"]) == {"gateway", "worker", "buffer", "nats-server", "redis-server"}
    assert not any(results["controls"]["check"].values())
    assert results["controls"]["cycles"] == 3 and results["controls"]["chunks_while_paused"] == 0
    assert results["reconnect"]["check"] == {"lost_tokens": 0, "gaps": 0, "duplicates": 0}
    assert results["reconnect"]["missed_tokens"] == 300
    assert results["idle"]["connections"] == 50 and results["idle"]["failed"] == 0

    page = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in page and results["meta"]["machine"]["cpu"] in page
    for image in ("bench-latency.png", "bench-cpu.png"):
        assert (tmp_path / "images" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
