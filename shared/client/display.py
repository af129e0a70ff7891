"""Server-supplied text made safe to print on a terminal.

A server (or a proxy in front of it, or the model) chooses the bytes of a
refusal's reason, an ``error`` frame's message, a ``done`` message and the
answer itself. Printed raw, an escape sequence in them clears the screen, sets
the window title or rewrites what the user sees, and a 900 KB "reason" floods
the terminal. :func:`clean_message` gives one short line; :func:`clean_text`
keeps an answer's layout (newlines and tabs) and drops everything else a
terminal would act on.
"""

from __future__ import annotations

import re

__all__ = ["MAX_MESSAGE_CHARS", "clean_message", "clean_text"]

MAX_MESSAGE_CHARS = 200

# Escape sequences, whole where they are whole and to the end of the text where
# one is cut off (a chunk may end inside one): CSI (ESC [ or C1 0x9b), the
# string controls OSC, DCS, SOS, PM and APC (ESC ] P X ^ _, or their C1 forms)
# up to their terminator (BEL, ESC \ or ST 0x9c), and two-character escapes.
_ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_CONTROL_BUT_LAYOUT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline


def clean_text(text: str) -> str:
    """An answer's text without escape sequences and control characters, newlines and tabs kept.

    A sequence split across two chunks loses its escape character, so its
    rest shows as plain characters and does nothing.
    """
    if text.isprintable():  # the common case: nothing to remove
        return text
    return _CONTROL_BUT_LAYOUT.sub("", _ESCAPE.sub("", text))


def clean_message(text: str, limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """A server's message as one line: escape sequences removed, other control
    characters and runs of whitespace as one space, at most ``limit`` characters
    (a longer one is cut and ends with "…"; None: any length)."""
    line = " ".join(_CONTROL.sub(" ", _ESCAPE.sub("", text)).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1].rstrip() + "…"
