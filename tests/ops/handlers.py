"""Handlers the subprocess tests run with ``python -m stalk run tests.ops.handlers:NAME``."""

from __future__ import annotations

import asyncio
import os
import sys
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


def _record(body: bytes) -> None:
    """Append ``body`` (hex, one line, fsynced) to ``STALK_TEST_LOG``: bodies of any bytes."""
    fd = os.open(os.environ["STALK_TEST_LOG"], os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    try:
        os.write(fd, body.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


#: What :func:`bad_input` and :func:`bad_input_async` do for a body's first word; anything
#: else is handled fine. Each a user's bug the engine must route without losing the worker.
MISBEHAVIOURS = (
    b"raise", b"hang", b"str", b"int", b"true", b"coro", b"exit", b"kbi", b"nan", b"inf",
    b"negative", b"huge",
)  # fmt: skip


def _misbehave(word: bytes) -> object:
    if word == b"raise":
        raise ValueError("a bug in the handler")
    if word == b"str":
        return "ok"
    if word == b"int":
        return 1
    if word == b"true":
        return True
    if word == b"exit":
        sys.exit(3)
    if word == b"kbi":
        raise KeyboardInterrupt
    if word == b"nan":
        return retry("again", delay=float("nan"))
    if word == b"inf":
        return retry("again", delay=float("inf"))
    if word == b"negative":
        return retry("again", delay=-1)
    if word == b"huge":
        return retry("again", delay=1e12)
    return None


def bad_input(body: bytes) -> object:
    """Record the body; then misbehave as its first word says (a sync handler)."""
    _record(body)
    word = body.split(b" ", 1)[0]
    if word == b"hang":
        time.sleep(float(os.environ.get("STALK_TEST_SLEEP_S", "5")))
    if word == b"coro":
        return asyncio.sleep(0)  # a sync handler that forgot to be async
    return _misbehave(word)


async def bad_input_async(body: bytes) -> object:
    """Record the body; then misbehave as its first word says (an async handler)."""
    _record(body)
    word = body.split(b" ", 1)[0]
    if word == b"hang":
        await asyncio.sleep(float(os.environ.get("STALK_TEST_SLEEP_S", "5")))
    if word == b"coro":
        return asyncio.sleep(0)  # returned, not awaited
    if word == b"cancel":
        raise asyncio.CancelledError
    return _misbehave(word)
