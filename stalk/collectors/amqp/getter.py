"""Messages on request (``basic.get``) for ``stalk peek`` and ``stalk redrive`` on AMQP.

A channel of its own, apart from the consumer's: what it gets is acked or requeued
(``basic.nack(requeue)``, which puts a message back in its place) on that channel, and closing
it requeues whatever is still held, so a peek that dies leaves the queue as it was.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from stalk.collectors.amqp import broker
from stalk.collectors.amqp import topology as topo
from stalk.collectors.base import attributes_of
from stalk.errors import BackendError, QueueNotFound
from stalk.message import ATTR_ATTEMPT, Message

logger = logging.getLogger(__name__)

#: Longest wait for one ``basic.get`` reply.
GET_TIMEOUT_S = 10.0


class Getter:
    """``basic.get`` on one queue over a channel of its own."""

    def __init__(self, connection: AbstractRobustConnection, queue: str) -> None:
        self.connection = connection
        self.queue = queue
        self._channel: AbstractChannel | None = None

    async def fetch(self, max_messages: int) -> list[Message]:
        """Get up to ``max_messages`` messages, held unacked on this channel."""
        if self._channel is None:
            self._channel = await self.connection.channel(publisher_confirms=False)
        try:
            queue = await self._channel.declare_queue(self.queue, passive=True)
        except broker.FAILED as exc:
            self._channel = None
            raise QueueNotFound(f"queue {self.queue!r}: {broker.reply_text(exc)}") from None
        found: list[Message] = []
        for _ in range(max_messages):
            try:
                incoming = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_S)
            except broker.FAILED as exc:
                raise BackendError(
                    f"basic.get on {self.queue!r}: {broker.reply_text(exc)}"
                ) from None
            if incoming is None:
                break
            found.append(self._message(incoming))
        return found

    def _message(self, incoming: AbstractIncomingMessage) -> Message:
        headers = incoming.headers or {}
        counted = topo.header_int(headers.get(topo.X_DELIVERY_COUNT), 0)
        return Message(
            id=incoming.message_id or uuid.uuid4().hex,
            body=incoming.body,
            attributes=attributes_of(headers),
            attempt=topo.header_int(headers.get(ATTR_ATTEMPT), 1) + counted,
            enqueued_at=incoming.timestamp.timestamp() if incoming.timestamp else None,
            source=self.queue,
            receipt=incoming,
            redelivered=bool(incoming.redelivered),
        )

    async def settle(self, messages: Sequence[Message], *, ack: bool) -> None:
        """Ack, or requeue in place, messages :meth:`fetch` returned."""
        for message in messages:
            incoming: AbstractIncomingMessage = message.receipt
            if ack:
                await incoming.ack()
            else:
                await incoming.nack(requeue=True)

    async def close(self) -> None:
        """Close the channel; RabbitMQ requeues what it still held."""
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                await channel.close()
            except broker.FAILED as exc:
                logger.debug("closing the get channel of %s: %s", self.queue, exc)
