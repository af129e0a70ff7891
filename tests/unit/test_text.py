"""Model text made valid Unicode: surrogate halves rejoined or replaced, UTF-8 cuts between characters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.text import SurrogateJoiner, scrub, split_utf8, truncate_utf8

EMOJI = "\U0001f600"  # one character outside the BMP: "\ud83d\ude00" in JSON


def joined(pieces: list[str]) -> str:
    joiner = SurrogateJoiner()
    out = "".join(joiner.feed(piece) for piece in pieces) + joiner.flush()
    out.encode()  # always encodable
    return out


def test_pair_split_across_two_pieces_is_rejoined() -> None:
    """The two halves of an emoji in two deltas come out as the emoji, once."""
    joiner = SurrogateJoiner()
    assert joiner.feed("hi \ud83d") == "hi "
    assert joiner.feed("\ude00!") == EMOJI + "!"
    assert joiner.flush() == ""


def test_pair_in_one_piece_and_plain_text_pass_through() -> None:
    """A pair already together, and text without surrogates, come out unchanged in meaning."""
    assert joined(["a\ud83d\ude00b"]) == f"a{EMOJI}b"
    assert joined(["plain", " text ", EMOJI]) == f"plain text {EMOJI}"


def test_lone_halves_become_replacement_characters() -> None:
    """A high half followed by no low half, a lone low half, and a high half at the end each become U+FFFD."""
    assert joined(["\ud83dx"]) == "\ufffdx"
    assert joined(["x\ude00"]) == "x\ufffd"
    assert joined(["end \ud83d"]) == "end \ufffd"
    assert joined(["\ud83d", "\ud83d", "\ude00"]) == "\ufffd" + EMOJI


def test_a_high_half_alone_in_a_piece_waits_for_the_next() -> None:
    """A piece that is only a high half emits nothing until its partner arrives."""
    joiner = SurrogateJoiner()
    assert joiner.feed("\ud83d") == ""
    assert joiner.feed("") == ""
    assert joiner.feed("\ude00") == EMOJI


@given(st.text(), st.lists(st.integers(min_value=0, max_value=50), max_size=6))
def test_any_split_of_utf16_units_gives_the_original_text(text: str, cuts: list[int]) -> None:
    """Any text, cut into pieces at any UTF-16 unit, comes back whole."""
    data = text.encode("utf-16-le")
    units = "".join(chr(int.from_bytes(data[i : i + 2], "little")) for i in range(0, len(data), 2))
    bounds = sorted({min(cut, len(units)) for cut in cuts})
    pieces = [units[a:b] for a, b in zip([0, *bounds], [*bounds, len(units)], strict=True)]
    assert joined(pieces) == text


def test_scrub_fixes_a_whole_string() -> None:
    """scrub() joins pairs and replaces lone halves in one string."""
    assert scrub("ok") == "ok"
    assert scrub("\ud83d\ude00 \udfff") == f"{EMOJI} \ufffd"


def test_truncate_cuts_between_characters() -> None:
    """A byte budget that ends inside a character drops that character."""
    assert truncate_utf8("abc", 10) == "abc"
    assert truncate_utf8("ab" + EMOJI, 5) == "ab"
    assert truncate_utf8("ab" + EMOJI, 6) == "ab" + EMOJI
    assert truncate_utf8("é" * 3, 5) == "éé"


@given(st.text(), st.integers(min_value=4, max_value=64))
def test_split_pieces_fit_and_rejoin(text: str, max_bytes: int) -> None:
    """Every piece fits the budget, none is empty, and together they are the text."""
    pieces = split_utf8(text, max_bytes)
    assert "".join(pieces) == text
    assert all(0 < len(piece.encode()) <= max_bytes for piece in pieces)


def test_split_refuses_a_budget_below_one_character() -> None:
    """A budget under four bytes cannot hold every character."""
    with pytest.raises(ValueError, match="at least 4"):
        split_utf8("x", 3)
