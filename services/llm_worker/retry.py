"""Whether, and when, to send a failed model request again: a pure decision.

Like ``process_exception()`` in websockets' client, this only decides; the
worker sleeps. A request is sent again only for a failure marked retryable
(connection refused or reset, HTTP 408, 429, 502, 503, 504), only if no text
of the answer reached the user yet (a retry then would repeat it), within the
configured number of retries and the time the turn has left before its queue
deadline. The server's ``Retry-After`` is honoured when it fits; otherwise
the delay is exponential with "equal jitter" (half the ceiling, plus up to
as much again at random): a restarting server gets at least half of each
ceiling to come back, and clients do not all return at once.
"""

from __future__ import annotations

from shared.backoff import Backoff
from shared.errors import UpstreamError

__all__ = ["retry_delay", "RETRY_CAP_S"]

RETRY_CAP_S = 8.0  # the largest delay between two attempts, unless the server asks for more


def retry_delay(
    error: BaseException,
    *,
    attempt: int,
    text_sent: bool,
    retries: int,
    initial_s: float,
    time_left_s: float,
    random: float,
) -> float | None:
    """The delay before sending the request again, or None to give up.

    Args:
        error: why attempt number ``attempt`` (0-based) failed.
        text_sent: whether any answer text was already passed on.
        retries: how many times a request may be sent again.
        initial_s: the first delay's ceiling; it doubles per attempt, up to ``RETRY_CAP_S``;
            a delay is between half the ceiling and the ceiling.
        time_left_s: until the turn's deadline; a retry that cannot start before it is not made.
        random: a number in [0, 1), the jitter.
    """
    if text_sent or attempt >= retries or not isinstance(error, UpstreamError) or not error.retryable:
        return None
    if error.retry_after_s is not None:
        delay = error.retry_after_s
    else:
        ceiling = Backoff(initial_s=initial_s, cap_s=max(initial_s, RETRY_CAP_S)).ceiling(attempt)
        delay = ceiling / 2 + random * ceiling / 2
    return delay if delay < time_left_s else None
