"""The bounded send queue."""

from __future__ import annotations

from services.gateway.outbox import Outbox


async def test_items_come_out_in_order() -> None:
    """What is put comes out in order."""
    outbox: Outbox[int] = Outbox(3)
    for item in (1, 2, 3):
        outbox.put(item)
    assert [await outbox.get() for _ in range(3)] == [1, 2, 3]


async def test_overflow_drops_everything_and_ends() -> None:
    """One item past the bound marks it overflowed; get then returns None, memory is freed."""
    outbox: Outbox[int] = Outbox(2)
    for item in (1, 2, 3):
        outbox.put(item)
    assert outbox.overflowed.is_set()
    assert not outbox.items
    outbox.put(4)
    assert await outbox.get() is None


async def test_room_waits_until_half_empty() -> None:
    """room() returns at once when at most half full, else once the writer drained it."""
    import asyncio

    outbox: Outbox[int] = Outbox(4)
    outbox.put(1)
    assert await outbox.room() == 3
    for item in (2, 3):
        outbox.put(item)
    waiting = asyncio.create_task(outbox.room())
    await asyncio.sleep(0)
    assert not waiting.done()
    await outbox.get()
    assert await waiting == 2
