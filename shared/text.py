"""Text that is always valid Unicode, whatever a model or a proxy sends.

JSON escapes characters outside the Basic Multilingual Plane as a UTF-16
surrogate pair (``"\\ud83d\\ude00"``, RFC 8259 section 7). A proxy that cuts a
stream by UTF-16 units can put the two halves in two events, and Python's
``json`` then yields strings holding a lone surrogate, which no UTF-8 encoder
accepts. :class:`SurrogateJoiner` holds a trailing high half until the next
piece of text, rejoins the pair, and replaces a half that has no partner with
U+FFFD, as the WHATWG decoders do for unpaired surrogates.
"""

from __future__ import annotations

import re

__all__ = ["SurrogateJoiner", "scrub", "truncate_utf8", "split_utf8"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_HIGH = re.compile("[\ud800-\udbff]$")
REPLACEMENT = "\ufffd"


def scrub(text: str) -> str:
    """Return ``text`` with surrogate pairs joined and lone halves replaced by U+FFFD."""
    if _SURROGATE.search(text) is None:
        return text
    # UTF-16 round trip: a pair becomes its character, a lone half an error -> U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class SurrogateJoiner:
    """Feed text pieces in order; get back text that always encodes as UTF-8."""

    def __init__(self) -> None:
        self._pending = ""  # a high surrogate waiting for its low half

    def feed(self, text: str) -> str:
        """Return what can be emitted now; a trailing high surrogate waits for the next piece."""
        if self._pending:
            text, self._pending = self._pending + text, ""
        if _SURROGATE.search(text) is None:
            return text
        if _HIGH.search(text) is not None:
            text, self._pending = text[:-1], text[-1]
        return scrub(text)

    def flush(self) -> str:
        """The end of the text: a high half still waiting has no partner (U+FFFD)."""
        pending, self._pending = self._pending, ""
        return REPLACEMENT if pending else ""


def _cut(data: bytes, end: int) -> int:
    """Move ``end`` back to the start of the UTF-8 character it falls in."""
    while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte
        end -= 1
    return end


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits ``max_bytes``, cut between characters."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: _cut(data, max_bytes)].decode()


def split_utf8(text: str, max_bytes: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes each, between characters.

    Raises:
        ValueError: ``max_bytes`` is below 4 (one character may need four bytes).
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be at least 4, got {max_bytes}")
    if len(text) * 4 <= max_bytes:
        return [text] if text else []
    data = text.encode()
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = _cut(data, min(start + max_bytes, len(data)))
        pieces.append(data[start:end].decode())
        start = end
    return pieces
