"""The delivery state machine: seq order, pause, resume, replay and gaps."""

from __future__ import annotations

import json

import pytest

from shared.protocol import Chunk, encode
from shared.session import (
    Delivery,
    GapTimeout,
    LiveFrame,
    LocalPause,
    LocalResume,
    RemotePause,
    RemoteResume,
    ReplayBatch,
    RequestReplay,
    Send,
    WaitForGap,
)


def frame(seq: int) -> bytes:
    return encode(Chunk(seq=seq, turn=1, text=f"t{seq}"))


def sent_seqs(actions: list) -> list[int | None]:  # type: ignore[type-arg]
    """The seqs sent (None for a frame without one), checking each chunk carries its own frame."""
    sends = [a for a in actions if isinstance(a, Send)]
    assert all(a.data == frame(a.seq) for a in sends if a.seq is not None)
    return [a.seq for a in sends]


def sent_types(actions: list) -> list[str]:  # type: ignore[type-arg]
    return [json.loads(a.data)["type"] for a in actions if isinstance(a, Send)]


def caught_up(delivered: int = 0) -> Delivery:
    state = Delivery(delivered=delivered, paused=False)
    assert state.start() == [RequestReplay(delivered)]
    assert state.handle(ReplayBatch(frames=[], first=0, more=False)) == []
    return state


def test_start_requests_replay_from_cursor() -> None:
    """A connection starts by asking for everything after its last_seq."""
    assert Delivery(delivered=7, paused=False).start() == [RequestReplay(7)]


def test_start_paused_sends_nothing() -> None:
    """A connection to a paused session replays nothing until resume."""
    assert Delivery(delivered=3, paused=True).start() == []


def test_live_frames_in_order_are_sent() -> None:
    """Consecutive live frames go straight out."""
    state = caught_up()
    assert sent_seqs(state.handle(LiveFrame(1, frame(1)))) == [1]
    assert sent_seqs(state.handle(LiveFrame(2, frame(2)))) == [2]
    assert state.delivered == 2


def test_duplicates_are_dropped() -> None:
    """A frame at or behind the cursor is never sent twice."""
    state = caught_up(5)
    assert state.handle(LiveFrame(5, frame(5))) == []
    assert state.handle(LiveFrame(3, frame(3))) == []


def test_gap_triggers_replay_and_holds_frames() -> None:
    """A frame ahead of the cursor waits while the gap is replayed."""
    state = caught_up(1)
    actions = state.handle(LiveFrame(4, frame(4)))
    assert actions == [RequestReplay(1)]
    assert state.handle(LiveFrame(5, frame(5))) == []  # held, replay in flight
    actions = state.handle(ReplayBatch(frames=[(2, frame(2)), (3, frame(3))], first=1, more=False))
    assert sent_seqs(actions) == [2, 3, 4, 5]
    assert state.pending == {}


def test_gap_not_yet_stored_waits_then_retries() -> None:
    """If the replay lacks the missing frame, wait for it and retry on timeout."""
    state = caught_up(1)
    state.handle(LiveFrame(3, frame(3)))
    actions = state.handle(ReplayBatch(frames=[(3, frame(3))], first=1, more=False))
    assert actions == [WaitForGap()]
    assert state.handle(GapTimeout()) == [RequestReplay(1)]
    actions = state.handle(ReplayBatch(frames=[(2, frame(2)), (3, frame(3))], first=1, more=False))
    assert actions == [Send(frame(2), 2), Send(frame(3), 3)]  # no WaitForGap: frame 3 left pending
    assert state.pending == {}


def test_live_frame_fills_gap_without_replay() -> None:
    """The missing frame arriving live releases the held ones."""
    state = caught_up(1)
    state.handle(LiveFrame(3, frame(3)))
    state.handle(ReplayBatch(frames=[], first=1, more=False))
    assert sent_seqs(state.handle(LiveFrame(2, frame(2)))) == [2, 3]


def test_replay_with_more_asks_again() -> None:
    """A batch that says more follows with the next request."""
    state = Delivery(delivered=0, paused=False)
    state.start()
    actions = state.handle(ReplayBatch(frames=[(1, frame(1)), (2, frame(2))], first=1, more=True))
    assert sent_seqs(actions) == [1, 2]
    assert actions[-1] == RequestReplay(2)


