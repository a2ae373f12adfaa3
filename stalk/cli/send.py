"""``stalk send``: publish bodies to a source."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from stalk.cli.common import make_adapter, text_arg
from stalk.collectors.base import Adapter, BatchPublisher


async def _send(adapter: Adapter, bodies: list[bytes], attrs: dict[str, str], delay: float) -> int:
    await adapter.open()
    try:
        if isinstance(adapter, BatchPublisher) and len(bodies) > 1:  # one call: all or nothing
            ids = await adapter.publish_batch(bodies, attrs, delay)
        else:
            ids = [await adapter.publish(body, attrs, delay) for body in bodies]
    finally:
        await adapter.close()
    for message_id in ids:
        print(message_id)
    return 0


def read_bodies(args: argparse.Namespace) -> list[bytes]:
    """Return the bodies to send: each argument's bytes exactly as given (``os.fsencode``
    undoes the surrogate escapes Python decodes argv with, so invalid UTF-8 travels as is), and
    for ``-`` each line of stdin without its line ending. Empty lines of stdin are skipped and
    counted on stderr; lines of only spaces are messages like any other."""
    bodies: list[bytes] = []
    skipped = 0
    for body in args.bodies:
        if body != "-":
            bodies.append(os.fsencode(body))
            continue
        for line in sys.stdin.buffer:
            text = line.rstrip(b"\r\n")
            if text:
                bodies.append(text)
            else:
                skipped += 1
    if skipped:
        print(f"stalk: skipped {skipped} empty line(s) of stdin", file=sys.stderr)
    return bodies


def cmd(args: argparse.Namespace) -> int:
    attrs = {
        text_arg(f"--attribute {k}", k): text_arg(f"--attribute {k}", v) for k, v in args.attribute
    }
    bodies = read_bodies(args)
    adapter = make_adapter(args)
    if not bodies:
        print("stalk: nothing to send", file=sys.stderr)
        return 0
    return asyncio.run(_send(adapter, bodies, attrs, args.delay))
