"""Pulling from a JetStream pull consumer: no more than asked for, and never
waiting for a fuller batch than is there.

Workers pull turn requests (never one there is no room for), buffers pull
generated frames (whatever is there, up to a batch). nats-py's ``fetch(n)``
fits neither: once it has waited for a first message it goes on waiting, up
to its timeout, for the rest of ``n``, so a batch's first frame can wait for
frames that have not been generated yet. And it can return while its pull request still lingers on the
server (a status message meant for an earlier request ends the wait early),
and the messages that request goes on delivering wait in the subscription
until the next fetch, which takes all of them, however many slots are free.
A worker that fills up meanwhile sits on requests it cannot start while
another worker idles, until their claim deadline ends them with "no model
worker was free" (seen with 32 slow turns on two workers of 16 slots).

Here a pull is over before :meth:`Puller.pull` returns: it asks for
what is there without waiting (``no_wait``), and only if nothing is, waits
for exactly one. Every pull request has a reply subject of its own, so a
status that ends an earlier one cannot end the current one. A message that
arrives while no pull is waiting, or past the room asked for, is handed back
at once (``nak``) for another worker to take. The pull request
fields are JetStream's ``CONSUMER.MSG.NEXT`` API (nats-server's
``consumer.go``, ``processNextMsgRequest``).

A waiting pull asks the server for a heartbeat (status 100) every
:data:`PULL_HEARTBEAT_S` while it waits, and one not heard from for
:data:`PULL_LOST_S` is taken as gone and ended here, so the caller asks
again. The server can lose a waiting pull without a word: seen with
nats-server 2.9.10 with both cores busy, 3 pulls in about 600, no 408 and no
delivery, and a burst of requests then waited out the pull's whole expiry
(1 s) plus the grace for its missing end, 0.5-1 s past arrival, on a worker
with free slots.

A pull answered "no responders" (status 503) found no consumer: it, or its
stream, was deleted (a nats-server restart does that to a memory-storage
stream). The pull raises :class:`ConsumerLost` instead of returning at once,
empty, in a loop; the next pull makes the streams again (``restore``) and
then the consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

__all__ = ["ConsumerLost", "Puller"]

log = logging.getLogger(__name__)

HEARTBEAT = "100"  # a status that does not end a pull request
NO_RESPONDERS = "503"  # nobody serves the pull's subject: the consumer (or its stream) is gone
PULL_GRACE_S = 1.0  # past its expiry, the server's end of a pull is taken as lost
PULL_HEARTBEAT_S = 0.1  # a waiting pull's heartbeat interval: an idle worker spends ~0.4 ms CPU on each
PULL_LOST_S = 3 * PULL_HEARTBEAT_S  # a waiting pull not heard from for this long is gone


class ConsumerLost(Exception):
    """The consumer is gone (its stream deleted or recreated); the next pull creates it again."""


@dataclass
class _Pull:
    reply: str
    room: int
    heard: float  # loop time the server last showed it holds this pull (sent, heartbeat, delivery)
    lost: bool = False  # answered "no responders"
    msgs: list[Msg] = field(default_factory=list)
    over: asyncio.Event = field(default_factory=asyncio.Event)


class Puller:
    """Pulls messages of one durable pull consumer, at most as many as the caller has room for.

    Used by the worker (turn requests) and the buffer (generated frames).
    """

    def __init__(
        self, nc: NATS, js: JetStreamContext, *, stream: str, config: ConsumerConfig,
        restore: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``restore`` makes the streams again (shared.broker.Streams.restore) before a
        lost consumer is made again."""
        assert config.durable_name is not None
        self.nc = nc
        self.js = js
        self.restore = restore
        self.stream = stream
        self.config = config
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{config.durable_name}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._pull: _Pull | None = None
        self._serial = 0
        self._lost = False

    async def start(self) -> None:
        """Create the durable consumer, or bring an existing one's settings
        (``ack_wait``) up to date, and listen for deliveries."""
        await self.js.add_consumer(self.stream, self.config)
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def pull(self, room: int, *, wait_s: float) -> list[Msg]:
        """Return up to ``room`` messages: what is waiting, else the first to
        arrive within ``wait_s``, else none.

        Raises :class:`ConsumerLost` if the consumer is gone, and whatever
        nats-py raises for the JetStream API if it cannot be created again
        (its stream is not back yet): the caller waits a moment and pulls again.
        """
        if self._lost:
            if self.restore is not None:
                await self.restore()
            await self.js.add_consumer(self.stream, self.config)
            self._lost = False
            log.info("consumer created again", extra={"event": "consumer_restored", "consumer": self.config.durable_name})
        msgs = await self._request(room)
        if msgs:
            return msgs
        return await self._request(1, expires_s=wait_s)

    async def _request(self, batch: int, *, expires_s: float | None = None) -> list[Msg]:
        """One pull request, over when this returns: ``no_wait`` without ``expires_s``;
        with it, also over once the server's heartbeats stop (:data:`PULL_LOST_S`)."""
        body: dict[str, object] = {"batch": batch}
        beating = expires_s is not None and expires_s >= 2 * PULL_HEARTBEAT_S
        if expires_s is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires_s * 1e9)  # nanoseconds
        if beating:
            body["idle_heartbeat"] = int(PULL_HEARTBEAT_S * 1e9)
        loop = asyncio.get_running_loop()
        self._serial += 1
        pull = self._pull = _Pull(reply=f"{self._inbox}.{self._serial}", room=batch, heard=loop.time())
        deadline = pull.heard + (expires_s or 0.0) + PULL_GRACE_S
        try:
            await self.nc.publish(self.api_subject, json.dumps(body).encode(), reply=pull.reply)
            while not pull.over.is_set():
                timeout = min(deadline, pull.heard + PULL_LOST_S) if beating else deadline
                if timeout <= loop.time():
                    if beating and loop.time() < deadline:
                        log.info("a waiting pull went unheard: asking again", extra={"event": "pull_lost"})
                    break  # whatever the server sends this pull later is handed back
                try:
                    await asyncio.wait_for(pull.over.wait(), timeout - loop.time())
                except TimeoutError:
                    pass  # a heartbeat may have moved pull.heard: look again
        finally:
            self._pull = None
        if pull.lost:
            self._lost = True
            raise ConsumerLost(f"no consumer {self.config.durable_name} on stream {self.stream}")
        return pull.msgs

    async def _on_msg(self, msg: Msg) -> None:
        # A status comes on the reply subject of the pull it ends (one for an
        # earlier pull is stale); a message comes on its stream subject.
        status = JetStreamContext.is_status_msg(msg)
        pull = self._pull
        if status is not None:
            if pull is not None and msg.subject == pull.reply:
                pull.heard = asyncio.get_running_loop().time()
                if status == NO_RESPONDERS:
                    pull.lost = True
                if status != HEARTBEAT:
                    pull.over.set()  # 404 no messages, 408 expired or requests pending, 409: this pull is over
            return
        if pull is None or len(pull.msgs) >= pull.room:
            await self._hand_back(msg)
            return
        pull.msgs.append(msg)
        if len(pull.msgs) == pull.room:
            pull.over.set()

    async def _hand_back(self, msg: Msg) -> None:
        try:
            await msg.nak()  # redelivered at once, to whichever worker asks next
        except Exception as exc:  # not acked: redelivered after ack_wait instead
            log.warning("could not hand back a request: %s", exc, extra={"event": "hand_back_failed"})
