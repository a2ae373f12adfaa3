"""Log setup for the CLI only; the library never configures logging (it only logs)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Literal

#: Record attributes that are the logging module's own, not context passed in ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: ``scheme://user:password@host`` → ``scheme://user:***@host``: credentials never reach a log.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    """Hide passwords inside URLs."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the context fields (message_id, backend, source, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value if isinstance(value, int | float | bool) else redact(str(value))
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message`` for people, with URL passwords hidden."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.converter = time.localtime

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(fmt: Literal["text", "json"] = "text", level: str = "INFO") -> None:
    """Send stalk's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
