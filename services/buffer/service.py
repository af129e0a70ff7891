"""Store generated frames in Redis before anyone sees them, then publish them.

The order of effects per batch is the whole argument (docs/architecture.md):
1. store the batch in Redis (one pipeline, idempotent by seq);
2. publish each frame on the session's delivery subject;
3. ack the batch in JetStream.
A crash between any two steps redelivers the batch, which re-stores nothing
new and republishes frames the gateways drop by seq. A gateway never sees a
frame that is not already in the log, so it can always fill a gap by replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from shared import protocol
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
from shared.store import HistoryTurn, Segment, SessionStore
from shared.subjects import (
    CONSUMER_BUFFERS,
    STREAM_GENERATED,
    SUBJECT_REPLAY,
    delivery_subject,
    generated_subject,
    generated_wildcard,
    validate_session_id,
)

from .metrics import BufferMetrics
from .settings import Settings

__all__ = ["Buffer", "segments_of"]

log = logging.getLogger(__name__)

GENERATED_PREFIX = generated_wildcard()[:-1]  # "chat.gen."
RETRY_S = 0.5


def segments_of(msgs: Sequence[tuple[str, bytes, str]]) -> list[Segment]:
    """Group (subject, payload, trace id) messages into per-session segments, in order.

    A segment ends at a turn's end, so the next turn's frames in the same batch
    go into a new segment (the store script ends at most one turn per call).
    Malformed messages are logged and skipped.
    """
    open_segments: dict[str, Segment] = {}
    segments: list[Segment] = []
    for subject, data, trace in msgs:
        session = subject[len(GENERATED_PREFIX):]
        try:
            validate_session_id(session)
            item = decode_generated(data)
        except (ProtocolError, msgspec.DecodeError):
            log.error("skipping malformed frame", extra={"event": "bad_frame", "subject": subject})
            continue
        segment = open_segments.get(session)
        if segment is None:
            segment = open_segments[session] = Segment(session, [])
            segments.append(segment)
        if isinstance(item, TurnEnd):
            done = item.done
            segment.frames.append((done.seq, protocol.encode(done)))
            entry = HistoryTurn(
                turn=done.turn,
                prompt=item.prompt,
                answer=item.answer,
                reason=done.reason,
                last_seq=done.seq,
            )
            segment.turn_end = (done.turn, done.seq, msgspec.json.encode(entry))
            segment.user = item.user
            segment.trace = trace
            del open_segments[session]
        else:
            segment.frames.append((item.seq, data))  # already the client's frame
    return segments


class Buffer:
    def __init__(self, settings: Settings, *, nc: NATS, js: JetStreamContext, store: SessionStore) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.store = store
        self.stopping = asyncio.Event()
        self.metrics = BufferMetrics()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        replay_sub = await self.nc.subscribe(SUBJECT_REPLAY, queue="buffers", cb=self.on_replay)
        psub = await self.js.pull_subscribe(
            generated_wildcard(),
            durable=CONSUMER_BUFFERS,
            stream=STREAM_GENERATED,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=-1),
        )
        reaper = asyncio.create_task(self.reap())
        log.info("buffer ready", extra={"event": "ready"})
        try:
            while not self.stopping.is_set():
                try:
                    msgs = await psub.fetch(self.settings.batch_size, timeout=1.0)
                except (TimeoutError, NatsTimeoutError):
                    continue
                except Exception as exc:  # broker restart: wait it out
                    log.warning("fetch failed: %s", exc, extra={"event": "fetch_failed"})
                    await asyncio.sleep(RETRY_S)
                    continue
                await self.handle_batch(msgs)
        finally:
            # Finish what we hold: the current batch is done; stop answering.
            reaper.cancel()
            await replay_sub.unsubscribe()
            await psub.unsubscribe()

    async def reap(self) -> None:
        """End turns whose lease ran out: never claimed by a worker in time, or
        claimed by one that stopped renewing (it died). Every buffer reaps; the
        lease's removal decides which one ends a given turn."""
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                for session in await self.store.expired_leases(time.time()):
                    if await self.store.take_expired_lease(session):
                        await self.end_abandoned_turn(session)
            except BrokerUnavailable:
                log.warning("reaper: redis unavailable", extra={"event": "reap_failed"})
            except Exception:
                log.exception("reaper failed", extra={"event": "reap_failed"})

    async def end_abandoned_turn(self, session: str) -> None:
        """Publish the turn's done/error after the last frame its worker published."""
        meta = await self.store.meta(session)
        if meta.active_turn is None or meta.active_prompt is None:
            return
        last = meta.hwm
        try:
            # Frames the worker published may still wait in the stream, unstored.
            stored = await self.js.get_last_msg(STREAM_GENERATED, generated_subject(session))
            newest = decode_generated(stored.data or b"")
        except (NotFoundError, msgspec.DecodeError):
            newest = None
        if isinstance(newest, TurnEnd) and newest.done.turn == meta.active_turn:
            return  # the worker did end it; the buffer is about to store that
        if isinstance(newest, protocol.Chunk):
            last = max(last, newest.seq)
        frames, _, _ = await self.store.read_frames(session, after=meta.base_seq, limit=100_000)
        answer = "".join(
            f.text for _, data in frames if isinstance(f := decode_generated(data), protocol.Chunk) and f.turn == meta.active_turn
        )
        if meta.worker is None:
            message, code = "No model worker was free in time. Please try again.", "unavailable"
        else:
            message, code = "The model worker stopped responding. Please send your message again.", None
        self.metrics.turns_reaped.labels("unclaimed" if meta.worker is None else "worker_lost").inc()
        done = protocol.Done(seq=last + 1, turn=meta.active_turn, reason="error", message=message, code=code)  # type: ignore[arg-type]
        end = TurnEnd(done=done, prompt=meta.active_prompt, answer=answer, user=meta.turn_user)
        headers = {"Nats-Msg-Id": f"{session}:{last + 1}"}
        await self.js.publish(generated_subject(session), protocol.encode(end), headers=headers, timeout=5)
        log.warning(
            "ended an abandoned turn",
            extra={"session": session, "turn": meta.active_turn, "event": "turn_reaped", "claimed": meta.worker is not None},
        )

    async def handle_batch(self, msgs: list[Msg]) -> None:
        segments = segments_of([(m.subject, m.data, (m.headers or {}).get(TRACE_HEADER, "")) for m in msgs])
        try:
            with self.metrics.store.time():
                await self.store.store_segments(segments)
        except BrokerUnavailable:
            log.warning("redis unavailable; batch will be redelivered", extra={"event": "store_failed"})
            for msg in msgs:
                await msg.nak(delay=RETRY_S)
            return
        for segment in segments:
            subject = delivery_subject(segment.session)
            for _, data in segment.frames:
                await self.nc.publish(subject, data)
        for msg in msgs:
            await msg.ack()
        self.metrics.batches.inc()
        self.metrics.frames_stored.inc(sum(len(segment.frames) for segment in segments))
        for segment in segments:
            if segment.turn_end is not None:
                extra = {"session": segment.session, "turn": segment.turn_end[0], "trace": segment.trace}
                log.info("turn stored", extra={**extra, "event": "turn_stored"})

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
