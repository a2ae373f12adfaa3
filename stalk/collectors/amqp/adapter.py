"""RabbitMQ (AMQP 0-9-1) adapter on aio-pika: push delivery, delays and attempts kept in the broker.

Flow control
    One consumer on its own channel (:mod:`stalk.collectors.amqp.consumer`), ``basic.qos``
    prefetch = the engine's concurrency (or the ``prefetch`` option); a change re-consumes, as
    RabbitMQ applies QoS to new consumers only (for a moment up to old in-flight + n are
    unsettled). ``pause`` = ``basic.cancel``, ``resume`` = a new ``basic.consume``.

Settling
    ``ack`` after handling, batched: one ``basic.ack(multiple)`` covers a batch up to the oldest
    delivery still unsettled; each delivery is settled at most once. ``release`` is a
    confirmed copy (see Release below). Every publish stalk makes (retry, error copy, poison
    count, release, ``stalk send``) uses a second channel in confirm mode with ``mandatory`` and
    returns only after the confirm; the original is acked only after it.

Delayed retry, no plugin
    A retry is a copy in ``<source>.stalk-delay.<ms>``, a queue with that TTL dead-lettering back
    to the source (:mod:`stalk.collectors.amqp.topology`). The delay lives in RabbitMQ: a worker
    that dies while a retry waits loses nothing, and no worker holds it in memory. The copy carries
    header ``stalk-attempt`` = the next attempt.

Attempts and poison messages
    ``attempt`` = header ``stalk-attempt`` (1 when absent) + ``x-delivery-count`` (quorum queues
    count failed deliveries). A message that kills the worker never yields a Result; RabbitMQ just
    redelivers it with ``redelivered`` set. The adapter reports those facts on the Message
    (``redelivered``; ``deliveries_counted`` False on a classic queue, which keeps no count) and the
    engine's policy decides: an uncounted redelivery is first counted in the broker (the engine
    calls ``retry_later(message, 0)``: a confirmed copy with ``stalk-attempt`` + 1, then the ack),
    and a message delivered more than ``max_retries + 1`` times goes to the error topic as
    ``poison``. Cost on classic queues: the counted copy goes to the back of the queue.

Release
    RabbitMQ cannot tell a crash from a ``basic.nack(requeue)``, so a release stalk makes itself
    (shutdown, sleep, a grace that ran out) is a confirmed copy with the same attempt, then the
    ack: it spends no attempt and never makes a healthy message ``poison``. The copy goes to the
    back of the queue; a nack is the fallback when the copy cannot be published. One count
    remains on quorum queues that stalk cannot avoid: a prefetch change cancels and re-consumes,
    and a delivery RabbitMQ sends to the old consumer while the cancel is under way is returned
    by the broker with ``x-delivery-count`` + 1.

Error topic
    A durable queue (``--error-topic``, default ``<source>-errors``) of the source's type: body
    untouched, the producer's headers plus the ``stalk-*`` failure headers.

Reconnect
    ``connect_robust`` reconnects every ``reconnect_interval_s``; aio-pika re-declares queues,
    binding and QoS, and the adapter consumes again: what is wanted (consuming, the prefetch) is
    recorded before it is tried, and the consumer's keeper retries until RabbitMQ has exactly one
    consumer, so a cut under ``start``/``resume``/a prefetch change never leaves none (/healthz
    fails while it is missing). RabbitMQ redelivers what the lost channel
    held; settling those on the dead channel is skipped, never done on the new one. An
    unreachable broker at ``open`` raises :class:`BackendUnavailable` in one line, at once or
    after ``connect_wait_s`` of retries.

Limits
    RabbitMQ's ``consumer_timeout`` (30 min by default) closes the channel under a longer handler;
    AMQP has no lease to extend, so ``extend`` is a no-op. ``backlog().delayed`` counts every
    delay bucket of the source by name (an earlier process's too); ``in_flight`` is unknown
    without the management API.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence

from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from stalk.collectors.amqp import broker as broker
from stalk.collectors.amqp import topology as topo
from stalk.collectors.amqp.consumer import Consumer
from stalk.collectors.amqp.getter import Getter
from stalk.collectors.amqp.settings import AMQPSettings
from stalk.collectors.base import (
    AdapterFeatures,
    Backlog,
    Deliver,
    PushAdapter,
    attributes_of,
)
from stalk.errors import BackendError, MessageTooLarge
from stalk.message import ATTR_ATTEMPT, Failure, Message

__all__ = ["AMQPAdapter", "AMQPSettings"]

logger = logging.getLogger(__name__)

#: RabbitMQ's default ``max_message_size`` (128 MiB); a bigger publish closes the channel.
MAX_BODY_BYTES = 128 * 1024 * 1024


AMQP_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=topo.MAX_DELAY_MS / 1000,
    delay_precision_s=1.0,
    ordering=True,  # one queue, one consumer: RabbitMQ keeps publish order
    persistent=True,
    visibility_timeout=False,
    release_keeps_attempt=True,  # a release is a copy with the same attempt (see the docstring)
    backlog=True,
)


class AMQPAdapter(PushAdapter):
    """Consume a RabbitMQ queue; the module docstring has the scheme."""

    name = "amqp"
    features = AMQP_FEATURES
    settings_model = AMQPSettings

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: AMQPSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.settings = settings or AMQPSettings()
        self._conn: AbstractRobustConnection | None = None
        self._publisher: broker.Publisher | None = None
        self._consumer: Consumer | None = None
        self._deliver: Deliver | None = None
        #: delay bucket (ms) -> monotonic time it was last declared; outlives a reconnect.
        self._buckets: dict[int, float] = {}
        #: Delay buckets of the source found by the scan of every bucket name (once), the index
        #: of the next name that scan probes, and the lock that keeps counts one at a time.
        self._found_buckets: set[int] = set()
        self._scan_next = 0
        self._counting = asyncio.Lock()
        #: ``basic.get`` for peek and redrive, made on first use.
        self._getter: Getter | None = None

    def describe(self) -> str:
        """Return ``amqp:<queue> (amqp://host:port vhost /)``, without credentials."""
        return f"amqp:{self.source} ({topo.safe_url(self.settings.url)})"

    @property
    def _source(self) -> str:
        assert self.source is not None, "adapter used before bind()"
        return self.source

    @property
    def _errors(self) -> str:
        return self.error_topic or self.default_error_topic(self._source)

    def _ready(self) -> broker.Publisher:
        if self._publisher is None:
            raise BackendError(f"{self.describe()} is not open")
        return self._publisher

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Connect, open a consume and a confirm channel, declare or check the topology."""
        if self._conn is not None:
            return
        topo.check_queue_name(self._source, "--source")
        topo.check_queue_name(self._errors, "--error-topic")
        self._conn = await broker.connect(self.settings, f"stalk {self.source}")
        try:
            consume_ch = await self._conn.channel(publisher_confirms=False)
            publish_ch = await self._conn.channel(on_return_raises=True)
            self._publisher = broker.Publisher(
                publish_ch, self._source, self.settings, self._buckets
            )
            await broker.declare(consume_ch, self.settings, self._source, self._errors)
        except BaseException:
            await self.close()
            raise
        self._consumer = Consumer(
            consume_ch,
            self._source,
            self._on_delivery,
            self.settings.timeout_s,
            on_problem=self.report_delivery,
        )
        consume_ch.reopen_callbacks.add(self._on_reopen)

    async def close(self) -> None:
        """Close the connection; RabbitMQ requeues whatever is unacked. Idempotent."""
        conn, self._conn = self._conn, None
        getter, self._getter = self._getter, None
        if getter is not None:
            await getter.close()
        if self._consumer is not None:
            self._consumer.close()
        self._publisher, self._consumer = None, None
        if conn is not None:
            try:
                await conn.close()
            except broker.FAILED as exc:
                logger.debug("closing %s: %s", self.describe(), exc)

    def _on_reopen(self, *_: object) -> None:
        # the consumer's keeper registers the consumer again on the new channel (consumer.py)
        logger.info("channel to %s reopened; topology restored", self.describe())
        self._buckets.clear()  # a reset broker lost them: declare again
        self._found_buckets.clear()  # and look for the buckets by name again
        self._scan_next = 0

    # ------------------------------------------------------------------ flow control
    def _consumer_ready(self) -> Consumer:
        if self._consumer is None:
            raise BackendError(f"{self.describe()} is not open")
        return self._consumer

    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        """Set the prefetch and start consuming; deliveries go to ``deliver`` on the loop."""
        self._deliver = deliver
        consumer = self._consumer_ready()
        await consumer.set_prefetch(self.settings.prefetch or max_in_flight)
        await consumer.resume()

    async def pause(self) -> None:
        """Cancel the consumer; delivered messages stay ackable on the channel."""
        await self._consumer_ready().pause()

    async def resume(self) -> None:
        """Consume again (a new consumer tag). Idempotent."""
        if self._deliver is not None:
            await self._consumer_ready().resume()

    async def set_max_in_flight(self, n: int) -> None:
        """Set prefetch to ``n`` (unless the ``prefetch`` option fixes it), live."""
        if not self.settings.prefetch:
            await self._consumer_ready().set_prefetch(n)

    # ------------------------------------------------------------------ deliveries
    def _on_delivery(self, raw: DeliveredMessage) -> None:
        if self._deliver is not None:
            self._deliver(self._message(raw))

    def _message(self, raw: DeliveredMessage) -> Message:
        props = raw.header.properties
        headers = props.headers or {}
        counted = topo.header_int(headers.get(topo.X_DELIVERY_COUNT), 0)
        return Message(
            # Outside producers may omit the id; the copies stalk makes then carry this one.
            id=props.message_id or uuid.uuid4().hex,
            body=raw.body,
            attributes=attributes_of(props.headers),
            attempt=topo.header_int(headers.get(ATTR_ATTEMPT), 1) + counted,
            enqueued_at=props.timestamp.timestamp() if props.timestamp else None,
            source=self._source,
            receipt=raw,
            redelivered=bool(raw.redelivered),
            # quorum queues count every failed delivery; classic queues count none
            deliveries_counted=counted > 0 or self.settings.queue_type == "quorum",
        )

    # ------------------------------------------------------------------ settling
    def _holds(self, message: Message) -> DeliveredMessage:
        raw: DeliveredMessage = message.receipt
        if not self._consumer_ready().book.holds(raw):
            raise BackendError(f"message {message.id} is no longer held; RabbitMQ redelivers it")
        return raw

    async def ack(self, messages: Sequence[Message]) -> None:
        """Ack the batch; a delivery whose channel died is skipped (RabbitMQ redelivers it)."""
        done = await self._consumer_ready().book.ack([m.receipt for m in messages])
        if done < len(messages):
            logger.info("%d acks skipped: RabbitMQ redelivers those", len(messages) - done)

    async def release(self, message: Message) -> None:
        """Give back a message stalk did not handle (shutdown, sleep) without spending an attempt.

        Why not ``basic.nack(requeue)``: RabbitMQ cannot tell stalk's own release from a worker
        that died, so the requeued message came back ``redelivered`` (classic) or with
        ``x-delivery-count`` + 1 (quorum), and after a few deploys whose grace ran out healthy
        messages went to the error topic as ``poison``. So a confirmed copy with the same attempt
        goes to the source queue (to its back) and the original is acked. If the copy cannot be
        published the nack is the fallback: nothing is lost, at the price of an attempt. A
        delivery whose channel died is already back in the queue.
        """
        raw: DeliveredMessage = message.receipt
        book = self._consumer_ready().book
        if not book.holds(raw):
            return
        # An uncounted redelivery (its worker died) keeps that delivery counted in the copy.
        uncounted = message.redelivered and not message.deliveries_counted
        headers = topo.republish_headers(
            raw.header.properties.headers,
            message.attributes,
            topo.attempt_header(message.attempt + (1 if uncounted else 0)),
        )
        copy = broker.copy_of(message.body, headers, message.id, raw.header.properties)
        try:
            await self._ready().send(self._source, copy)
        except BackendError as exc:
            logger.warning("release of %s by a copy failed (%s); requeued instead", message.id, exc)
            await book.nack(raw)
            return
        await self.ack([message])

    async def retry_later(self, message: Message, delay_s: float) -> None:
        """Publish a copy (attempt + 1) to the delay bucket, await the confirm, ack the original.

        Raises:
            BackendError: the copy was not confirmed, or the original is no longer held.
        """
        raw = self._holds(message)
        publisher = self._ready()
        headers = topo.republish_headers(
            raw.header.properties.headers,
            message.attributes,
            topo.attempt_header(message.attempt + 1),
        )
        queue = await publisher.route(delay_s)
        copy = broker.copy_of(message.body, headers, message.id, raw.header.properties)
        await publisher.send(queue, copy)
        await self.ack([message])

    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Publish the body with failure headers to the error queue, await the confirm, then ack
        the original.

        Raises:
            BackendError: the copy was not confirmed, or the original is no longer held.
        """
        raw = self._holds(message)
        publisher = self._ready()
        props = raw.header.properties
        headers = topo.republish_headers(props.headers, message.attributes, failure.to_attributes())
        await publisher.send(self._errors, broker.copy_of(message.body, headers, message.id, props))
        await self.ack([message])

    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        """Publish straight to the source queue (or its delay bucket), confirmed."""
        if len(body) > MAX_BODY_BYTES:
            raise MessageTooLarge(f"body of {len(body)} bytes is over RabbitMQ's {MAX_BODY_BYTES}")
        publisher = self._ready()
        message_id = uuid.uuid4().hex
        queue = await publisher.route(delay_s)
        await publisher.send(queue, broker.copy_of(body, dict(attributes or {}), message_id, None))
        return message_id

    async def backlog(self) -> Backlog | None:
        """Count ready messages of the source, the error queue and every delay bucket of the
        source: those used here and those an earlier process left (found by name once, see
        :meth:`_scan_buckets`), so ``--until-empty`` waits for their retries to come back.

        One count at a time per adapter (a lock): parallel channel opens while the broker
        closes others' channels made RabbitMQ refuse the connection.
        """
        self._ready()
        conn = self._conn
        assert conn is not None
        async with self._counting:
            ready = await broker.count(conn, self._source)
            errors = await broker.count(conn, self._errors)
            names = [self._bucket(ms) for ms in self._found_buckets | set(self._buckets)]
            delayed = sum(n or 0 for n in (await broker.count_many(conn, names)).values())
            if not ready and not delayed and self._scan_next < len(topo.all_buckets()):
                delayed += await self._scan_buckets(conn)
        return Backlog(ready=ready, delayed=delayed, errors=errors)

    def _bucket(self, ms: int) -> str:
        return topo.delay_queue_name(self._source, ms)

    async def _scan_buckets(self, conn: AbstractRobustConnection) -> int:
        """Find the delay buckets of the source that exist, by name; return what they hold.

        AMQP cannot list queues without the management plugin, but the bucket ladder is a fixed
        list of ~150 names, probed with passive declares (~1 s on loopback), and only where the
        source's marker queue (:func:`topology.delay_marker_name`) exists. Done once per
        connection, and only when the source looks drained (so a busy worker never pays it);
        each missing name is one ``not_found`` line in RabbitMQ's log. A scan cut short (a
        caller's timeout) resumes where it stopped. Later buckets are this process's own.
        """
        every = topo.all_buckets()
        held = 0
        if (
            self._scan_next == 0
            and await broker.count(conn, topo.delay_marker_name(self._source)) is None
        ):
            self._scan_next = len(every)  # no marker: no stalk process ever delayed on this source
            return 0
        while self._scan_next < len(every):
            ms = every[self._scan_next]
            found = await broker.count(conn, self._bucket(ms))
            self._scan_next += 1
            if found is not None and ms not in self._found_buckets:
                self._found_buckets.add(ms)
                held += found if ms not in self._buckets else 0
        return held

    # ------------------------------------------------------------------ on request (Fetcher)
    async def fetch(self, max_messages: int) -> list[Message]:
        """``basic.get`` up to ``max_messages`` of the source, held until settled (peek)."""
        self._ready()
        assert self._conn is not None
        if self._getter is None:
            self._getter = Getter(self._conn, self._source)
        return await self._getter.fetch(max_messages)

    async def settle_fetched(self, messages: Sequence[Message], *, ack: bool) -> None:
        """Ack fetched messages, or requeue them in place."""
        if self._getter is not None:
            await self._getter.settle(messages, ack=ack)
