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

    intact = {"lost_tokens": 0, "gaps": 0, "duplicates": 0, "bad_done": 0, "failed_streams": 0}
    points = results["points"]
    assert set(points) == {"50x50", "200x20", "20x500"}
    assert all(set(variants) == {"cap", "nocap", "relay"} for variants in points.values())
    stream_points = [*results["latency"], *results["capacity"], *results["storage"].values(),
                     *(p for variants in points.values() for p in variants.values())]
    for point in stream_points:
        assert point["check"] == intact, point
        assert point["window_tokens"] > 0
        assert set(point["cpu_s_per_1k_tokens"]) >= {"total"}
    assert set(points["50x50"]["cap"]["cpu_s"]) == {"gateway", "worker", "buffer", "nats-server", "redis-server"}
    assert set(points["50x50"]["relay"]["cpu_s"]) == {"relay", "nats-server"}
    assert set(results["storage"]) == {"file", "memory"}
    assert not any(results["controls"]["check"].values())
    assert results["controls"]["cycles"] == 3 and results["controls"]["chunks_while_paused"] == 0
    assert results["reconnect"]["check"] == {"lost_tokens": 0, "gaps": 0, "duplicates": 0}
    assert results["reconnect"]["missed_tokens"] == 300
    assert results["idle"]["connections"] == 50 and results["idle"]["failed"] == 0
    for side in ("ours", "relay"):  # every held token delivered, in order, after at least one pause
        assert results["pauses"][side]["check"] == intact and results["pauses"][side]["pause_cycles"] >= 1
    assert results["ttft"]["check"] == intact and results["ttft"]["ttft_ms"]["p50_ms"] > 0
    redis = results["redis"]
    assert redis["check"] == {"gaps": 0, "duplicates": 0}
    assert redis["answer_bytes"] > 0 and redis["redis_bytes"]["log"] > 0 and redis["ratio"] > 0

    page = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in page and results["meta"]["machine"]["cpu"] in page
    targets = page.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert "| (smoke) |" in targets and "**no**" not in targets and "| yes |" not in targets  # tiny loads judge nothing
    for image in ("bench-latency.png", "bench-cpu.png"):
        assert (tmp_path / "images" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
