"""The token bucket."""

from __future__ import annotations

from shared.ratelimit import TokenBucket


def test_burst_then_rate() -> None:
    """A full bucket allows a burst, then refills at the rate, never beyond the burst."""
    bucket = TokenBucket(rate_per_s=2, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False  # 0.8 of a token
    assert bucket.take(0.5) is True  # 1.0
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
