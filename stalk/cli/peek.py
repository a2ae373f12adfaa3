"""``stalk peek``: show messages of a source (an error topic, mostly) without consuming them."""

from __future__ import annotations

import argparse
import asyncio
import json

from stalk.cli.common import make_adapter
from stalk.cli.stats import inspect_only
from stalk.collectors.base import Adapter
from stalk.message import Message
from stalk.ops.peek import as_json, as_text, check_readable, peek


async def _peek(adapter: Adapter, limit: int) -> list[Message]:
    await adapter.open()
    try:
        return await peek(adapter, limit)
    finally:
        await adapter.close()


def cmd(args: argparse.Namespace) -> int:
    inspect_only(args)
    adapter = make_adapter(args)
    check_readable(adapter)
    messages = asyncio.run(_peek(adapter, args.limit))
    for message in messages:
        if args.json:
            print(json.dumps(as_json(message, args.max_body)))
        else:
            print(as_text(message, args.max_body))
    if not args.json:
        print(f"stalk: {len(messages)} message(s) shown of {adapter.describe()}; none consumed")
    return 0
