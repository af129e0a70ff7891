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