def test_frames_past_retention_are_reported_once() -> None:
    """If the log no longer holds the next frame, say so and continue from the oldest held."""
    state = Delivery(delivered=2, paused=False)
    state.start()
    actions = state.handle(ReplayBatch(frames=[(10, frame(10)), (11, frame(11))], first=10, more=False))
    assert sent_types(actions) == ["error", "chunk", "chunk"]
    assert json.loads(actions[0].data) == {  # type: ignore[union-attr]
        "type": "error", "code": "unavailable", "message": "frames 3..9 are past retention",
    }
    assert state.delivered == 11


def test_a_single_frame_past_retention_is_reported() -> None:
    """One trimmed frame is a gap like any other: reported, then delivery goes on from the oldest held."""
    state = Delivery(delivered=2, paused=False)
    state.start()
    actions = state.handle(ReplayBatch(frames=[(4, frame(4))], first=4, more=False))
    assert json.loads(actions[0].data)["message"] == "frames 3..3 are past retention"  # type: ignore[union-attr]
    assert sent_seqs(actions) == [None, 4] and state.delivered == 4


def test_pause_stops_delivery_at_cursor() -> None:
    """Guarantee 2: paused reports the cursor and nothing follows until resume."""
    state = caught_up()
    state.handle(LiveFrame(1, frame(1)))
    actions = state.handle(LocalPause(version=1))
    assert [json.loads(a.data) for a in actions] == [{"type": "paused", "seq": 1}]  # type: ignore[union-attr]
    assert state.handle(LiveFrame(2, frame(2))) == []
    assert state.handle(LiveFrame(3, frame(3))) == []
    actions = state.handle(LocalResume(version=2))
    # Frames that arrived while paused go out at once, after "resumed"; a replay still follows.
    assert json.loads(actions[0].data) == {"type": "resumed", "seq": 1}  # type: ignore[union-attr]
    assert sent_seqs(actions) == [None, 2, 3] and actions[-1] == RequestReplay(3)
    assert state.handle(ReplayBatch(frames=[(2, frame(2)), (3, frame(3))], first=1, more=False)) == []


def test_resume_replays_what_was_dropped_while_paused() -> None:
    """Past the bound, frames held while paused are dropped; the replay on resume delivers them."""
    state = caught_up(0)
    state.max_pending = 2
    state.handle(LocalPause(version=1))
    for seq in range(1, 6):
        assert state.handle(LiveFrame(seq, frame(seq))) == []
    actions = state.handle(LocalResume(version=2))
    assert sent_seqs(actions) == [None, 1, 2] and actions[-1] == RequestReplay(2)
    replayed = [(seq, frame(seq)) for seq in range(3, 6)]
    assert sent_seqs(state.handle(ReplayBatch(frames=replayed, first=1, more=False))) == [3, 4, 5]


def test_replay_arriving_after_pause_is_discarded() -> None:
    """A replay requested before a pause sends nothing once paused."""
    state = Delivery(delivered=0, paused=False)
    state.start()
    state.handle(LocalPause(version=1))
    assert state.handle(ReplayBatch(frames=[(1, frame(1))], first=1, more=False)) == []
    assert state.delivered == 0


def test_repeated_local_pause_answers_again() -> None:
    """A second pause from the client is answered with the same paused seq."""
    state = caught_up(4)
    state.handle(LocalPause(version=1))
    actions = state.handle(LocalPause(version=1))
    assert [json.loads(a.data) for a in actions] == [{"type": "paused", "seq": 4}]  # type: ignore[union-attr]


def test_remote_pause_while_paused_sends_nothing() -> None:
    """Only the client's own pause is answered again; another connection's pause changes nothing here."""
    state = caught_up(4)
    state.handle(LocalPause(version=1))
    assert state.handle(RemotePause(version=2)) == []
    assert state.paused and state.version == 2


