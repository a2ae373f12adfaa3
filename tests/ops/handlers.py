"""Handlers the subprocess tests run with ``python -m stalk run tests.ops.handlers:NAME``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from stalk import Message, Result, retry


def quick(body: bytes) -> None:
    """Ack everything."""


def slow(body: bytes) -> None:
    """Take a little while, so a test can catch messages in flight."""
    time.sleep(float(os.environ.get("STALK_TEST_SLEEP_S", "0.2")))


def crash_once(body: bytes, message: Message) -> None:
    """Kill the whole worker process the first time any worker sees a message (then ack)."""
    marker = Path(os.environ["STALK_TEST_MARKER"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


def leaky(body: bytes, message: Message) -> Result | None:
    """Ack ``ok``; fail anything else with an error text full of credentials, as SDKs may."""
    if body == b"ok":
        return None
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return retry(
        f"cannot reach amqp://worker:{os.environ['STALK_TEST_WORD']}@broker:5672/ "
        f"with aws_secret_access_key={secret} (secret {secret})",
        delay=60,
    )


def poison_pill(body: bytes) -> None:
    """Record every call in ``STALK_TEST_LOG``; kill the worker process on the body ``pill``.

    The record is written and fsynced before the kill, so a test counts the deliveries that
    reached the handler even of a process that never returned.
    """
    fd = os.open(os.environ["STALK_TEST_LOG"], os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    try:
        os.write(fd, body + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if body == b"pill":
        os._exit(1)
