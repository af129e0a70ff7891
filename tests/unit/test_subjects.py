"""Subjects and keys are built only from valid session ids."""

from __future__ import annotations

import pytest

from shared import subjects
from shared.errors import ProtocolError

BUILDERS = [
    subjects.generated_subject,
    subjects.delivery_subject,
    subjects.control_subject,
    subjects.session_key,
    subjects.log_key,
    subjects.history_key,
]


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "a\tb", "x" * 65, "é", "a/b", "a:b", "{x}", None, 5])
@pytest.mark.parametrize("build", BUILDERS)
def test_invalid_ids_never_reach_a_subject_or_key(build, bad) -> None:  # type: ignore[no-untyped-def]
    """Wildcards, dots, spaces and long ids are rejected by every builder."""
    with pytest.raises(ProtocolError):
        build(bad)


def test_valid_ids() -> None:
    """Valid ids map to one token per subject and one hash tag per key."""
    sid = "Ab_9-" + "x" * 59
    assert subjects.validate_session_id(sid) == sid
    assert subjects.delivery_subject("abc") == "chat.session.abc.out"
    assert subjects.control_subject("abc") == "chat.session.abc.ctl"
    assert subjects.session_wildcard("abc") == "chat.session.abc.*"
    assert subjects.generated_subject("abc") == "chat.gen.abc"
    assert subjects.session_key("abc") == "chat:{abc}:meta"
    assert subjects.log_key("abc") == "chat:{abc}:log"
    assert subjects.history_key("abc") == "chat:{abc}:history"


def test_new_session_ids_are_valid_and_distinct() -> None:
    """Server-chosen ids pass validation and do not repeat."""
    ids = {subjects.new_session_id() for _ in range(100)}
    assert len(ids) == 100
    for sid in ids:
        subjects.validate_session_id(sid)


def test_a_frames_message_id_names_session_turn_and_seq() -> None:
    """Two turns' frames at one seq (a late reaper's done, the next turn's chunk) never share an id."""
    assert subjects.frame_msg_id("s1", 1, 7) == "s1:1:7"
    assert subjects.frame_msg_id("s1", 1, 7) != subjects.frame_msg_id("s1", 2, 7)
