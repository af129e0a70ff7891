"""The worker's lease keeper and failure messages, against a stand-in session store (no servers)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.llm_worker.service import LeaseLost, LeaseRenewals, Turn, Worker, failure_message
from services.llm_worker.settings import Settings
from shared.errors import BrokerUnavailable, UpstreamError
from shared.messages import TurnRequest
from shared.store import Renewal

LEASE_S = 0.03  # renewals every 10 ms


class Store:
    """Answers renewals with ``renewal``; with ``swallow``, a renewal in flight ignores cancellation
    and returns once ``release`` is set, as redis-py's commands have done (redis/redis-py#2028, #2551)."""

    def __init__(self, renewal: Renewal, *, swallow: bool = False) -> None:
        self.renewal = renewal
        self.swallow = swallow
        self.renewals = 0
        self.in_call = asyncio.Event()
        self.release = asyncio.Event()

    async def renew_lease(self, session: str, turn: int, worker: str, *, lease_until: float) -> Renewal:
        self.renewals += 1
        self.in_call.set()
        if self.swallow:
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    pass  # the bug being modelled
        return self.renewal

    async def renew_leases(self, leases: list[tuple[str, int, str, float]]) -> list[Renewal]:
        return [await self.renew_lease(s, t, w, lease_until=until) for s, t, w, until in leases]


def keeper_for(store: Store) -> tuple[Turn, asyncio.Task[None]]:
    worker = Worker(Settings(lease_s=LEASE_S), nc=None, js=None, store=store, provider=None)  # type: ignore[arg-type]
    turn = Turn(request=TurnRequest(session="s", turn=1, prompt="p", base_seq=0, enqueued_at=time.time()))
    turn.producer = asyncio.create_task(asyncio.Event().wait())  # stands for the model stream
    turn.trust_lease(time.monotonic() + LEASE_S)  # as the claim does
    return turn, asyncio.create_task(worker._keep_lease(turn))


async def test_keeper_ends_with_its_turn_even_if_a_renewal_swallows_the_cancel(caplog: pytest.LogCaptureFixture) -> None:
    """A renewal in flight when the turn ends, which ignores the cancel and then finds the turn gone,
    neither reports the lease lost nor renews again: the keeper ends with the turn."""
    store = Store(Renewal(ours=False, stop_requested=False), swallow=True)
    turn, keeper = keeper_for(store)
    await store.in_call.wait()
    turn.finished.set()  # the turn ended (its done is stored: the record no longer has it) ...
    keeper.cancel()  # ... and the worker cancels the keeper, which the renewal swallows
    store.release.set()
    await asyncio.wait([keeper], timeout=1.0)  # the renewals' round trip swallows the cancel, not the keeper
    assert keeper.done()
    await asyncio.sleep(0)  # the round trip's results reach no one
    assert store.renewals == 1 and not turn.reaped and not turn.producer.cancelled()  # type: ignore[union-attr]
    assert "lease lost" not in caplog.text
    turn.producer.cancel()  # type: ignore[union-attr]


async def test_keeper_reports_a_lease_lost_while_the_turn_runs(caplog: pytest.LogCaptureFixture) -> None:
    """A renewal refused while the turn still generates means a reaper ended it: stop the model, publish nothing."""
    caplog.set_level(logging.WARNING)
    turn, keeper = keeper_for(Store(Renewal(ours=False, stop_requested=False)))
    await asyncio.wait_for(keeper, 1.0)
    assert turn.reaped and "lease lost" in caplog.text
    with pytest.raises(asyncio.CancelledError):
        await turn.producer  # type: ignore[misc]


async def test_keeper_obeys_a_stop_read_from_the_record() -> None:
    """A stop whose broadcast the worker missed is read at a renewal and stops the model."""
    store = Store(Renewal(ours=True, stop_requested=True))
    turn, keeper = keeper_for(store)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(turn.producer, 1.0)  # type: ignore[arg-type]
    assert turn.stop_requested and not turn.reaped
    turn.finished.set()
    await asyncio.wait_for(keeper, 1.0)


async def test_frames_wait_while_the_lease_is_not_trusted() -> None:
    """Past the trusted part of its lease (Redis away), a frame waits; a renewal lets it go,
    and a lease taken by a reaper means it is never published."""
    worker = Worker(Settings(lease_s=LEASE_S), nc=None, js=None, store=None, provider=None)  # type: ignore[arg-type]
    turn = Turn(request=TurnRequest(session="s", turn=1, prompt="p", base_seq=0, enqueued_at=time.time()))
    waiting = asyncio.create_task(worker._within_lease(turn))
    await asyncio.sleep(0)
    assert not waiting.done()
    turn.trust_lease(time.monotonic() + 60)
    await asyncio.wait_for(waiting, 1.0)
    turn.trust_lease(0.0)
    waiting = asyncio.create_task(worker._within_lease(turn))
    await asyncio.sleep(0)
    turn.abandon()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(waiting, 1.0)


class CountingStore:
    """Answers every renewal ``ours``; records each round trip's batch, held until ``release`` is set."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = asyncio.Event()

    async def renew_leases(self, leases: list[tuple[str, int, str, float]]) -> list[Renewal]:
        self.batches.append(len(leases))
        await self.release.wait()
        return [Renewal(ours=True, stop_requested=False) for _ in leases]


async def test_renewals_gather_while_one_round_trip_is_in_flight() -> None:
    """The first renewal goes alone; the 99 asked while it is in flight go together in the next."""
    store = CountingStore()
    renewals = LeaseRenewals(store)  # type: ignore[arg-type]
    first = asyncio.create_task(renewals.renew("s0", 1, "w", lease_until=0.0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    rest = [asyncio.create_task(renewals.renew(f"s{n}", 1, "w", lease_until=0.0)) for n in range(1, 100)]
    await asyncio.sleep(0)
    store.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 1.0)
    assert store.batches == [1, 99] and all(r.ours for r in results)


async def test_a_failed_round_trip_fails_each_renewal_in_it() -> None:
    class Failing:
        async def renew_leases(self, leases: list[tuple[str, int, str, float]]) -> list[Renewal]:
            raise BrokerUnavailable("the session store is unavailable")

    renewals = LeaseRenewals(Failing())  # type: ignore[arg-type]
    calls = [renewals.renew(f"s{n}", 1, "w", lease_until=0.0) for n in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, BrokerUnavailable) for r in results)


def test_failure_messages_name_the_cause() -> None:
    """A done's error message is the model API's own, the store's unavailability, or the exception's type."""
    assert failure_message(UpstreamError("The model API answered HTTP 500.")) == "The model API answered HTTP 500."
    assert "session store" in failure_message(BrokerUnavailable("redis down"))
    message = failure_message(UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed"))
    assert "UnicodeEncodeError" in message and "\ud83d" not in message
