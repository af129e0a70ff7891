"""Exponential backoff with full jitter, as a pure object.

The caller passes the random number in (``random.random()`` in production, a
fixed value in tests) and does the sleeping; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays for reconnect attempts: ``uniform(0, min(cap, initial * factor**n))``.

    Args:
        initial_s: the ceiling of the first delay.
        cap_s: the largest ceiling.
        factor: growth of the ceiling per attempt.
        max_attempts: attempts before giving up; None retries forever.
        healthy_after_s: a connection that lasted this long resets the schedule.
    """

    initial_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    max_attempts: int | None = None
    healthy_after_s: float = 5.0
    attempt: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.cap_s) or self.factor < 1:
            raise ValueError(
                f"backoff needs 0 < initial_s <= cap_s and factor >= 1, got {self.initial_s}, {self.cap_s}, {self.factor}"
            )
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0 or None, got {self.max_attempts}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay of attempt number ``attempt`` (0-based)."""
        # Stop multiplying once capped: factor**attempt overflows for long outages.
        ceiling = self.initial_s
        for _ in range(attempt):
            ceiling *= self.factor
            if ceiling >= self.cap_s:
                return self.cap_s
        return min(ceiling, self.cap_s)

    def next_delay(self, random: float) -> float | None:
        """The delay before the next attempt, or None when attempts are used up.

        Args:
            random: a number in [0, 1), the jitter.
        """
        if self.max_attempts is not None and self.attempt >= self.max_attempts:
            return None
        delay = random * self.ceiling(self.attempt)
        self.attempt += 1
        return delay

    def connection_ended(self, lasted_s: float) -> None:
        """Reset the schedule if the connection stayed up long enough."""
        if lasted_s >= self.healthy_after_s:
            self.reset()

    def reset(self) -> None:
        self.attempt = 0
