"""The worker loop: pull a turn request only while under the concurrency limit,
stream the model, publish numbered frames, obey ``stop``.

Seq numbering: the gateway claimed the turn in Redis and passed the session's
last seq (``base_seq``); only this worker produces frames for the session
until the turn's ``done`` is stored, so numbering from ``base_seq + 1`` is
gap-free (docs/architecture.md). A seq is used up once its frame is
published; a turn keeps up to ``PUBLISH_WINDOW`` frames in flight (their
JetStream acks come back asynchronously, no round trip awaited per token),
sends again any whose ack failed (its message id makes that idempotent), and
publishes its ``done`` only once every earlier frame is acknowledged.

A stream's frames are at least ``CHAT_FRAME_INTERVAL_MS`` apart: text that
arrives sooner after the last frame waits for the window's end and leaves
with whatever else arrived by then (a stream idle for a window sends its
next text at once), so at real models' rates each hop wakes once per window,
not once per token.

The order of effects per turn is what makes every turn end (docs/protocol.md
guarantee 5):
1. subscribe to the session's controls and flush, so the server holds the
   subscription before the stop flag is read: a ``stop`` is either in the
   record the claim reads or is heard as a broadcast;
2. claim the turn in Redis (which reports a stop already asked for), then
   ack the request;
3. stream the model, publishing chunks, but only while the lease is surely
   ours: the keeper renews it and rereads the stop flag every third of the
   lease, and a frame waits (the model goes on) once the last renewal is two
   thirds of a lease old, so a worker cut off from Redis never publishes
   after the done a reaper gives its turn;
4. publish exactly one ``done``, whatever happened in 3: the model's reason,
   ``length`` at the answer cap, ``stopped``, or ``error`` naming the cause.
   If even that cannot be published, give the turn up: its lease expires at
   once and a buffer's reaper ends it after what the stream really holds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from shared import protocol
from shared.broker import Streams
from shared.errors import BrokerUnavailable, UpstreamError
from shared.messages import TRACE_HEADER, TurnEnd, TurnRequest, decode_control, decode_request
from shared.pull import Puller
from shared.store import Renewal, SessionStore
from shared.subjects import (
    CONSUMER_WORKERS,
    STREAM_REQUESTS,
    SUBJECT_REQUESTS,
    control_subject,
    frame_msg_id,
    generated_subject,
)
from shared.text import SurrogateJoiner, scrub, split_utf8, truncate_utf8

from .metrics import WorkerMetrics
from .providers import Delta, Message, Provider
from .retry import retry_delay
from .settings import Settings

__all__ = ["Worker"]

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 0.25
PUBLISH_GIVE_UP_S = 120.0
PUBLISH_ACK_TIMEOUT_S = 5.0  # an ack not back by then is taken as lost: the frame is sent again
# Frames a turn publishes before it waits for the oldest one's ack: enough
# that a model far faster than JetStream's round trip never waits on it, few
# enough that a broker away holds little.
PUBLISH_WINDOW = 64
PULL_MAX = 64  # turn requests taken per pull, at most
REQUEST_ACK_WAIT_S = 5.0
# A chunk's text is at most this many UTF-8 bytes: coalesced or huge model
# deltas are split, so no frame nears NATS's max_payload (1 MiB by default)
# or a client's frame limit.
MAX_CHUNK_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 500  # a done's error message
# A lease counts as ours until two thirds of it have passed since the renewal
# that extended it was sent: the last third covers clock skew between this
# host and a reaper's, and the renewal's own latency.
LEASE_TRUSTED_FRACTION = 2 / 3
LEASE_RETRY_S = 0.5  # how soon a failed renewal is tried again once the lease is no longer trusted
RESTARTED = "The model worker restarted before the answer finished. Please send it again."
DRAIN_END_S = 5.0  # on shutdown, how long the done of an interrupted turn may take to go out


class PublishFailed(BrokerUnavailable):
    """JetStream did not take a frame for ``PUBLISH_GIVE_UP_S``: the turn is given up."""


class LeaseLost(Exception):
    """The turn's lease went to a reaper, which ends the turn: publish nothing more."""


