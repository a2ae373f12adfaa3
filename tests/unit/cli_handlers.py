"""Handlers the day-one CLI tests run as real subprocesses (``tests.unit.cli_handlers:NAME``)."""

from __future__ import annotations

import json

from stalk import Result, fatal


def lookup(body: bytes) -> None:
    """Fail the way real handlers do: a KeyError deep in the user's code."""
    order = json.loads(body)
    _customer(order)


def _customer(order: dict[str, str]) -> str:
    return order["customer"]


def refuse(body: bytes) -> Result:
    """Send everything to the error topic with a plain text."""
    return fatal("no such product")


def parse(body: bytes) -> None:
    """Raise json.JSONDecodeError on bad input (a --fatal-exception in the tests)."""
    json.loads(body)


def chatty(body: bytes) -> None:
    """Log a line per message and take a moment, as a handler with its own logging does."""
    import logging
    import time

    logging.getLogger("workers.chatty").info("handling %s", body.decode())
    time.sleep(0.05)


async def cancels(body: bytes) -> None:
    """Raise the handler's own CancelledError (not stalk's cancellation): hole 2 of issue 14."""
    import asyncio

    raise asyncio.CancelledError("the handler gave up")


def leaky(body: bytes) -> None:
    """Fail with credentials in the error text, as a driver's connect error does: hole 10."""
    import os

    from stalk import Fatal

    raise Fatal(
        "could not connect to postgres://app:pw-hunter2@db:5432/orders "
        f"(password={os.environ.get('DB_PASSWORD', '')})"
    )
