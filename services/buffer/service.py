"""Store generated frames in Redis before anyone sees them, then publish them.

The order of effects per batch is the whole argument (docs/architecture.md):
1. store the batch in Redis (one pipeline, idempotent by seq); a turn's
   ``done`` is stored only once all of its turn's chunks are, with the history
   entry built from them, else it is left for step 3 to offer again;
2. publish each stored frame on the session's delivery subject (a frame the
   store refused, its turn not generating, e.g. a late second ``done``, is not);
3. ack the batch in JetStream, but nak a ``done`` not stored (redelivered shortly).
A crash between any two steps redelivers the batch, which re-stores nothing
new and republishes frames the gateways drop by seq. A gateway never sees a
frame that is not already in the log, so it can always fill a gap by replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from shared import protocol
from shared.broker import Streams
from shared.errors import BrokerUnavailable, ProtocolError
from shared.messages import (
    REPLAY_FIRST_HEADER,
    REPLAY_HWM_HEADER,
    REPLAY_MORE_HEADER,
    TRACE_HEADER,
    TurnEnd,
    decode_generated,
    decode_replay_request,
)
from shared.pull import Puller
from shared.store import Lease, Segment, SegmentEnd, SessionMeta, SessionStore
from shared.subjects import (
    CONSUMER_BUFFERS,
    STREAM_GENERATED,
    SUBJECT_REPLAY,
    delivery_subject,
    frame_msg_id,
    generated_subject,
    generated_wildcard,
    validate_session_id,
)

from .metrics import BufferMetrics
from .settings import Settings

__all__ = ["Buffer", "Generated", "segments_of"]

log = logging.getLogger(__name__)

GENERATED_PREFIX = generated_wildcard()[:-1]  # "chat.gen."
RETRY_S = 0.5
REAP_RETRY_S = 5.0  # a reaper that could not end a turn leaves its lease due again after this

# A turn's end waits for chunks that another buffer still holds (stored out
# of order); it is offered again after a delay growing with each try, and
# stored with whatever is there once it has waited past every redelivery
# (GENERATED_ACK_WAIT_S), so a session can never stay busy for good.
END_RETRY_S = 0.05
END_RETRY_MAX_S = 1.0
FORCE_END_AFTER_DELIVERIES = 100
# A buffer stores and acks a batch within milliseconds; one that died holding
# one (a pull request it left open keeps taking messages until it expires)
# gives it back to the other buffers after this, so its sessions stall for
# seconds, not half a minute. A slower store is redelivered and stored again:
# harmless, storing is idempotent and gateways drop a frame they have.
GENERATED_ACK_WAIT_S = 5.0


def delivery_messages(frames: list[bytes], max_bytes: int) -> list[bytes]:
    """``frames`` joined by ``b"\\n"``, in order, into as few messages as keep each within
    ``max_bytes`` (NATS refuses a larger payload and nats-py raises MaxPayloadError); a frame
    longer than ``max_bytes`` on its own (none is: chunks are at most 16 KiB) is its own message."""
    messages: list[bytes] = []
    run: list[bytes] = []
    size = -1  # the run's joined length: its frames plus a newline between each two
    for frame in frames:
        if run and size + 1 + len(frame) > max_bytes:
            messages.append(b"\n".join(run))
            run, size = [], -1
        run.append(frame)
        size += 1 + len(frame)
    if run:
        messages.append(b"\n".join(run))
    return messages


class Generated(NamedTuple):
    """One message of the generated stream, as the batch handler sees it."""

    subject: str
    data: bytes
    trace: str = ""
    deliveries: int = 1  # how many times JetStream has delivered it


def segments_of(msgs: Sequence[Generated]) -> list[tuple[Segment, int | None]]:
    """Group messages into per-session segments, in order; with each, the index
    in ``msgs`` of the turn end closing it (None if it ends no turn).

    A segment ends at a turn's end, so the next turn's frames in the same batch
    go into a new segment (the store script ends at most one turn per call).
    Malformed messages are logged and skipped.
    """
    open_segments: dict[str, int] = {}  # session -> its open segment's place in ``segments``
    segments: list[tuple[Segment, int | None]] = []
    for index, msg in enumerate(msgs):
        session = msg.subject[len(GENERATED_PREFIX):]
        try:
            validate_session_id(session)
            item = decode_generated(msg.data)
        except (ProtocolError, msgspec.DecodeError):
            log.error("skipping malformed frame", extra={"event": "bad_frame", "subject": msg.subject})
            continue
        place = open_segments.get(session)
        if place is None:
            place = open_segments[session] = len(segments)
            segments.append((Segment(session, []), None))
        segment = segments[place][0]
        if isinstance(item, TurnEnd):
            done = item.done
            segment.end = SegmentEnd(
                turn=done.turn,
                seq=done.seq,
                frame=protocol.encode(done),
                reason=done.reason,
                user=item.user,
                force=msg.deliveries > FORCE_END_AFTER_DELIVERIES,
            )
            segment.trace = msg.trace
            segments[place] = (segment, index)
            del open_segments[session]
        else:
            segment.frames.append((item.seq, msg.data))  # already the client's frame
    return segments


def _generated(msg: Msg) -> Generated:
    return Generated(msg.subject, msg.data, (msg.headers or {}).get(TRACE_HEADER, ""), msg.metadata.num_delivered or 1)


def _reaped_end(meta: SessionMeta) -> tuple[str, str | None, str | None, str]:
    """How a reaper ends the active turn: (reason, message, code, cause for the metric)."""
    if meta.stop_turn is not None and meta.stop_turn == meta.active_turn:
        return "stopped", None, None, "stopped"
    if not meta.lapsed_worker:  # its lease was the claim deadline: no worker ever took it
        return "error", "No model worker was free in time. Please try again.", "unavailable", "unclaimed"
    if meta.failure:
        return "error", meta.failure, None, "abandoned"
    return "error", "The model worker stopped responding. Please send your message again.", None, "worker_lost"


class Buffer:
    def __init__(
        self, settings: Settings, *, nc: NATS, js: JetStreamContext, store: SessionStore, streams: Streams | None = None
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.streams = streams or Streams(js, generated_storage=settings.broker.generated_storage)
        self.store = store
        self.stopping = asyncio.Event()
        self.metrics = BufferMetrics()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        replay_sub = await self.nc.subscribe(SUBJECT_REPLAY, queue="buffers", cb=self.on_replay)
        frames = Puller(
            self.nc,
            self.js,
            stream=STREAM_GENERATED,
            config=ConsumerConfig(
                durable_name=CONSUMER_BUFFERS,
                filter_subject=generated_wildcard(),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=GENERATED_ACK_WAIT_S,
                max_ack_pending=-1,
            ),
            restore=self.streams.restore,
        )
        await frames.start()  # creates the consumer, or brings an existing one's settings up to date
        reaper = asyncio.create_task(self.reap())
        log.info("buffer ready", extra={"event": "ready"})
        try:
            linger = False
            while not self.stopping.is_set():
                if linger:
                    await asyncio.sleep(self.settings.linger_s)
                try:
                    msgs = await frames.pull(self.settings.batch_size, wait_s=1.0)
                except Exception as exc:  # broker restart: wait it out
                    log.warning("pull failed: %s", exc, extra={"event": "pull_failed"})
                    await asyncio.sleep(RETRY_S)
                    continue
                if msgs:
                    try:
                        await self.handle_batch(msgs)
                    except Exception as exc:  # NATS gone mid-batch: what is not acked is redelivered
                        log.warning("batch not finished: %s", exc, extra={"event": "batch_failed"})
                        await asyncio.sleep(RETRY_S)
                        continue
                # After frames, more are likely on their way: wait a moment for
                # a fuller batch (a full one means more is waiting: pull at once).
                linger = self.settings.linger_s > 0 and 0 < len(msgs) < self.settings.batch_size
        finally:
            # Finish what we hold: the current batch is done; stop answering.
            reaper.cancel()
            await replay_sub.unsubscribe()
            await frames.close()

    async def reap(self) -> None:
        """End turns whose lease ran out: never claimed by a worker in time,
        claimed by one that stopped renewing (it died), given up by their
        worker, or stopped before any worker claimed them. Every buffer reaps;
        taking the lease decides which one ends a given turn, and a reaper
        that fails leaves the lease to expire again for another try."""
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                now = time.time()
                expired = await self.store.expired_leases(now)
                taken = await self.store.take_expired_leases(expired, now=now, retry_at=now + REAP_RETRY_S)
            except BrokerUnavailable:
                log.warning("reaper: redis unavailable", extra={"event": "reap_failed"})
                continue
            for lease in taken:
                try:
                    await self.end_abandoned_turn(lease)
                except Exception as exc:  # Redis or NATS away: the lease comes due again
                    extra = {"session": lease.session, "event": "reap_failed"}
                    log.warning("reaper: could not end the turn: %s", exc, extra=extra)
                    await self.streams.recover(exc)

    async def end_abandoned_turn(self, lease: Lease) -> None:
        """Publish the ``done`` of the turn whose lease this reaper took, right
        after the last frame its worker published; nothing if that turn is no
        longer generating under that lease (its own done ended it meanwhile,
        and the session's next turn is not this reaper's to end)."""
        session = lease.session
        meta = await self.store.meta(session)
        if not self.store.lease_still_taken(meta, lease) or meta.active_turn is None:
            return
        last = meta.hwm
        try:
            # Frames the worker published may still wait in the stream, unstored.
            stored = await self.js.get_last_msg(STREAM_GENERATED, generated_subject(session))
            newest = decode_generated(stored.data or b"")
        except (NotFoundError, msgspec.DecodeError):
            newest = None
        if isinstance(newest, TurnEnd) and newest.done.turn == meta.active_turn:
            return  # the turn's end is published; a buffer is about to store it
        if isinstance(newest, protocol.Chunk) and newest.turn == meta.active_turn:
            last = max(last, newest.seq)  # (a newer turn's chunk means this one ended meanwhile: the store refuses this done)
        reason, message, code, cause = _reaped_end(meta)
        self.metrics.turns_reaped.labels(cause).inc()
        done = protocol.Done(seq=last + 1, turn=meta.active_turn, reason=reason, message=message, code=code)  # type: ignore[arg-type]
        headers = {"Nats-Msg-Id": frame_msg_id(session, meta.active_turn, last + 1)}
        await self.js.publish(
            generated_subject(session), protocol.encode(TurnEnd(done=done, user=meta.turn_user)), headers=headers, timeout=5
        )
        # A stop before any worker took the turn is routine; the other causes are failures.
        log.log(
            logging.INFO if cause == "stopped" else logging.WARNING,
            "ended an abandoned turn",
            extra={"session": session, "turn": meta.active_turn, "event": "turn_reaped", "cause": cause},
        )

    async def handle_batch(self, msgs: list[Msg]) -> None:
        generated = [_generated(m) for m in msgs]
        batch = segments_of(generated)
        segments = [segment for segment, _ in batch]
        try:
            with self.metrics.store.time():
                results = await self.store.store_segments(segments)
        except BrokerUnavailable:
            log.warning("redis unavailable; batch will be redelivered", extra={"event": "store_failed"})
            for msg in msgs:
                await msg.nak(delay=RETRY_S)
            return
        waiting: set[int] = set()  # turn ends whose chunks are not all stored yet
        published = 0
        for (segment, end_index), result in zip(batch, results, strict=True):
            # Frames of a turn no longer generating were refused: never published.
            frames = [data for seq, data in segment.frames if seq not in result.refused]
            if segment.end is not None:
                extra = {"session": segment.session, "turn": segment.end.turn, "trace": segment.trace}
                if result.end == "refused":
                    log.info("dropped the end of a turn not generating", extra={**extra, "event": "end_refused"})
                elif result.end == "stored":
                    frames.append(segment.end.frame)
                    log.info("turn stored", extra={**extra, "event": "turn_stored"})
                elif end_index is not None:
                    waiting.add(end_index)
            if frames:
                # One message per session per batch, its frames in stream order, one
                # per line (a frame's JSON holds no raw newline); gateways split it.
                # More than one only past NATS's max_payload (a backlog of 16 KiB chunks).
                for message in delivery_messages(frames, self.nc.max_payload):
                    await self.nc.publish(delivery_subject(segment.session), message)
                published += len(frames)
        for index, msg in enumerate(msgs):
            if index in waiting:
                await msg.nak(delay=min(END_RETRY_MAX_S, END_RETRY_S * generated[index].deliveries))
            else:
                await msg.ack()
        self.metrics.batches.inc()
        self.metrics.frames_stored.inc(published)

    async def on_replay(self, msg: Msg) -> None:
        """Answer a gateway's replay request with frames after its cursor."""
        try:
            request = decode_replay_request(msg.data)
            session = validate_session_id(request.session)
        except (ProtocolError, msgspec.DecodeError):
            await msg.respond(b"")
            return
        limit = max(1, min(request.limit, self.settings.replay_max_frames))
        try:
            frames, first, hwm = await self.store.read_frames(session, after=request.after, limit=limit)
        except BrokerUnavailable:
            return  # no answer: the gateway's request times out and retries
        body: list[bytes] = []
        size = 0
        for _, data in frames:
            size += len(data) + 1
            if body and size > self.settings.replay_max_bytes:
                break
            body.append(data)
        more = len(body) < len(frames) or len(frames) == limit
        self.metrics.replays.inc()
        self.metrics.replayed_frames.inc(len(body))
        headers = {
            REPLAY_HWM_HEADER: str(hwm),
            REPLAY_FIRST_HEADER: str(first),
            REPLAY_MORE_HEADER: "1" if more else "0",
        }
        await self.nc.publish(msg.reply, b"\n".join(body), headers=headers)
