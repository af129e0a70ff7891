"""The bounded send queue."""

from __future__ import annotations

import asyncio

from services.gateway.outbox import Outbox


async def test_items_come_out_in_order() -> None:
    """What is put comes out in order."""
    outbox: Outbox[int] = Outbox(3)
    for item in (1, 2, 3):
        outbox.put(item)
    assert [await outbox.get() for _ in range(3)] == [1, 2, 3]
    assert outbox.pop() is None


async def test_overflow_drops_everything_and_ends() -> None:
    """One item past the bound marks it overflowed, once; get then returns None, memory is freed."""
    overflows: list[None] = []
    outbox: Outbox[int] = Outbox(2, on_overflow=lambda: overflows.append(None))
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    for item in (1, 2, 3):
        outbox.put(item)
    assert await waiting is None  # woken by the first item, but it was dropped with the rest
    assert outbox.overflowed and overflows == [None]
    assert not outbox.items
    outbox.put(5)
    outbox.overflow()
    assert await outbox.get() is None and outbox.pop() is None
    assert overflows == [None]


async def test_on_ready_is_called_when_an_empty_outbox_gets_an_item() -> None:
    """The writer is started once per burst: not for items put while others wait."""
    ready: list[int] = []
    outbox: Outbox[int] = Outbox(4, on_ready=lambda: ready.append(len(outbox.items)))
    outbox.put(1)
    outbox.put(2)
    assert ready == [1]
    assert outbox.pop() == 1 and outbox.pop() == 2 and outbox.pop() is None
    outbox.put(3)
    assert ready == [1, 1]


async def test_get_waits_for_an_item() -> None:
    outbox: Outbox[int] = Outbox(4)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.put(7)
    assert await waiting == 7


async def test_room_waits_until_half_empty() -> None:
    """room() returns at once when at most half full, else once the writer drained it."""
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
