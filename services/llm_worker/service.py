"""The worker loop: pull a turn request only while under the concurrency limit,
stream the model, publish numbered frames, obey ``stop``.

Seq numbering: the gateway claimed the turn in Redis and passed the session's
last seq (``base_seq``); only this worker produces frames for the session
until the turn's ``done`` is stored, so numbering from ``base_seq + 1`` is
gap-free (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from shared import protocol
from shared.errors import BrokerUnavailable, UpstreamError
from shared.messages import TRACE_HEADER, TurnEnd, TurnRequest, decode_control, decode_request
from shared.store import SessionStore
from shared.subjects import (
    CONSUMER_WORKERS,
    STREAM_REQUESTS,
    SUBJECT_REQUESTS,
    control_subject,
    generated_subject,
)

from .metrics import WorkerMetrics
from .providers import Delta, Message, Provider
from .settings import Settings

__all__ = ["Worker"]

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 0.25
PUBLISH_GIVE_UP_S = 120.0
FETCH_MAX = 64  # turn requests taken per fetch, at most


@dataclass
class Turn:
    """One generation in progress."""

    request: TurnRequest
    seq: int
    parts: list[str] = field(default_factory=list)
    stop_requested: bool = False
    reaped: bool = False  # the lease ran out and a buffer ended the turn: publish nothing more
    trace: str = ""  # from the request's Chat-Trace header, carried on the turn's end
    started_at: float = 0.0  # monotonic, for the time to first token


class Worker:
    def __init__(self, settings: Settings, *, nc: NATS, js: JetStreamContext, store: SessionStore, provider: Provider) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.store = store
        self.provider = provider
        self.capacity = asyncio.Semaphore(settings.concurrency)
        self.turns: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.worker_id = uuid.uuid4().hex
        self.metrics = WorkerMetrics()

    async def run(self) -> None:
        """Pull requests until :meth:`stop`; then wait for running turns (bounded)."""
        psub = await self.js.pull_subscribe(
            SUBJECT_REQUESTS,
            durable=CONSUMER_WORKERS,
            stream=STREAM_REQUESTS,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=-1),
        )
        log.info("worker ready", extra={"event": "ready", "concurrency": self.settings.concurrency})
        try:
            while not self.stopping.is_set():
                slots = await self._free_slots()
                if self.stopping.is_set():
                    self._release(slots)
                    break
                try:
                    msgs = await psub.fetch(slots, timeout=1.0)
                except (TimeoutError, NatsTimeoutError):
                    self._release(slots)
                    continue
                except Exception as exc:  # broker restart: wait it out
                    self._release(slots)
                    log.warning("fetch failed: %s", exc, extra={"event": "fetch_failed"})
                    await asyncio.sleep(PUBLISH_RETRY_S)
                    continue
                self._release(slots - len(msgs))
                for msg in msgs:
                    task = asyncio.create_task(self._take(msg))
                    self.turns.add(task)
                    task.add_done_callback(self._finished)
        finally:
            await psub.unsubscribe()
            await self._drain()
            await self.provider.aclose()

    async def _free_slots(self) -> int:
        """Wait for one free slot, then take every other free one (up to a
        fetch's worth): one fetch per burst of requests, not one per turn,
        or claiming turns falls behind under a burst of new chats."""
        await self.capacity.acquire()
        slots = 1
        while slots < FETCH_MAX and not self.capacity.locked():
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
        for task in unfinished:
            task.cancel()  # generate() publishes the turn's done/error before it ends
        await asyncio.gather(*unfinished, return_exceptions=True)

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
        trace = (msg.headers or {}).get(TRACE_HEADER, "")
        extra = {"session": request.session, "turn": request.turn, "trace": trace}
        try:
            claim = await self.store.claim_turn(
                request.session, request.turn, self.worker_id, lease_until=time.time() + self.settings.lease_s
            )
        except BrokerUnavailable:
            await msg.nak(delay=1.0)  # try again once Redis is back
            return
        # Ack once claimed: a worker that dies mid-turn must not make another
        # start the same turn over (issue 6 ends such a turn with done/error).
        await msg.ack()
        if claim.status != "claimed":
            log.warning("request skipped: turn %s", claim.status, extra=extra)
            return
        await self.generate(request, stop_requested=claim.stop_requested, trace=trace)

    async def generate(self, request: TurnRequest, *, stop_requested: bool = False, trace: str = "") -> None:
        """Run one claimed turn to its ``done``, whatever happens upstream."""
        turn = Turn(request=request, seq=request.base_seq, trace=trace)
        extra = {"session": request.session, "turn": request.turn, "trace": trace}
        waited = time.time() - request.enqueued_at
        if waited > self.settings.queue_timeout_s:
            await self._end(turn, "error", "No model worker was free in time. Please try again.")
            return
        if stop_requested:
            await self._end(turn, "stopped")
            return

        # Unbounded: the model paces the producer, and one answer is bounded
        # by the model's length limit. None marks the producer's end.
        deltas: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(await self._messages(request), deltas))
        producer.add_done_callback(lambda _: deltas.put_nowait(None))

        async def on_control(msg: Msg) -> None:
            try:
                control = decode_control(msg.data)
            except Exception:
                return
            if control.action == "stop" and control.turn in (None, request.turn):
                turn.stop_requested = True
                producer.cancel()  # closes the upstream HTTP request

        sub = await self.nc.subscribe(control_subject(request.session), cb=on_control)
        keeper = asyncio.create_task(self._keep_lease(turn, producer))
        self.metrics.turns_started.inc()
        self.metrics.queue_wait.observe(max(0.0, waited))
        self.metrics.active_turns.inc()
        turn.started_at = time.monotonic()
        log.info("turn started", extra={**extra, "event": "turn_started", "queued_s": round(waited, 3)})
        cancelled = False
        try:
            reason, message = await self._relay(turn, deltas)
        except asyncio.CancelledError:
            # The worker is shutting down: end the turn cleanly rather than leave it open.
            cancelled = True
            reason, message = "error", "The model worker restarted before the answer finished. Please send it again."
        finally:
            producer.cancel()
            keeper.cancel()
            self.metrics.active_turns.dec()
            await sub.unsubscribe()
        if not turn.reaped:
            await self._end(turn, reason, message)
        if cancelled:
            raise asyncio.CancelledError

    async def _keep_lease(self, turn: Turn, producer: asyncio.Task[None]) -> None:
        """Renew the turn's lease every third of it; if the turn is no longer ours, stop."""
        request = turn.request
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                ours = await self.store.renew_lease(
                    request.session, request.turn, self.worker_id, lease_until=time.time() + self.settings.lease_s
                )
            except BrokerUnavailable:
                continue  # Redis is away: keep generating, try again
            if not ours:
                log.warning("lease lost; abandoning the turn", extra={"session": request.session, "turn": request.turn})
                turn.reaped = True
                producer.cancel()
                return

    async def _relay(self, turn: Turn, deltas: asyncio.Queue[Delta | BaseException | None]) -> tuple[str, str | None]:
        """Publish deltas as chunks until the stream ends; return (reason, message)."""
        while True:
            item = await deltas.get()
            texts: list[str] = []
            # Coalesce what is already queued into one chunk; never wait to
            # batch, so an idle stream sends each token at once.
            while isinstance(item, Delta) and item.finish_reason is None:
                texts.append(item.text)
                if deltas.empty():
                    break
                item = deltas.get_nowait()
            if texts and "".join(texts):
                await self._publish_chunk(turn, "".join(texts))
            if isinstance(item, Delta):
                if item.finish_reason is None:
                    continue
                return item.finish_reason, None
            if isinstance(item, UpstreamError):
                return "error", str(item)
            if isinstance(item, BaseException):
                log.error("provider failed", exc_info=item, extra={"session": turn.request.session})
                return "error", "The model failed unexpectedly. Please try again."
            if turn.stop_requested:
                return "stopped", None
            return "error", "The model stopped without finishing. Please try again."

    async def _messages(self, request: TurnRequest) -> list[Message]:
        messages: list[Message] = []
        if self.settings.context_turns:
            try:
                history = await self.store.history(request.session, last=self.settings.context_turns)
            except BrokerUnavailable:
                history = []
            for entry in history:
                messages.append(Message("user", entry.prompt))
                if entry.answer:
                    messages.append(Message("assistant", entry.answer))
        messages.append(Message("user", request.prompt))
        return messages

    async def _produce(self, messages: list[Message], out: asyncio.Queue[Delta | BaseException | None]) -> None:
        try:
            async for delta in self.provider.stream(messages):
                out.put_nowait(delta)
                if delta.finish_reason is not None:
                    return
        except Exception as exc:  # handed to the consumer, which ends the turn
            out.put_nowait(exc)

    async def _publish_chunk(self, turn: Turn, text: str) -> None:
        if not turn.parts:
            self.metrics.first_token.observe(time.monotonic() - turn.started_at)
        self.metrics.chunks.inc()
        turn.seq += 1
        turn.parts.append(text)
        frame = protocol.Chunk(seq=turn.seq, turn=turn.request.turn, text=text)
        await self._publish(turn, protocol.encode(frame))

    async def _end(self, turn: Turn, reason: str, message: str | None = None) -> None:
        request = turn.request
        turn.seq += 1
        done = protocol.Done(seq=turn.seq, turn=request.turn, reason=reason, message=message)  # type: ignore[arg-type]
        end = TurnEnd(done=done, prompt=request.prompt, answer="".join(turn.parts), user=request.user)
        await self._publish(turn, protocol.encode(end), with_trace=True)
        self.metrics.turns_finished.labels(reason).inc()
        log.info(
            "turn finished",
            extra={
                "session": request.session, "turn": request.turn, "trace": turn.trace,
                "event": "turn_finished", "reason": reason,
            },
        )

    async def _publish(self, turn: Turn, payload: bytes, *, with_trace: bool = False) -> None:
        """Publish to JetStream until stored; the message id makes retries idempotent.

        Only the turn's end carries the trace id: the buffer logs it there, and
        a header on every chunk is bytes nats-server and the buffer parse for nothing.
        """
        subject = generated_subject(turn.request.session)
        headers = {"Nats-Msg-Id": f"{turn.request.session}:{turn.seq}"}
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
                    raise BrokerUnavailable(f"could not publish frame {turn.seq}") from exc
                log.warning("publish failed, retrying: %s", exc, extra={"event": "publish_retry"})
                await asyncio.sleep(PUBLISH_RETRY_S)