def test_remote_events_are_ordered_by_version() -> None:
    """Guarantee 4: stale or echoed pause events are ignored."""
    state = caught_up(0)
    assert sent_types(state.handle(RemotePause(version=5))) == ["paused"]
    assert state.handle(RemotePause(version=5)) == []  # echo
    assert state.handle(RemoteResume(version=4)) == []  # stale
    assert state.paused
    assert sent_types(state.handle(RemoteResume(version=6))) == ["resumed"]
    assert state.handle(RemotePause(version=5)) == []  # late arrival of an older pause
    assert not state.paused


def test_remote_event_at_the_applied_version_is_ignored() -> None:
    """A remote event carrying the version already applied names that same change: it is an echo."""
    state = caught_up(0)
    state.handle(RemotePause(version=5))
    assert state.handle(RemoteResume(version=5)) == [] and state.paused
    assert sent_types(state.handle(RemoteResume(version=6))) == ["resumed"]
    assert state.handle(RemotePause(version=6)) == [] and not state.paused


def test_local_events_apply_whatever_their_version() -> None:
    """The client's own resume is answered even when its version is not newer than the last seen."""
    state = caught_up(0)
    state.handle(RemotePause(version=5))
    actions = state.handle(LocalResume(version=5))
    assert sent_types(actions) == ["resumed"] and not state.paused


def test_unknown_event_is_an_error() -> None:
    """An event the machine does not know is a programming error, not silently nothing."""
    with pytest.raises(TypeError):
        caught_up(0).handle(object())  # type: ignore[arg-type]


def test_local_pause_version_blocks_older_remote_resume() -> None:
    """A resume older than our own pause cannot unpause us."""
    state = caught_up(0)
    state.handle(LocalPause(version=7))
    assert state.handle(RemoteResume(version=6)) == []
    assert state.paused


def test_pending_is_bounded() -> None:
    """Frames past max_pending are dropped (replayed later), not stored."""
    state = caught_up(0)
    state.max_pending = 3
    for seq in range(2, 10):
        state.handle(LiveFrame(seq, frame(seq)))
    assert len(state.pending) == 3


def test_gap_timeout_ignored_when_paused_or_replaying() -> None:
    """Timer events do nothing while paused or while a replay is outstanding."""
    state = Delivery(delivered=0, paused=True)
    assert state.handle(GapTimeout()) == []
    state = Delivery(delivered=0, paused=False)
    state.start()
    assert state.handle(GapTimeout()) == []


def test_replay_outstanding_across_pause_and_resume_is_asked_again() -> None:
    """A replay requested before a pause may miss frames ignored while paused: after resume, ask again."""
    state = Delivery(delivered=0, paused=False)
    assert state.start() == [RequestReplay(0)]
    state.handle(LocalPause(version=1))
    assert state.handle(LiveFrame(1, frame(1))) == []  # held while paused
    assert state.handle(LiveFrame(3, frame(3))) == []  # 2 is lost on its way (say, a NATS reconnect)
    actions = state.handle(LocalResume(version=2))
    assert sent_seqs(actions) == [None, 1] and not any(isinstance(a, RequestReplay) for a in actions)  # one at a time
    # The first replay answers with the log as it was before any of it was stored: ask again.
    assert state.handle(ReplayBatch(frames=[], first=1, more=False)) == [WaitForGap()]
    assert state.handle(GapTimeout()) == [RequestReplay(1)]
    assert sent_seqs(state.handle(ReplayBatch(frames=[(2, frame(2)), (3, frame(3))], first=1, more=False))) == [2, 3]


def test_stale_replay_overlapping_sent_frames_sends_the_rest_and_asks_again() -> None:
    """A replay requested before a pause returns after resume sent some of it: those are skipped, the
    rest go out, and the replay is asked again (it may predate frames dropped while paused)."""
    state = Delivery(delivered=0, paused=False, max_pending=1)
    state.start()
    state.handle(LocalPause(version=1))
    state.handle(LiveFrame(1, frame(1)))  # held
    state.handle(LiveFrame(2, frame(2)))  # dropped: past max_pending
    assert sent_seqs(state.handle(LocalResume(version=2))) == [None, 1]
    actions = state.handle(ReplayBatch(frames=[(1, frame(1)), (2, frame(2))], first=1, more=False))
    assert sent_seqs(actions) == [2] and actions[-1] == RequestReplay(2)
