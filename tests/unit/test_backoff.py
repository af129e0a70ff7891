"""The reconnect schedule: bounds, cap, jitter range, attempts and reset."""

from __future__ import annotations

import pytest

from shared.backoff import Backoff


def test_ceilings_grow_by_factor_up_to_cap() -> None:
    """Ceilings are initial * factor**n, never above the cap."""
    backoff = Backoff(initial_s=0.5, cap_s=5.0, factor=2.0)
    assert [backoff.ceiling(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.ceiling(10_000) == 5.0  # no overflow on long outages


@pytest.mark.parametrize("random", [0.0, 0.25, 0.999999])
def test_full_jitter_spans_zero_to_ceiling(random: float) -> None:
    """Each delay is random * ceiling: anywhere in [0, ceiling)."""
    backoff = Backoff(initial_s=1.0, cap_s=8.0, factor=2.0)
    delays = [backoff.next_delay(random) for _ in range(5)]
    assert delays == [random * c for c in (1.0, 2.0, 4.0, 8.0, 8.0)]
    assert all(d is not None and 0 <= d < 8.0 for d in delays)


def test_max_attempts_then_none() -> None:
    """After max_attempts delays the schedule says stop."""
    backoff = Backoff(initial_s=1.0, cap_s=2.0, max_attempts=2)
    assert backoff.next_delay(0.5) == 0.5
    assert backoff.next_delay(0.5) == 1.0
    assert backoff.next_delay(0.5) is None
    assert Backoff(max_attempts=0).next_delay(0.5) is None


def test_healthy_connection_resets_short_one_does_not() -> None:
    """A connection that lasted healthy_after_s restarts the schedule."""
    backoff = Backoff(initial_s=1.0, cap_s=60.0, healthy_after_s=5.0)
    for _ in range(3):
        backoff.next_delay(1.0)
    backoff.connection_ended(lasted_s=1.0)
    assert backoff.attempt == 3
    backoff.connection_ended(lasted_s=5.0)
    assert backoff.attempt == 0
    assert backoff.next_delay(1.0) == 1.0


@pytest.mark.parametrize(("kwargs"), [{"initial_s": 0}, {"initial_s": 5, "cap_s": 1}, {"factor": 0.5}, {"max_attempts": -1}])
def test_bad_parameters_rejected(kwargs: dict[str, float]) -> None:
    """Impossible schedules fail at construction with the values named."""
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]
