"""Every setting the code reads is documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_is_documented() -> None:
    """Each CHAT_* variable read by a service appears in docs/configuration.md."""
    documented = set(re.findall(r"`(CHAT_[A-Z_]+)`", (ROOT / "docs/configuration.md").read_text()))
    read = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("shared/**/*.py"), *ROOT.glob("devstack/*.py")]:
        read |= set(re.findall(r"\"(CHAT_[A-Z_]+)\"", path.read_text()))
    stream_names = {"CHAT_REQUESTS", "CHAT_GENERATED"}  # JetStream names, not settings
    assert read - stream_names - documented == set()