class Ending(NamedTuple):
    """How a turn ends: its ``done``'s reason, message and code, and what the
    model server said of the answer (its finish reason, response id, usage)."""

    reason: str
    message: str | None = None
    code: str | None = None
    details: dict[str, Any] = {}


class InFlight(NamedTuple):
    """A published frame whose JetStream ack has not been read yet."""

    seq: int
    payload: bytes
    ack: asyncio.Future[Any] | None  # None: the publish itself failed; send it again
    sent_at: float = 0.0  # monotonic; the ack is taken as lost PUBLISH_ACK_TIMEOUT_S after it


@dataclass
class Turn:
    """One claimed turn, from its claim to its ``done``."""

    request: TurnRequest
    trace: str = ""  # from the request's Chat-Trace header, carried on the turn's end
    seq: int = field(init=False)  # the last seq taken (acknowledged by JetStream unless still in flight)
    # Published frames whose ack is not in yet, oldest first: (seq, frame, ack).
    # One whose ack failed is sent again before the done, so no gap precedes it.
    in_flight: deque[InFlight] = field(default_factory=deque)
    last_frame_at: float = -1e9  # monotonic: when the last chunk was published (the frame-rate cap)
    answer_bytes: int = 0
    chunks: int = 0
    stop_requested: bool = False
    reaped: bool = False  # the lease is no longer ours (a reaper ends the turn): publish nothing more
    ending: bool = False  # its done is being published: the record may let the turn go any moment
    started_at: float = 0.0  # monotonic, for the time to first token
    producer: asyncio.Task[None] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    lease_trusted_until: float = 0.0  # monotonic; frames are published only before it
    lease_renewed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.seq = self.request.base_seq

    def request_stop(self) -> None:
        self.stop_requested = True
        if self.producer is not None:
            self.producer.cancel()  # closes the upstream HTTP request

    def trust_lease(self, until: float) -> None:
        self.lease_trusted_until = until
        self.lease_renewed.set()

    def lease_trusted(self) -> bool:
        return time.monotonic() < self.lease_trusted_until

    def abandon(self) -> None:
        self.reaped = True
        self.lease_renewed.set()  # wakes a frame waiting for the lease: it will not be published
        if self.producer is not None:
            self.producer.cancel()


def failure_message(exc: BaseException) -> str:
    """What a user reads in the ``done`` of a turn that failed with ``exc``."""
    if isinstance(exc, UpstreamError):
        return str(exc)
    if isinstance(exc, BrokerUnavailable):
        return "The session store was unavailable, so the answer could not go on. Please try again."
    return f"The model worker failed unexpectedly ({type(exc).__name__}). Please try again."


_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def upstream_failure(exc: BaseException) -> dict[str, Any]:
    """A failed model request for the log: its ``cause`` (``HTTP 503``,
    ``ConnectError: Connection refused``), its HTTP ``status`` if it had one, and
    for an :class:`UpstreamError` what the user is ``told`` and its ``code``."""
    cause = exc.cause if isinstance(exc, UpstreamError) and exc.cause else type(exc).__name__
    # What lay under it (kept as the context of the UpstreamError): the OS's words.
    under, inner, depth = "", exc.__cause__ or exc.__context__, 0
    while inner is not None and depth < 8:
        depth += 1
        text = inner.strerror if isinstance(inner, OSError) and inner.strerror else str(inner)
        under = text or under
        inner = inner.__cause__ or inner.__context__
    if under and under.lower() not in cause.lower():
        cause = f"{cause}: {under}"
    failure: dict[str, Any] = {"cause": cause}
    if match := _HTTP_STATUS.search(cause):
        failure["status"] = int(match.group(1))
    if isinstance(exc, UpstreamError):  # what the user is told: the server's own words, cleaned
        failure["told"] = str(exc)  # not "message": a log record's own attribute
        if exc.code:
            failure["code"] = exc.code
    return failure


