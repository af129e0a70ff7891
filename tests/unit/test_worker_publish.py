"""CHAT_FRAME_INTERVAL_MS, the worker's frame-rate cap: read in milliseconds, 0 to 1,000; anything
else stops the worker at start-up with a message naming the variable and the value."""

from __future__ import annotations

import pytest

from services.llm_worker.settings import Settings
from shared.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 0.01), ("0", 0.0), ("12.5", 0.0125), ("1000", 1.0)]
)
def test_the_cap_is_read_in_milliseconds(value: str | None, seconds: float) -> None:
    environ = {} if value is None else {"CHAT_FRAME_INTERVAL_MS": value}
    assert Settings.from_env(environ).frame_interval_s == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "has value '-1'. Must be at least 0"),
        ("abc", "has value 'abc'. Not a valid float"),
        ("1001", "has value '1001'. Must be at most 1000"),
        ("nan", "has value 'nan'. Must be a finite number"),
        ("inf", "has value 'inf'. Must be a finite number"),
    ],
)
def test_a_bad_cap_stops_the_worker_with_a_clear_message(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^Config 'CHAT_FRAME_INTERVAL_MS' " + message.replace(".", r"\.")):
        Settings.from_env({"CHAT_FRAME_INTERVAL_MS": value})
