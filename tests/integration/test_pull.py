"""The request puller (shared/pull.py) against a real nats-server: never more than the room asked for,
and a delivery nobody asked for is handed back at once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from devstack.servers import Server
from shared.pull import ConsumerLost, Puller
from tests.stack import TIMEOUT_FACTOR, WAIT_S

# Far above every wait of these tests, so a request back within WAIT_S was handed back, not redelivered.
ACK_WAIT_S = 6 * WAIT_S


async def pulls_waiting(nc: NATS, stream: str) -> None:
    """Until the server holds a pull request of the consumer's (the JetStream API reports it)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            if (await nc.jetstream().consumer_info(stream, "workers")).num_waiting:
                return
            await asyncio.sleep(0.01)  # the server has no notice for it: ask again


@pytest.fixture
async def jetstream(nats_server: Server) -> AsyncIterator[tuple[NATS, str, ConsumerConfig]]:
    """A fresh stream and consumer config for each test."""
    nc = await nats.connect(nats_server.url)
    name = "T" + uuid.uuid4().hex[:10]
    await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{name}.requests"]))
    config = ConsumerConfig(
        durable_name="workers", filter_subject=f"{name}.requests", ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S
    )
    try:
        yield nc, name, config
    finally:
        await nc.jetstream().delete_stream(name)
        await nc.close()


async def puller(nc: NATS, stream: str, config: ConsumerConfig) -> Puller:
    pulling = Puller(nc, nc.jetstream(), stream=stream, config=config)
    await pulling.start()
    return pulling


async def test_a_pull_takes_no_more_than_its_room(jetstream: tuple[NATS, str, ConsumerConfig]) -> None:
    """Five waiting requests, pulls of room 2: 2, 2, 1, then none after the wait; each exactly once."""
    nc, stream, config = jetstream
    requests = await puller(nc, stream, config)
    for n in range(5):
        await nc.jetstream().publish(f"{stream}.requests", str(n).encode())
    seen: list[bytes] = []
    for expected in (2, 2, 1, 0):
        msgs = await requests.pull(2, wait_s=0.2 * TIMEOUT_FACTOR)
        assert len(msgs) == expected
        for msg in msgs:
            seen.append(msg.data)
            await msg.ack()
    assert seen == [b"0", b"1", b"2", b"3", b"4"]
    await requests.close()


async def test_an_idle_pull_returns_the_first_request_at_once(jetstream: tuple[NATS, str, ConsumerConfig]) -> None:
    """With nothing waiting, a pull returns as soon as one request arrives, not at the end of its wait."""
    nc, stream, config = jetstream
    requests = await puller(nc, stream, config)
    pulling = asyncio.create_task(requests.pull(16, wait_s=3 * WAIT_S))  # far past the wait below
    await pulls_waiting(nc, stream)
    await nc.jetstream().publish(f"{stream}.requests", b"late")
    msgs = await asyncio.wait_for(pulling, WAIT_S)
    assert [m.data for m in msgs] == [b"late"]
    await requests.close()


async def test_a_delivery_for_a_pull_that_is_over_is_handed_back(jetstream: tuple[NATS, str, ConsumerConfig]) -> None:
    """A request delivered to a worker that did not ask for it (a pull it had given up on) goes back at once,
    and another worker gets it within moments, not after the ack wait."""
    nc, stream, config = jetstream
    busy = await puller(nc, stream, config)
    idle = await puller(nc, stream, config)
    # A pull request with a reply subject of the busy worker's that no pull of its is waiting on.
    stale = {"batch": 1, "expires": int(WAIT_S * 1e9)}
    await nc.publish(busy.api_subject, json.dumps(stale).encode(), reply=f"{busy._inbox}.stale")
    await nc.flush()
    await nc.jetstream().publish(f"{stream}.requests", b"orphan")
    msgs: list[Msg] = []
    async with asyncio.timeout(WAIT_S):  # a sixth of the ack wait
        while not msgs:
            msgs = await idle.pull(1, wait_s=0.5)
    assert [m.data for m in msgs] == [b"orphan"]
    await busy.close()
    await idle.close()


async def test_a_waiting_pull_the_server_lost_is_asked_again_at_once(
    jetstream: tuple[NATS, str, ConsumerConfig],
) -> None:
    """The server can lose a waiting pull without a word (nats-server 2.9.10 under load: no 408, no delivery).
    A request published then is taken within moments (the heartbeats stop), not after the pull's expiry."""
    nc, stream, config = jetstream
    requests = await puller(nc, stream, config)
    lost = asyncio.Event()
    send = requests.nc.publish

    async def losing(subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None) -> None:
        if b'"expires"' in payload and not lost.is_set():
            lost.set()  # the first waiting pull never reaches the server, as if it had dropped it
            return
        await send(subject, payload, reply, headers)

    requests.nc.publish = losing  # type: ignore[method-assign]
    wait_s = 6 * WAIT_S  # a pull's expiry, far past the bound below
    pulling = asyncio.create_task(requests.pull(4, wait_s=wait_s))
    await lost.wait()
    await nc.jetstream().publish(f"{stream}.requests", b"meanwhile")
    msgs: list[Msg] = []
    async with asyncio.timeout(WAIT_S):
        msgs = await pulling
        while not msgs:
            msgs = await requests.pull(4, wait_s=wait_s)
    assert [m.data for m in msgs] == [b"meanwhile"]
    await requests.close()


async def test_a_deleted_consumer_raises_once_then_is_created_again(
    jetstream: tuple[NATS, str, ConsumerConfig],
) -> None:
    """A pull whose consumer is gone raises ConsumerLost at once (no empty pulls in a
    loop); the next pull makes the consumer again and takes what is waiting."""
    nc, stream, config = jetstream
    requests = await puller(nc, stream, config)
    await nc.jetstream().delete_consumer(stream, "workers")
    with pytest.raises(ConsumerLost):
        await asyncio.wait_for(requests.pull(2, wait_s=3 * WAIT_S), WAIT_S)
    await nc.jetstream().publish(f"{stream}.requests", b"after")
    msgs = await requests.pull(2, wait_s=WAIT_S)
    assert [msg.data for msg in msgs] == [b"after"]
    await requests.close()
