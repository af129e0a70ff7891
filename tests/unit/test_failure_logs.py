"""A failing test's report carries the service logs of every stack it used, and
the contract violations its wire checkers recorded."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER = '''
import pytest

from tests.stack import Stack


class Process:
    """Stands in for a service process: a name, its output, nothing to stop."""

    def __init__(self, name):
        self.name = name

    def output(self):
        return f"last words of {self.name}"

    def stop(self):
        pass


def make(name):
    stack = Stack(nats_url="nats://127.0.0.1:1", redis_url="redis://127.0.0.1:1/0")
    stack.processes.append(Process(name))
    return stack


@pytest.fixture(scope="module")
def shared_stack():
    with make("fixture-gateway") as stack:
        yield stack


def test_made_inside(shared_stack):
    with make("inner-gateway"):
        pass
    assert False, "fails after its own stack is gone"


def test_next(shared_stack):
    assert False, "fails without a stack of its own"


def test_violation_seen_by_a_tap():
    from tests.wire import WireChecker

    tap = WireChecker().tap()
    tap.opened("/ws?session=s&last_seq=0")
    tap.received('{"type":"ready","session":"s","last_seq":3,"paused":false}')
    tap.received('{"type":"chunk","seq":2,"turn":1,"text":"x"}')
    raise TimeoutError("the client waited for a frame that never came")
'''

CONFTEST = "from tests.conftest import pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401\n"


def test_failure_report_has_logs_of_every_stack_used(pytester: pytest.Pytester) -> None:
    """Logs of a fixture's stack and of one the test made and exited are both
    attached; a stack made by an earlier test is not, nor one alive but unused
    (the outer session's stacks, when this runs after integration tests)."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    failed = {r.nodeid.rsplit("::", 1)[-1]: r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed}  # type: ignore[attr-defined]
    made_inside = dict(failed["test_made_inside"].sections)
    assert made_inside["service logs (shared_stack)"].endswith("last words of fixture-gateway")
    inner = [text for name, text in made_inside.items() if name.startswith("service logs (stack ")]
    assert len(inner) == 1 and inner[0].endswith("last words of inner-gateway")
    following = [name for name, _ in failed["test_next"].sections if name.startswith("service logs")]
    assert following == ["service logs (shared_stack)"]
    timed_out = dict(failed["test_violation_seen_by_a_tap"].sections)
    assert "a gap: seq 2 after 0" in timed_out["wire contract violations"]  # the cause, though the test only timed out