class LeaseRenewals:
    """This worker's lease renewals, sent together: while one pipeline is in
    flight the next renewals gather, and then leave in one. Sent one by one, a
    thousand turns' renewals queued for the Redis pool's connections behind an
    event loop saturated by those turns, and under three times the load the
    machine can serve a fifth of the turns lost their lease to a reaper while
    their worker was alive (the benchmark's 1,000 x 30 point)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._pending: list[tuple[tuple[str, int, str, float], asyncio.Future[Renewal]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def renew(self, session: str, turn: int, worker: str, *, lease_until: float) -> Renewal:
        """As SessionStore.renew_lease (raises BrokerUnavailable)."""
        future: asyncio.Future[Renewal] = asyncio.get_running_loop().create_future()
        self._pending.append(((session, turn, worker, lease_until), future))
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results: list[Renewal] | BaseException = await self.store.renew_leases([lease for lease, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets it
                    results = exc
                for index, (_, future) in enumerate(batch):
                    if future.done():  # its turn ended meanwhile
                        continue
                    if isinstance(results, BaseException):
                        future.set_exception(results)  # BrokerUnavailable: Redis away
                    else:
                        future.set_result(results[index])
        finally:
            self._sending = None


class Worker:
    def __init__(
        self, settings: Settings, *, nc: NATS, js: JetStreamContext, store: SessionStore, provider: Provider,
        streams: Streams | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.streams = streams or Streams(js, generated_storage=settings.broker.generated_storage)
        self.store = store
        self.provider = provider
        self.capacity = asyncio.Semaphore(settings.concurrency)
        self.turns: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        # Set once the drain timeout has passed: a turn still running ends at its next
        # chunk even if its cancellation was lost (on Python 3.11 asyncio.wait_for, as
        # nats-py's publish uses it, can swallow a cancel that races its result, bpo-42130).
        self.cutting_off = False
        self.worker_id = uuid.uuid4().hex
        self.metrics = WorkerMetrics()
        self.upstream_url = settings.upstream_url
        self.renewals = LeaseRenewals(store)
        self.taking: set[tuple[str, int]] = set()  # (session, turn) of the requests being taken here
        self.unsure_claims: dict[tuple[str, int], str] = {}  # claim ids whose call failed, for the retry

    async def run(self) -> None:
        """Pull requests until :meth:`stop`; then wait for running turns (bounded)."""
        requests = Puller(
            self.nc,
            self.js,
            stream=STREAM_REQUESTS,
            config=ConsumerConfig(
                durable_name=CONSUMER_WORKERS,
                filter_subject=SUBJECT_REQUESTS,
                ack_policy=AckPolicy.EXPLICIT,
                # A worker acks a request as soon as it has claimed it, within
                # milliseconds; one that froze or died holding a request gives
                # it back to the others after this, well inside the queue timeout.
                ack_wait=REQUEST_ACK_WAIT_S,
                max_ack_pending=-1,
            ),
            restore=self.streams.restore,
        )
        await requests.start()
        log.info(
            "worker ready",
            extra={
                "event": "ready", "concurrency": self.settings.concurrency,
                "frame_interval_ms": round(self.settings.frame_interval_s * 1000, 3), **self.settings.describe_model(),
            },
        )
        try:
            while not self.stopping.is_set():
                slots = await self._free_slots()
                if self.stopping.is_set():
                    self._release(slots)
                    break
                try:
                    msgs = await requests.pull(slots, wait_s=1.0)
                except Exception as exc:  # broker restart: wait it out
                    self._release(slots)
                    log.warning("pull failed: %s", exc, extra={"event": "pull_failed"})
                    await asyncio.sleep(PUBLISH_RETRY_S)
                    continue
                self._release(slots - len(msgs))
                for msg in msgs:
                    task = asyncio.create_task(self._take(msg))
                    self.turns.add(task)
                    task.add_done_callback(self._finished)
        finally:
            await requests.close()
            await self._drain()
            await self.provider.aclose()

    async def _free_slots(self) -> int:
        """Wait for one free slot, then take every other free one (up to a
        pull's worth): one pull per burst of requests, not one per turn,
        or claiming turns falls behind under a burst of new chats. Returns 0
        if the worker is told to stop first: a full worker still drains."""
        acquiring = asyncio.create_task(self.capacity.acquire())
        stopping = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not acquiring.done():
            acquiring.cancel()  # a cancelled acquire takes no slot
            return 0
        slots = 1
        while slots < PULL_MAX and not self.capacity.locked():
            await self.capacity.acquire()  # free: returns at once
            slots += 1
        return slots

    def _release(self, slots: int) -> None:
        for _ in range(slots):
            self.capacity.release()

    async def _drain(self) -> None:
        """Let running turns finish for the drain timeout, then end the rest with done/error."""
        if not self.turns:
            return
        log.info("draining %d turns", len(self.turns), extra={"event": "draining"})
        _, unfinished = await asyncio.wait(self.turns, timeout=self.settings.drain_timeout_s)
        self.cutting_off = True
        for task in unfinished:
            task.cancel()  # generate() publishes the turn's done/error before it ends
        if not unfinished:
            return
        _, stuck = await asyncio.wait(unfinished, timeout=DRAIN_END_S)
        for task in stuck:
            # Its done cannot go out (no trusted lease, or JetStream away): stop
            # trying; the lease runs out and a reaper ends the turn.
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.turns.discard(task)
        self.capacity.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("turn crashed", exc_info=task.exception(), extra={"event": "turn_crashed"})

    def stop(self) -> None:
        self.stopping.set()

    async def _take(self, msg: Msg) -> None:
        try:
            request = decode_request(msg.data)
        except Exception:
            log.error("dropping malformed request", extra={"event": "bad_request"})
            await msg.term()
            return
        turn = Turn(request=request, trace=(msg.headers or {}).get(TRACE_HEADER, ""))
        extra = {"session": request.session, "turn": request.turn, "trace": turn.trace}
        key = (request.session, request.turn)
        if key in self.taking:
            # A redelivery while this worker still holds the turn: left alone (the
            # first delivery acks it, or naks it for a retry).
            log.info("request skipped: being taken here", extra=extra)
            return
        self.taking.add(key)
        try:
            await self._claim_and_generate(msg, turn, key, extra)
        finally:
            self.taking.discard(key)

    async def _claim_and_generate(self, msg: Msg, turn: Turn, key: tuple[str, int], extra: dict[str, Any]) -> None:
        request = turn.request
        sub = None
        try:
            # Step 1: listen for stop before reading the flag (module docstring).
            sub = await self.nc.subscribe(control_subject(request.session), cb=partial(self._on_control, turn))
            await self.nc.flush(timeout=5)
            claimed_at = time.monotonic()
            # A claim whose outcome is unknown (its reply lost: Redis slow under load)
            # is retried with its id, so a claim that did land is this worker's again,
            # not a turn nobody renews until a reaper ends it. Any other delivery
            # claims afresh, so a request delivered again after its turn ran here is
            # refused, not run twice.
            claim_id = self.unsure_claims.pop(key, None) or secrets.token_hex(8)
            try:
                claim = await self.store.claim_turn(
                    request.session, request.turn, self.worker_id, lease_until=time.time() + self.settings.lease_s,
                    claim_id=claim_id,
                )
            except Exception:
                self.unsure_claims[key] = claim_id
                raise
            turn.trust_lease(claimed_at + self.settings.lease_s * LEASE_TRUSTED_FRACTION)
        except Exception as exc:  # NATS or Redis away: try again shortly
            log.warning("could not claim the turn: %s", exc, extra=extra)
            await msg.nak(delay=1.0)
            await self._unsubscribe(sub)
            return
        try:
            # Ack once claimed: a worker that dies mid-turn must not make another
            # start the same turn over (its lease runs out; a reaper ends it).
            # A failed ack only means a redelivery, which the claim refuses.
            try:
                await msg.ack()
            except Exception as exc:
                log.warning("could not ack the request: %s", exc, extra=extra)
            if claim.status != "claimed":
                # Routine: a redelivery, or a turn stopped or timed out before any worker took it.
                log.info("request skipped: turn %s", claim.status, extra=extra)
                return
            turn.stop_requested = turn.stop_requested or claim.stop_requested
            await self.generate(turn)
        finally:
            await self._unsubscribe(sub)

    @staticmethod
    async def _unsubscribe(sub: Subscription | None) -> None:
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except Exception:  # the connection is closed or reconnecting: nothing to undo
            pass

    async def _on_control(self, turn: Turn, msg: Msg) -> None:
        try:
            control = decode_control(msg.data)
        except Exception:
            return
        if control.action == "stop" and control.turn in (None, turn.request.turn):
            turn.request_stop()

    async def generate(self, turn: Turn) -> None:
        """Run one claimed turn to exactly one ``done``, whatever happens."""
        request = turn.request
        extra = {"session": request.session, "turn": request.turn, "trace": turn.trace}
        # The keeper runs until the done is out: the done, like any frame,
        # waits for a trusted lease, and only the keeper can renew it.
        keeper = asyncio.create_task(self._keep_lease(turn))
        cancelled = False
        ending: Ending | None = None  # None: nothing more can be published, a reaper ends the turn
        try:
            try:
                ending = await self._answer(turn)
            except asyncio.CancelledError:
                # The worker is shutting down: end the turn cleanly rather than leave it open.
                cancelled = True
                ending = Ending("error", RESTARTED)
            except (PublishFailed, LeaseLost):
                pass
            except Exception as exc:
                log.error("turn failed", exc_info=exc, extra={**extra, "event": "turn_failed"})
                ending = Ending("error", failure_message(exc))
            finally:
                if turn.producer is not None:
                    turn.producer.cancel()
            if not turn.reaped:
                turn.ending = True
                if ending is not None:
                    await self._end(turn, ending)
                else:
                    await self._abandon(turn)
        finally:
            # The lease keeper must not outlive the turn: a renewal after the
            # turn's end would misreport it as lost (and a Redis call may
            # swallow the cancellation, redis/redis-py#2028, #2551).
            turn.finished.set()
            keeper.cancel()
        if cancelled:
            raise asyncio.CancelledError

    async def _answer(self, turn: Turn) -> Ending:
        """Stream the model into chunks; return how the turn ends."""
        request = turn.request
        waited = time.time() - request.enqueued_at
        if waited > self.settings.queue_timeout_s:
            return Ending("error", "No model worker was free in time. Please try again.", "unavailable")
        if turn.stop_requested:
            return Ending("stopped")
        messages = await self._messages(request)
        if turn.stop_requested:
            return Ending("stopped")
        # Unbounded: the model paces the producer, and the answer cap bounds
        # what one turn takes. None marks the producer's end.
        deltas: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        turn.producer = asyncio.create_task(self._produce(request, messages, deltas))
        turn.producer.add_done_callback(lambda _: deltas.put_nowait(None))
        self.metrics.turns_started.inc()
        self.metrics.queue_wait.observe(max(0.0, waited))
        self.metrics.active_turns.inc()
        turn.started_at = time.monotonic()
        log.info(
            "turn started",
            extra={"session": request.session, "turn": request.turn, "trace": turn.trace,
                   "event": "turn_started", "queued_s": round(waited, 3)},
        )
        try:
            return await self._relay(turn, deltas)
        finally:
            self.metrics.active_turns.dec()

    async def _keep_lease(self, turn: Turn) -> None:
        """Renew the turn's lease every third of it until the turn finishes
        (sooner after a failure, once the lease is no longer trusted); obey a
        stop read from the record; if the turn is no longer ours, stop."""
        request = turn.request
        lease_s = self.settings.lease_s
        while True:
            try:
                wait_s = lease_s / 3 if turn.lease_trusted() else LEASE_RETRY_S
                await asyncio.wait_for(turn.finished.wait(), wait_s)
                return
            except TimeoutError:
                pass
            sent_at = time.monotonic()
            try:
                renewal = await self.renewals.renew(
                    request.session, request.turn, self.worker_id, lease_until=time.time() + lease_s
                )
            except BrokerUnavailable:
                continue  # Redis is away: keep generating (frames wait once the lease is not trusted)
            if turn.finished.is_set():
                return  # ended meanwhile: the record may already say so
            if not renewal.ours:
                if not turn.ending:  # else its done was stored meanwhile, or a reaper's will be
                    log.warning("lease lost; abandoning the turn", extra={"session": request.session, "turn": request.turn})
                turn.abandon()
                return
            turn.trust_lease(sent_at + lease_s * LEASE_TRUSTED_FRACTION)
            if renewal.stop_requested and not turn.stop_requested:
                turn.request_stop()  # the broadcast was missed (a NATS reconnect)

    async def _relay(self, turn: Turn, deltas: asyncio.Queue[Delta | BaseException | None]) -> Ending:
        """Publish deltas as chunks until the stream ends; return how the turn ends."""
        joiner = SurrogateJoiner()  # halves of a character split across deltas
        # Keep-alives and empty events reach no queue: a model that sends no
        # text for this long is stalled, however busy its connection looks.
        stall_s = self.settings.openai.read_timeout_s
        while True:
            if deltas.empty():
                try:
                    async with asyncio.timeout(stall_s):
                        item = await deltas.get()
                except TimeoutError:
                    log.warning(
                        "model stalled",
                        extra={"session": turn.request.session, "turn": turn.request.turn, "event": "upstream_failed",
                               "cause": f"no text for {stall_s:g} s", "upstream": self.upstream_url},
                    )
                    return Ending("error", f"The model sent no text for {stall_s:g} s. Try again later.")
            else:
                item = deltas.get_nowait()
            if isinstance(item, Delta) and item.finish_reason is None:
                # The frame-rate cap: sooner than a window after the last frame,
                # wait for its end; the text arriving meanwhile joins this frame.
                wait_s = turn.last_frame_at + self.settings.frame_interval_s - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
            texts: list[str] = []
            # Coalesce what is queued into one chunk; an idle stream (its
            # last frame a window ago) sends its text at once.
            while isinstance(item, Delta):
                texts.append(joiner.feed(item.text))
                if item.finish_reason is not None or deltas.empty():
                    break
                item = deltas.get_nowait()
            ended = not isinstance(item, Delta) or item.finish_reason is not None
            if ended:
                texts.append(joiner.flush())
            if turn.stop_requested:
                return Ending("stopped")  # a stop beats whatever the model sent meanwhile
            if self.cutting_off:
                return Ending("error", RESTARTED)
            if not await self._publish_text(turn, "".join(texts)):
                # Cut short: by a stop that came while publishing, or by the answer cap.
                return Ending("stopped") if turn.stop_requested else Ending("length")
            if not ended:
                continue
            if isinstance(item, Delta):
                assert item.finish_reason is not None
                return Ending(item.finish_reason, details=item.details)
            if isinstance(item, BaseException):
                if not isinstance(item, UpstreamError):
                    log.error("provider failed", exc_info=item, extra={"session": turn.request.session})
                if isinstance(item, UpstreamError):
                    return Ending("error", failure_message(item), item.code, item.details)
                return Ending("error", failure_message(item))
            if turn.stop_requested:
                return Ending("stopped")
            return Ending("error", "The model stopped without finishing. Please try again.")

    async def _publish_text(self, turn: Turn, text: str) -> bool:
        """Publish ``text`` as chunks of at most ``MAX_CHUNK_BYTES``; False if
        cut short, by a stop or by the answer cap (what fits is published)."""
        if not text:
            return True
        size = len(text) if text.isascii() else len(text.encode())
        room = self.settings.max_answer_bytes - turn.answer_bytes
        capped = size > room
        if capped:
            text = truncate_utf8(text, room)
            size = len(text.encode())
        for piece in split_utf8(text, MAX_CHUNK_BYTES):
            if turn.stop_requested:
                return False
            await self._publish_chunk(turn, piece)
        turn.answer_bytes += size
        return not capped

    async def _messages(self, request: TurnRequest) -> list[Message]:
        messages: list[Message] = []
        if self.settings.context_turns:
            for entry in await self.store.history(request.session, last=self.settings.context_turns):
                messages.append(Message("user", entry.prompt))
                if entry.answer:
                    messages.append(Message("assistant", entry.answer))
        messages.append(Message("user", request.prompt))
        return messages

    async def _produce(
        self, request: TurnRequest, messages: list[Message], out: asyncio.Queue[Delta | BaseException | None]
    ) -> None:
        """Stream the model into ``out``, sending the request again after a
        transient failure before any text (``retry.py``), until the turn's
        queue deadline; a final failure is handed to the consumer."""
        upstream = self.settings.openai
        deadline = request.enqueued_at + self.settings.queue_timeout_s
        extra = {"session": request.session, "turn": request.turn, "upstream": self.upstream_url}
        attempt = 0
        while True:
            text_sent = 0
            try:
                async for delta in self.provider.stream(messages):
                    text_sent += len(delta.text)
                    out.put_nowait(delta)
                    if delta.finish_reason is not None:
                        return
                    if text_sent > self.settings.max_answer_bytes:
                        # Past the cap already (each character is at least a byte): read
                        # no more, so a model far faster than delivery queues at most this.
                        out.put_nowait(Delta(finish_reason="length"))
                        return
                return
            except Exception as exc:
                # Not past the stall timeout either: the relay would end the turn first.
                time_left_s = min(deadline - time.time(), upstream.read_timeout_s)
                delay = retry_delay(
                    exc, attempt=attempt, text_sent=text_sent > 0, retries=upstream.retries,
                    initial_s=upstream.retry_initial_s, time_left_s=time_left_s, random=random.random(),
                )
                failure = upstream_failure(exc)
                if delay is None:
                    details = exc.details if isinstance(exc, UpstreamError) else {}
                    details.update(failure)  # the turn's end names them too
                    log.warning(
                        "model request to %s failed: %s", self.upstream_url, failure["cause"],
                        extra={**extra, "event": "upstream_failed", "attempts": attempt + 1, **details},
                    )
                    out.put_nowait(exc)  # the consumer ends the turn with it
                    return
                log.warning(
                    "model request to %s failed: %s; sending it again", self.upstream_url, failure["cause"],
                    extra={**extra, "event": "upstream_retry", **failure, "delay_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
                attempt += 1

    async def _publish_chunk(self, turn: Turn, text: str) -> None:
        now = time.monotonic()
        if not turn.chunks:
            self.metrics.first_token.observe(now - turn.started_at)
        turn.last_frame_at = now
        frame = protocol.Chunk(seq=turn.seq + 1, turn=turn.request.turn, text=text)
        # The seq is taken before the publish, and the frame kept until its ack is
        # in: a turn cut off meanwhile sends it again (its message id makes that
        # idempotent) and ends with a done at the next seq, never at this one,
        # which JetStream would drop as a repeat of this frame's id.
        payload = protocol.encode(frame)
        turn.seq = frame.seq
        turn.in_flight.append(InFlight(frame.seq, payload, None))  # cut off before its ack is known: sent again
        await self._within_lease(turn)
        turn.in_flight[-1] = InFlight(frame.seq, payload, await self._send(turn, frame.seq, payload), time.monotonic())
        turn.chunks += 1
        self.metrics.chunks.inc()
        await self._settle(turn, keep=PUBLISH_WINDOW - 1)

    async def _send(self, turn: Turn, seq: int, payload: bytes) -> asyncio.Future[Any] | None:
        """Publish frame ``seq`` without waiting for its ack; the ack's future,
        or None if the publish itself failed (the frame is sent again later)."""
        headers = {"Nats-Msg-Id": frame_msg_id(turn.request.session, turn.request.turn, seq)}
        try:
            ack = await self.js.publish_async(generated_subject(turn.request.session), payload, headers=headers)
        except Exception as exc:  # reconnecting, closed, too many pending
            log.warning("publish failed, retrying: %s", exc, extra={"event": "publish_retry"})
            return None
        ack.add_done_callback(partial(self._observe_ack, time.monotonic()))
        return ack

    def _observe_ack(self, sent_at: float, ack: asyncio.Future[Any]) -> None:
        if not ack.cancelled() and ack.exception() is None:
            self.metrics.publish.observe(time.monotonic() - sent_at)

    async def _settle(self, turn: Turn, *, keep: int = 0) -> None:
        """Read acks, oldest first, until at most ``keep`` frames are in flight
        (only those already in, once fewer than the window are out); a frame
        whose ack failed or is late is sent again, awaited, with its id.

        Raises:
            PublishFailed: a frame was not stored within ``PUBLISH_GIVE_UP_S``.
            LeaseLost: the turn's lease went to a reaper meanwhile.
        """
        in_flight = turn.in_flight
        while in_flight:
            seq, payload, ack, sent_at = in_flight[0]
            if ack is not None and not ack.done():
                if len(in_flight) <= keep:
                    return  # the window has room: the rest is read later
                # Counted from its own send: acks lost together (a broker gone)
                # are overdue together, not one timeout after another.
                await asyncio.wait((ack,), timeout=max(0.0, sent_at + PUBLISH_ACK_TIMEOUT_S - time.monotonic()))
            if ack is not None and ack.done() and not ack.cancelled() and ack.exception() is None:
                in_flight.popleft()
                continue
            if ack is not None:  # lost, refused or late
                if not ack.done():
                    ack.cancel()  # frees nats-py's slot for an ack that will never come
                cause = "no ack" if ack.cancelled() else repr(ack.exception())
                log.warning("publish not acknowledged, retrying: %s", cause, extra={"event": "publish_retry"})
            await self._publish(turn, seq, payload)
            in_flight.popleft()

    async def _end(self, turn: Turn, ending: Ending) -> None:
        """Publish the turn's one ``done``; if it cannot be published, give the turn up."""
        request = turn.request
        message = None if ending.message is None else scrub(ending.message)[:MAX_MESSAGE_CHARS]
        done = protocol.Done(
            seq=turn.seq + 1, turn=request.turn, reason=ending.reason, message=message, code=ending.code  # type: ignore[arg-type]
        )
        try:
            await self._settle(turn)  # every chunk acknowledged first, so no gap precedes the done
            await self._publish(turn, done.seq, protocol.encode(TurnEnd(done=done, user=request.user)), with_trace=True)
        except PublishFailed:
            await self._abandon(turn)
            return
        except LeaseLost:
            return  # a reaper ends the turn
        turn.seq = done.seq
        self.metrics.turns_finished.labels(ending.reason).inc()
        log.info(
            "turn finished",
            extra={
                "session": request.session, "turn": request.turn, "trace": turn.trace,
                "event": "turn_finished", "reason": ending.reason, "code": ending.code,
                **({"upstream": self.upstream_url} if ending.reason == "error" else {}), **ending.details,
            },
        )

    async def _abandon(self, turn: Turn) -> None:
        """Hand the turn to a reaper: JetStream would not take its frames."""
        request = turn.request
        message = "The message broker was unreachable, so the answer could not be delivered. Please try again."
        log.error("giving up the turn", extra={"session": request.session, "turn": request.turn, "event": "turn_abandoned"})
        try:
            await self.store.abandon_turn(request.session, request.turn, self.worker_id, reason=message)
        except BrokerUnavailable:
            pass  # the lease is no longer renewed: it runs out and a reaper ends the turn anyway

    async def _within_lease(self, turn: Turn) -> None:
        """Return once the lease is trusted; a frame published after a reaper
        took the lease would follow the done the reaper gave the turn.

        Raises:
            LeaseLost: the lease went to a reaper.
        """
        while not turn.lease_trusted() and not turn.reaped:
            turn.lease_renewed.clear()
            await turn.lease_renewed.wait()
        if turn.reaped:
            raise LeaseLost

    async def _publish(self, turn: Turn, seq: int, payload: bytes, *, with_trace: bool = False) -> None:
        """Publish frame ``seq`` to JetStream until stored; the message id makes retries idempotent.

        Only the turn's end carries the trace id: the buffer logs it there, and
        a header on every chunk is bytes nats-server and the buffer parse for nothing.

        Raises:
            PublishFailed: not stored within ``PUBLISH_GIVE_UP_S``.
            LeaseLost: the turn's lease went to a reaper meanwhile.
        """
        await self._within_lease(turn)
        subject = generated_subject(turn.request.session)
        headers = {"Nats-Msg-Id": frame_msg_id(turn.request.session, turn.request.turn, seq)}
        if with_trace:
            headers[TRACE_HEADER] = turn.trace
        deadline = time.monotonic() + PUBLISH_GIVE_UP_S
        while True:
            try:
                with self.metrics.publish.time():
                    await self.js.publish(subject, payload, headers=headers, timeout=5)
                return
            except Exception as exc:  # timeouts, no responders, reconnecting
                if time.monotonic() > deadline:
                    raise PublishFailed(f"could not publish frame {seq}") from exc
                log.warning("publish failed, retrying: %s", exc, extra={"event": "publish_retry"})
                await self.streams.recover(exc)
                await asyncio.sleep(PUBLISH_RETRY_S)
