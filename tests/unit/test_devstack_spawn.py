"""make run's stop never leaves a child behind: a signal that lands while a child
process is being started is raised only once the child is recorded."""

from __future__ import annotations

import pytest

from devstack.processes import defer_while_spawning, spawning


def test_a_stop_while_a_child_starts_is_raised_once_it_is_recorded() -> None:
    recorded: list[str] = []
    with pytest.raises(KeyboardInterrupt), spawning():
        assert defer_while_spawning(KeyboardInterrupt())  # the handler fires inside Popen
        recorded.append("child")  # ... which still returns, and the child is recorded
    assert recorded == ["child"]


def test_outside_a_spawn_the_handler_raises_at_once() -> None:
    assert not defer_while_spawning(KeyboardInterrupt())
    with spawning():
        pass  # nothing deferred, nothing raised
