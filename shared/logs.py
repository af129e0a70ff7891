"""Structured JSON logs on stderr, one object a line, secrets masked.

Every line passes through :func:`shared.redact.redact_secrets`, whatever logged
it: uvicorn writes a WebSocket's whole URL (``/ws?token=…``) when it accepts or
refuses one, and an exception may quote a URL with a password.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .redact import redact_secrets

__all__ = ["configure_logging"]

# Record attributes that are not extra fields (uvicorn adds an ANSI-coloured copy of its messages).
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact_secrets(json.dumps(entry, default=str))


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
