"""Read messages without consuming them: ``stalk peek``, and the reading side of a dry-run redrive.

Written against the seam: a polling adapter leases messages and releases every one of them
(local: attempts unchanged; SQS: visibility back to 0, which SQS counts as a receive), a
:class:`~stalk.collectors.base.Fetcher` (AMQP, NSQ) takes them and gives them back (AMQP in
place; NSQ with ``REQ 0``, which nsqd counts as an attempt). A push adapter without ``fetch``
cannot peek, and says so.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from stalk.collectors.base import Adapter, Fetcher, PollingAdapter
from stalk.errors import ConfigError
from stalk.message import ATTR_PREFIX, Message

#: Long-poll wait per lease, for brokers whose short poll may miss messages (SQS).
WAIT_S = 1.0
#: Messages asked per lease.
BATCH = 10


def check_readable(adapter: Adapter) -> None:
    """Refuse, before connecting, a backend that cannot read without consuming.

    Raises:
        ConfigError: a push adapter without ``fetch``.
    """
    if not isinstance(adapter, PollingAdapter | Fetcher):
        raise ConfigError(
            f"backend {adapter.name!r} cannot read a queue without consuming it (its "
            "subscribers take what they read); use 'stalk stats' for counts"
        )


class Reader:
    """Take messages of one open adapter and give every one back (or ack chosen ones)."""

    def __init__(self, adapter: Adapter) -> None:
        check_readable(adapter)
        self.adapter = adapter
        if isinstance(adapter, PollingAdapter):
            self._get: Callable[[int], Awaitable[list[Message]]] = lambda n: adapter.get_messages(
                n, WAIT_S
            )
        else:
            assert isinstance(adapter, Fetcher)
            self._get = adapter.fetch
        self.held: list[Message] = []

    async def take(self, limit: int) -> list[Message]:
        """Take up to ``limit`` messages, each once (a lease that lapsed mid-read repeats one)."""
        seen = {id(m) for m in self.held}
        ids = {m.id for m in self.held}
        found: list[Message] = []
        while len(found) < limit:
            batch = await self._get(min(BATCH, limit - len(found)))
            if not batch:
                break
            repeat = False
            for message in batch:
                self.held.append(message)
                if message.id in ids or id(message) in seen:
                    repeat = True
                    continue
                ids.add(message.id)
                found.append(message)
            if repeat:
                break
        return found

    async def ack(self, messages: Sequence[Message]) -> None:
        """Delete ``messages`` (they were moved elsewhere)."""
        if not messages:
            return
        if isinstance(self.adapter, Fetcher) and not isinstance(self.adapter, PollingAdapter):
            await self.adapter.settle_fetched(messages, ack=True)
        else:
            await self.adapter.ack(messages)
        done = {id(m) for m in messages}
        self.held = [m for m in self.held if id(m) not in done]

    async def give_back(self) -> None:
        """Release everything still held: back where it was, for the next consumer."""
        held, self.held = self.held, []
        if isinstance(self.adapter, Fetcher) and not isinstance(self.adapter, PollingAdapter):
            await self.adapter.settle_fetched(held, ack=False)
            return
        for message in held:
            with contextlib.suppress(Exception):  # it comes back when its lease ends anyway
                await self.adapter.release(message)


async def peek(adapter: Adapter, limit: int) -> list[Message]:
    """Return up to ``limit`` messages of the open ``adapter``'s source, leaving them there."""
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    reader = Reader(adapter)
    try:
        return await reader.take(limit)
    finally:
        await reader.give_back()


def show_body(body: bytes, max_bytes: int) -> str:
    """Return ``body`` fit for a terminal: text as is with control characters escaped, binary
    as a Python bytes literal; cut at ``max_bytes`` with the full size said."""
    cut = body[:max_bytes]
    try:
        text = cut.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(body) > max_bytes and exc.start >= len(cut) - 3:  # cut inside a character
            text = cut[: exc.start].decode("utf-8")
        else:
            text = repr(cut)
            return text + (f" ... ({len(body)} bytes)" if len(body) > max_bytes else "")
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return shown + (f" ... ({len(body)} bytes)" if len(body) > max_bytes else "")


def as_json(message: Message, max_bytes: int) -> dict[str, Any]:
    """Return one peeked message as JSON-ready data: text body, else base64."""
    cut = message.body[:max_bytes]
    doc: dict[str, Any] = {"id": message.id, "attempt": message.attempt}
    try:
        doc["body"] = cut.decode("utf-8")
    except UnicodeDecodeError:
        doc["body_base64"] = base64.b64encode(cut).decode()
    doc["body_bytes"] = len(message.body)
    doc["truncated"] = len(message.body) > max_bytes
    doc["attributes"] = dict(message.attributes)
    return doc


def as_text(message: Message, max_bytes: int) -> str:
    """Return one peeked message as a few lines: id, body, then the stalk-* attributes."""
    lines = [f"{message.id}  attempt {message.attempt}  {len(message.body)} bytes"]
    lines.append(f"  body: {show_body(message.body, max_bytes)}")
    for key, value in sorted(message.attributes.items()):
        marker = "" if key.startswith(ATTR_PREFIX) else " (producer)"
        shown = json.dumps(value)[1:-1]
        if len(shown) > 500:
            shown = shown[:500] + f" ... ({len(value)} chars)"
        lines.append(f"  {key}{marker}: {shown}")
    return "\n".join(lines)
