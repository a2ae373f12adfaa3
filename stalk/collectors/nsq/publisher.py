"""Where to publish and how: nsqd discovery, size limits, PUB/MPUB/DPUB confirmed by ``OK``.

Kept apart from the consuming side because ``stalk send``, retries, parking and the error topic
all publish the same way, and nsqd punishes a bad publish by closing the connection (a body
over ``--max-msg-size``: ``E_BAD_MESSAGE``; a DPUB over ``--max-req-timeout``: ``E_INVALID``):
every limit is checked here, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from stalk.collectors.nsq import envelope, http
from stalk.collectors.nsq.settings import NSQSettings
from stalk.collectors.nsq.writer import Writer
from stalk.errors import BackendUnavailable, MessageTooLarge

logger = logging.getLogger(__name__)

#: Default nsqd when neither ``nsqd`` nor ``lookupd`` is given.
DEFAULT_NSQD = "127.0.0.1:4150"


class Publisher:
    """The one publishing connection set of an adapter, and the rules of what nsqd accepts."""

    def __init__(self, writer: Writer, settings: NSQSettings, addresses: list[str]) -> None:
        self.writer = writer
        self.settings = settings
        #: The nsqd TCP addresses found at connect (the reader's, when no lookupd is given).
        self.addresses = addresses

    @classmethod
    async def connect(cls, settings: NSQSettings) -> Publisher:
        """Find nsqd (``nsqd`` option, else lookupd's nodes) and connect to it.

        Raises:
            BackendUnavailable: no nsqd answers within ``connect_timeout_s``, in one line.
        """
        addresses = await find_nsqd(settings)
        writer = Writer(addresses, settings.reconnect_interval_s)
        try:
            await writer.wait_connected(settings.connect_timeout_s)
        except BackendUnavailable:
            writer.close()
            raise
        return cls(writer, settings, addresses)

    def close(self) -> None:
        """Close the connections; no reconnect afterwards."""
        self.writer.close()

    def payload(self, body: bytes, attributes: Mapping[str, str] | None) -> bytes:
        """Return the NSQ body for ``body`` with ``attributes`` (enveloped when any).

        Raises:
            MessageTooLarge: over ``max_message_bytes``, envelope included.
        """
        data = envelope.wrap(body, attributes or {})
        limit = self.settings.max_message_bytes
        if len(data) > limit:
            extra = len(data) - len(body)
            raise MessageTooLarge(
                f"nsq message of {len(data)} bytes (body {len(body)} + envelope {extra}) is "
                f"over nsqd's --max-msg-size of {limit} (option max_message_bytes)"
            )
        return data

    def prepare(self, body: bytes, attributes: Mapping[str, str] | None, delay_s: float) -> bytes:
        """Return the body of a new message; over max-req-timeout it carries its due time."""
        attrs = dict(attributes or {})
        if delay_s > self.settings.max_req_timeout_s:
            attrs[envelope.KEY_DUE_AT] = f"{time.time() + delay_s:.3f}"
            attrs[envelope.KEY_ENQUEUED_AT] = f"{time.time():.6f}"
        return self.payload(body, attrs)

    async def send(
        self, command: str, topic: str, data: bytes | list[bytes], delay_ms: int | None = None
    ) -> None:
        """Send once a connection is up (waiting at most ``connect_timeout_s``); await ``OK``.

        Raises:
            BackendError: refused, unreachable, or the connection failed before the answer.
        """
        await self.writer.wait_connected(self.settings.connect_timeout_s)
        await self.writer.send(command, topic, data, delay_ms)

    async def dpub(self, topic: str, data: bytes, delay_s: float) -> None:
        """DPUB, the delay capped at max-req-timeout (longer is parked by the caller)."""
        cap_ms = int(self.settings.max_req_timeout_s * 1000)
        await self.send("dpub", topic, data, min(max(0, round(delay_s * 1000)), cap_ms))

    async def publish(self, topic: str, data: bytes, delay_s: float) -> None:
        """PUB, or DPUB when ``delay_s`` > 0."""
        if delay_s > 0:
            await self.dpub(topic, data, delay_s)
        else:
            await self.send("pub", topic, data)

    async def publish_many(self, topic: str, datas: Sequence[bytes], delay_s: float) -> None:
        """MPUB in as few commands as ``max_body_bytes`` allows; DPUB each with a delay."""
        if delay_s > 0:
            for data in datas:
                await self.dpub(topic, data, delay_s)
            return
        for chunk in chunks(list(datas), self.settings.max_body_bytes):
            await self.send("mpub", topic, chunk)


async def find_nsqd(settings: NSQSettings) -> list[str]:
    """Return the nsqd TCP addresses to use, of which at least one answers.

    Raises:
        BackendUnavailable: none answers (each address and its error in one line).
    """
    addresses = settings.nsqd_addresses()
    lookupd = settings.lookupd_addresses()
    if not addresses and lookupd:
        for address in lookupd:
            try:
                addresses = await asyncio.to_thread(
                    http.lookupd_nodes, address, settings.connect_timeout_s
                )
            except BackendUnavailable as exc:
                logger.warning("%s", exc)
            if addresses:
                break
    addresses = addresses or ([] if lookupd else [DEFAULT_NSQD])
    timeout_s = settings.connect_timeout_s
    problems = [p for p in await asyncio.gather(*(_probe(a, timeout_s) for a in addresses)) if p]
    if not addresses or len(problems) == len(addresses):
        detail = "; ".join(problems) or f"lookupd {settings.lookupd} knows no nsqd"
        raise BackendUnavailable(
            f"nsq: cannot reach nsqd ({detail}); start nsqd or pass --option nsqd=HOST:PORT"
        )
    return addresses


async def _probe(address: str, timeout_s: float) -> str:
    """Return ``""`` when ``address`` accepts a TCP connection, else what went wrong."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError) as exc:
        return f"{address}: {exc or type(exc).__name__}"
    writer.close()
    await writer.wait_closed()
    return ""


def chunks(payloads: list[bytes], max_body_bytes: int) -> list[list[bytes]]:
    """Split for MPUB: 4 bytes of count plus 4 of size per message must fit max-body-size."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 4
    for payload in payloads:
        if current and size + 4 + len(payload) > max_body_bytes:
            out.append(current)
            current, size = [], 4
        current.append(payload)
        size += 4 + len(payload)
    if current:
        out.append(current)
    return out
