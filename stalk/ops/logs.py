"""Log setup for the CLI only; the library never configures logging (it only logs)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

from stalk.engine.policy import Ack, Action
from stalk.message import Message
from stalk.redaction import redact, refresh_secrets

__all__ = ["JsonFormatter", "TextFormatter", "configure", "outcome_logger", "redact",
           "refresh_secrets"]  # fmt: skip

#: Record attributes that are the logging module's own, not context passed in ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: Logger of the one-line-per-message outcomes (acks at DEBUG; the engine logs retries at INFO
#: and error-topic routes at WARNING with the same fields).
OUTCOME_LOGGER = "stalk.outcome"


def outcome_logger(backend: str) -> Callable[[Message, Action, float], None] | None:
    """Return an ``on_outcome`` observer that logs each ack, or None while DEBUG is off there.

    Installing nothing when the level is off keeps the engine's hot path free of it.
    """
    log = logging.getLogger(OUTCOME_LOGGER)
    if not log.isEnabledFor(logging.DEBUG):
        return None

    def observe(message: Message, action: Action, seconds: float) -> None:
        if isinstance(action, Ack) and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "message %s acked after %.1f ms",
                message.id,
                seconds * 1000,
                extra={
                    "message_id": message.id,
                    "backend": backend,
                    "source": message.source,
                    "attempt": message.attempt,
                    "outcome": "ack",
                    "duration_s": round(seconds, 6),
                },
            )

    return observe


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
                payload[key] = (
                    value if isinstance(value, int | float | bool) else redact(str(value))
                )
        if record.exc_info:
            payload["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message`` for people, with URL passwords hidden."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.converter = time.localtime

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


#: Loggers of the broker SDKs stalk uses. Their DEBUG output dumps requests, headers and all:
#: botocore prints the session token and the signed Authorization header, which redaction can
#: only catch where it recognises the form. So they stay at WARNING (or the chosen level, if
#: higher) at every ``--log-level``, unless named after it (``debug,botocore``).
SDK_LOGGERS = (
    "botocore", "boto3", "s3transfer", "urllib3", "aiormq", "aio_pika", "pamqp", "nsq",
    "tornado", "google", "grpc",
)  # fmt: skip


def configure(fmt: Literal["text", "json"] = "text", level: str = "INFO") -> None:
    """Send stalk's logs to stderr in the chosen format.

    Args:
        fmt: ``text`` or ``json``.
        level: ``LEVEL`` or ``LEVEL,logger,...``: the named loggers (SDKs) get ``LEVEL`` too;
            the other SDK loggers stay at WARNING or above.
    """
    refresh_secrets()
    name, *named = level.split(",")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name.upper())
    quiet = max(logging.WARNING, root.level)
    for sdk in SDK_LOGGERS:  # "Found credentials in environment variables", request dumps
        logging.getLogger(sdk).setLevel(root.level if sdk in named else quiet)
    for logger_name in named:
        logging.getLogger(logger_name).setLevel(root.level)
