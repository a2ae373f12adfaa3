"""RabbitMQ (AMQP 0-9-1) adapter on aio-pika: push delivery, delays and attempts kept in the broker.

Flow control
    One consumer on its own channel; ``basic.qos`` prefetch = the engine's concurrency (or the
    ``prefetch`` option). RabbitMQ applies a new prefetch only to consumers created after it, so
    ``set_max_in_flight`` sets the QoS and re-consumes; messages the old consumer holds stay
    ackable (for a moment up to old in-flight + n are unsettled). ``pause`` is ``basic.cancel``,
    ``resume`` a new ``basic.consume``.

Settling
    ``ack`` after handling; ``release`` is ``basic.nack(requeue=True)``. Every publish stalk makes
    (retry copy, error copy, poison count, ``stalk send``) goes through a separate channel in
    confirm mode with ``mandatory``: it returns only once RabbitMQ confirmed it, and it raises on
    a nack or an unroutable message. The original is acked only after that confirm.

Delayed retry, no plugin
    A retry is a copy published to ``<source>.stalk-delay.<ms>``, a queue with that TTL which
    dead-letters back to the source (see :mod:`stalk.collectors._amqp_topology`). The delay lives
    in RabbitMQ: a worker that dies while a retry waits loses nothing, and nothing is held in
    worker memory. The copy carries header ``stalk-attempt`` = the next attempt number.

Attempts and poison messages
    ``attempt`` = header ``stalk-attempt`` (1 when absent) + ``x-delivery-count`` (quorum queues
    count failed deliveries themselves). A message that kills the worker never returns a Result,
    so the engine never counts it; RabbitMQ just redelivers it with ``redelivered`` set. Scheme:
    when a redelivered message carries no broker count, stalk does not hand it to the handler;
    it publishes a copy with ``stalk-attempt`` + 1 (confirmed) and acks the original, so the
    count is in the broker before the handler runs again. Once the next attempt would exceed
    ``max_retries + 1`` (or, on quorum queues, the counted attempt already does) the message goes
    to the error topic with reason ``poison`` instead. Cost: RabbitMQ cannot tell a crash from a
    release on shutdown, so a message released unhandled also spends one attempt; the redelivered
    copy goes to the back of the queue.

Error topic
    A durable queue (``--error-topic``, default ``<source>-errors``) of the source's type,
    receiving the body untouched and the producer's headers plus the ``stalk-*`` failure headers.

Reconnect
    ``connect_robust`` reconnects every ``reconnect_interval_s`` and re-declares the queues, the
    binding, the QoS and the consumer. Unacked messages of the lost channel are redelivered by
    RabbitMQ; settling them on the dead channel is logged and skipped (never acked on the new
    one). An unreachable broker at ``open`` raises :class:`BackendUnavailable` in one line at once,
    or after ``connect_wait_s`` of retries.

Limits
    RabbitMQ's ``consumer_timeout`` (30 min by default) closes the channel of a handler that runs
    longer; AMQP has no lease to extend, so ``extend`` is a no-op. ``backlog().delayed`` counts
    only delay buckets this process used; ``in_flight`` is unknown without the management API.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from stalk.collectors import _amqp_topology as topo
from stalk.collectors.base import (
    AdapterFeatures,
    AdapterSettings,
    Backlog,
    Deliver,
    PushAdapter,
    attributes_of,
    build_settings,
)
from stalk.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    MessageTooLarge,
    QueueNotFound,
)
from stalk.message import ATTR_ATTEMPT, Failure, Message

logger = logging.getLogger(__name__)

#: RabbitMQ's default ``max_message_size`` (128 MiB); bigger publishes close the channel.
MAX_BODY_BYTES = 128 * 1024 * 1024
#: Failure reason of a message redelivered more than ``max_retries`` times without a Result.
REASON_POISON = "poison"
#: Errors that mean "this delivery's channel is gone": RabbitMQ has already requeued it.
STALE = (AMQPError, ChannelInvalidStateError, ConnectionError, RuntimeError)
#: Errors of a broker operation that did not get through.
FAILED = (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError, RuntimeError)


class AMQPSettings(AdapterSettings):
    """Options of ``--backend amqp`` (``--option key=value`` or ``STALK_AMQP_<KEY>``)."""

    model_config = SettingsConfigDict(env_prefix="STALK_AMQP_", extra="forbid")

    #: Broker URL; user and password never appear in logs or ``describe()``.
    url: str = "amqp://guest:guest@127.0.0.1/"
    #: Exchange to bind the source queue to ("" = none; producers publish to the queue).
    exchange: str = ""
    #: Type of ``exchange`` when stalk declares it.
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "direct"
    #: Binding key of the source on ``exchange``; default the source name.
    routing_key: str | None = None
    #: ``true``: declare source, error queue, exchange, binding. ``passive``: check they exist.
    #: ``false``: declare nothing (only the source is checked, to consume it).
    declare: Literal["true", "false", "passive"] = "true"
    #: Type of the source and error queues (and of the delay buckets).
    queue_type: topo.QueueType = "classic"
    #: Prefetch when it should not follow the engine's concurrency (0 = follow it).
    prefetch: int = Field(default=0, ge=0, le=65535)
    #: Redeliveries without a Result (worker crashes) allowed before the error topic; the engine
    #: passes its own ``max_retries`` through ``bind`` when it can.
    max_retries: int = Field(default=5, ge=0)
    #: TCP + AMQP handshake limit of one connection attempt.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    #: Keep trying to connect at ``open`` this long before failing (0 = fail at once).
    connect_wait_s: float = Field(default=0.0, ge=0)
    #: Pause between reconnection attempts after the connection was lost.
    reconnect_interval_s: float = Field(default=2.0, gt=0)
    #: Longest wait for one broker operation (publish confirm, declare, consume).
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("declare", mode="before")
    @classmethod
    def _normalise_declare(cls, value: object) -> object:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value.strip().lower() if isinstance(value, str) else value


AMQP_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=topo.MAX_DELAY_MS / 1000,
    delay_precision_s=1.0,
    ordering=False,
    persistent=True,
    native_attempts=False,
    visibility_timeout=False,
    backlog=True,
    binary_body=True,
)


class AMQPAdapter(PushAdapter):
    """Consume a RabbitMQ queue; see the module docstring for the scheme."""

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
        #: Poison limit; see the module docstring.
        self.max_retries = self.settings.max_retries
        self._conn: AbstractRobustConnection | None = None
        self._consume_ch: AbstractRobustChannel | None = None
        self._publish_ch: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._deliver: Deliver | None = None
        self._tag: str | None = None
        self._prefetch = 1
        self._flow = asyncio.Lock()
        #: delay bucket (ms) -> monotonic time it was last declared.
        self._buckets: dict[int, float] = {}

    @classmethod
    def from_options(
        cls, source: str | None, error_topic: str | None, options: Mapping[str, str]
    ) -> AMQPAdapter:
        """Build the adapter from ``--option`` pairs and ``STALK_AMQP_*`` variables."""
        settings = build_settings(cls.settings_model, cls.name, options)
        assert isinstance(settings, AMQPSettings)
        return cls(source, error_topic=error_topic, settings=settings)

    def bind(
        self,
        source: str | None,
        error_topic: str | None,
        visibility_timeout_s: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Take names and lease from the engine, and its ``max_retries`` as the poison limit."""
        super().bind(source, error_topic, visibility_timeout_s)
        if max_retries is not None:
            self.max_retries = max_retries

    def describe(self) -> str:
        """Return ``amqp:<queue> (amqp://host:port vhost /)``, without credentials."""
        return f"amqp:{self.source} ({topo.safe_url(self.settings.url)})"

    # ------------------------------------------------------------------ lifecycle
    @property
    def _source(self) -> str:
        assert self.source is not None, "adapter used before bind()"
        return self.source

    @property
    def _errors(self) -> str:
        return self.error_topic or self.default_error_topic(self._source)

    def _channels(self) -> tuple[AbstractRobustChannel, AbstractRobustChannel]:
        if self._consume_ch is None or self._publish_ch is None:
            raise BackendError(f"{self.describe()} is not open")
        return self._consume_ch, self._publish_ch

    async def open(self) -> None:
        """Connect, open a consume and a confirm channel, and declare or check the topology."""
        if self._conn is not None:
            return
        self._conn = await self._connect()
        try:
            self._consume_ch = await self._conn.channel(publisher_confirms=False)
            self._publish_ch = await self._conn.channel(on_return_raises=True)
            self._queue = await self._declare(self._consume_ch)
        except BaseException:
            await self.close()
            raise
        self._conn.reconnect_callbacks.add(self._on_reconnect)

    async def _connect(self) -> AbstractRobustConnection:
        where = topo.safe_url(self.settings.url)
        deadline = time.monotonic() + self.settings.connect_wait_s
        pause_s = 0.5
        while True:
            try:
                return await aio_pika.connect_robust(
                    self.settings.url,
                    timeout=self.settings.connect_timeout_s,
                    reconnect_interval=self.settings.reconnect_interval_s,
                    client_properties={"connection_name": f"stalk {self.source}"},
                )
            except ProbableAuthenticationError:
                raise BackendUnavailable(
                    f"RabbitMQ at {where} refused the login; check user, password and vhost "
                    "in --option url / STALK_AMQP_URL"
                ) from None
            except ValueError as exc:
                raise ConfigError(f"amqp url is not valid: {exc}") from None
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
                if time.monotonic() + pause_s > deadline:
                    raise BackendUnavailable(
                        f"cannot reach RabbitMQ at {where} ({problem}); check the server runs "
                        "(rabbitmqctl status) and --option url / STALK_AMQP_URL"
                    ) from None
                logger.warning("RabbitMQ at %s not reachable (%s); retrying", where, problem)
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, self.settings.reconnect_interval_s)

    async def _declare(self, channel: AbstractRobustChannel) -> AbstractRobustQueue:
        s, source = self.settings, self._source
        try:
            if s.declare != "true":
                queue = await channel.declare_queue(source, passive=True)
                if s.declare == "passive":
                    await channel.declare_queue(self._errors, passive=True)
                    if s.exchange:
                        await channel.declare_exchange(s.exchange, passive=True)
                return queue
            args = topo.queue_arguments(s.queue_type)
            queue = await channel.declare_queue(source, durable=True, arguments=args)
            await channel.declare_queue(self._errors, durable=True, arguments=args)
            if s.exchange:
                exchange = await channel.declare_exchange(s.exchange, s.exchange_type, durable=True)
                await queue.bind(exchange, s.routing_key or source)
            return queue
        except ChannelNotFoundEntity as exc:
            raise QueueNotFound(
                f"RabbitMQ at {topo.safe_url(s.url)}: {_reply(exc)}; create it, or run with "
                "--option declare=true"
            ) from None
        except ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"RabbitMQ at {topo.safe_url(s.url)}: {_reply(exc)}; set --option queue_type "
                "(or exchange_type) to match the existing one, or use --option declare=passive"
            ) from None

    def _on_reconnect(self, *_: object) -> None:
        logger.info("reconnected to %s; topology and consumer restored", self.describe())
        self._buckets.clear()  # the broker may have lost them (reset node): declare again

    async def close(self) -> None:
        """Close the connection; RabbitMQ requeues whatever is still unacked. Idempotent."""
        conn, self._conn = self._conn, None
        self._consume_ch = self._publish_ch = self._queue = None
        self._tag = None
        if conn is not None:
            try:
                await conn.close()
            except FAILED as exc:
                logger.debug("closing %s: %s", self.describe(), exc)

    # ------------------------------------------------------------------ flow control
    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        """Set the prefetch and start consuming; deliveries go to ``deliver`` on the loop."""
        self._deliver = deliver
        self._prefetch = self.settings.prefetch or max_in_flight
        consume_ch, _ = self._channels()
        await consume_ch.set_qos(prefetch_count=self._prefetch, timeout=self.settings.timeout_s)
        await self.resume()

    async def pause(self) -> None:
        """Cancel the consumer; delivered messages stay ackable on the channel."""
        async with self._flow:
            await self._cancel()

    async def resume(self) -> None:
        """Consume again (a new consumer tag). Idempotent."""
        async with self._flow:
            if self._tag is None and self._queue is not None and self._deliver is not None:
                self._tag = await self._queue.consume(
                    self._on_delivery, timeout=self.settings.timeout_s
                )

    async def set_max_in_flight(self, n: int) -> None:
        """Set prefetch to ``n`` and re-consume so RabbitMQ applies it (unless ``prefetch``)."""
        if self.settings.prefetch or n == self._prefetch:
            return
        async with self._flow:
            self._prefetch = n
            consume_ch, _ = self._channels()
            await consume_ch.set_qos(prefetch_count=n, timeout=self.settings.timeout_s)
            if self._tag is not None and self._queue is not None:
                await self._cancel()
                self._tag = await self._queue.consume(
                    self._on_delivery, timeout=self.settings.timeout_s
                )

    async def _cancel(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None and self._queue is not None:
            try:
                await self._queue.cancel(tag, timeout=self.settings.timeout_s)
            except FAILED as exc:  # the consumer died with its channel already
                logger.debug("cancel of consumer %s: %s", tag, exc)

    async def _on_delivery(self, raw: AbstractIncomingMessage) -> None:
        headers = raw.headers
        attempt = topo.header_int(headers.get(ATTR_ATTEMPT), 1)
        counted = topo.header_int(headers.get(topo.X_DELIVERY_COUNT), 0)
        attempt += counted
        limit = self.max_retries + 1
        if raw.redelivered and (not counted or attempt > limit):
            await self._on_redelivery(raw, attempt, counted > 0)
            return
        assert self._deliver is not None
        self._deliver(self._message(raw, attempt))

    async def _on_redelivery(
        self, raw: AbstractIncomingMessage, attempt: int, counted: bool
    ) -> None:
        """Count a redelivery in the broker before handling it again; see the module docstring."""
        message = self._message(raw, attempt - 1 if counted else attempt)
        try:
            if counted or attempt + 1 > self.max_retries + 1:
                made = message.attempt
                text = (
                    f"delivered {made} times without being settled: the worker died or lost its "
                    f"connection while holding it (max_retries={self.max_retries})"
                )
                await self.publish_error(message, Failure.build(message, REASON_POISON, text))
                logger.warning("message %s to error topic as poison", message.id)
            else:
                headers = topo.republish_headers(raw.headers, {}, topo.attempt_header(attempt + 1))
                await self._send(self._source, raw.body, headers, raw, message.id)
            await raw.ack()
        except (BackendError, *STALE) as exc:
            # Leave it to RabbitMQ, but not in a tight loop: requeue after a pause.
            logger.error("could not count redelivered message %s (%s)", message.id, exc)
            await asyncio.sleep(self.settings.reconnect_interval_s)
            await _quietly(raw.nack(requeue=True))

    def _message(self, raw: AbstractIncomingMessage, attempt: int) -> Message:
        stamp = raw.timestamp
        return Message(
            # Outside producers may omit the id; the copies stalk makes then carry this one.
            id=raw.message_id or uuid.uuid4().hex,
            body=raw.body,
            attributes=attributes_of(raw.headers),
            attempt=attempt,
            enqueued_at=stamp.timestamp() if stamp is not None else None,
            source=self._source,
            receipt=raw,
        )

    # ------------------------------------------------------------------ settling
    async def ack(self, messages: Sequence[Message]) -> None:
        """Ack each delivery; one whose channel died is skipped (RabbitMQ redelivers it)."""
        stale = 0
        for message in messages:
            try:
                await message.receipt.ack()
            except STALE:
                stale += 1
        if stale:
            logger.info("%d acks skipped: their channel closed, RabbitMQ redelivers them", stale)

    async def release(self, message: Message) -> None:
        """Nack with requeue; a delivery whose channel died is already back in the queue."""
        await _quietly(message.receipt.nack(requeue=True))

    async def retry_later(self, message: Message, delay_s: float) -> None:
        """Publish a copy (attempt + 1) to the delay bucket, await the confirm, ack the original.

        Raises:
            BackendError: the copy was not confirmed, or the original's channel is gone.
        """
        raw = _live(message)
        headers = topo.republish_headers(
            raw.headers, message.attributes, topo.attempt_header(message.attempt + 1)
        )
        route = await self._route(delay_s)
        await self._send(route, message.body, headers, raw, message.id)
        await _quietly(raw.ack())

    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Publish the body and failure headers to the error queue; return after the confirm."""
        raw = _live(message) if isinstance(message.receipt, AbstractIncomingMessage) else None
        headers = topo.republish_headers(
            raw.headers if raw else None, message.attributes, failure.to_attributes()
        )
        await self._send(self._errors, message.body, headers, raw, message.id)

    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        """Publish straight to the source queue (or its delay bucket); confirmed."""
        if len(body) > MAX_BODY_BYTES:
            raise MessageTooLarge(f"body of {len(body)} bytes is over RabbitMQ's {MAX_BODY_BYTES}")
        message_id = uuid.uuid4().hex
        route = await self._route(delay_s)
        await self._send(route, body, dict(attributes or {}), None, message_id)
        return message_id

    async def _route(self, delay_s: float) -> str:
        """Return the queue a message delayed ``delay_s`` goes to, declaring its bucket if due."""
        ms = topo.bucket_ms(delay_s)
        if ms == 0:
            return self._source
        name = topo.delay_queue_name(self._source, ms)
        now = time.monotonic()
        if now - self._buckets.get(ms, -1e18) >= topo.redeclare_every_s(ms):
            _, publish_ch = self._channels()
            args = topo.delay_queue_arguments(self._source, ms, self.settings.queue_type)
            try:
                await publish_ch.declare_queue(
                    name,
                    durable=True,
                    arguments=args,
                    robust=False,
                    timeout=self.settings.timeout_s,
                )
            except FAILED as exc:
                raise BackendError(f"cannot declare delay queue {name!r}: {_reply(exc)}") from None
            self._buckets[ms] = now
        return name

    async def _send(
        self,
        queue: str,
        body: bytes,
        headers: dict[str, Any],
        like: AbstractIncomingMessage | None,
        message_id: str,
    ) -> None:
        """Publish to ``queue`` through the default exchange and wait for the confirm."""
        _, publish_ch = self._channels()
        outgoing = aio_pika.Message(
            body,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            timestamp=like.timestamp if like is not None and like.timestamp else time.time(),
            content_type=like.content_type if like is not None else None,
            content_encoding=like.content_encoding if like is not None else None,
            correlation_id=like.correlation_id if like is not None else None,
            type=like.type if like is not None else None,
            app_id=like.app_id if like is not None else None,
        )
        try:
            await publish_ch.default_exchange.publish(
                outgoing, queue, mandatory=True, timeout=self.settings.timeout_s
            )
        except PublishError:
            raise BackendError(f"RabbitMQ has no queue {queue!r} to route to") from None
        except DeliveryError as exc:
            raise BackendError(f"RabbitMQ refused the publish to {queue!r}: {exc}") from None
        except FAILED as exc:
            raise BackendUnavailable(f"publish to {queue!r} not confirmed: {_reply(exc)}") from None

    # ------------------------------------------------------------------ counts
    async def backlog(self) -> Backlog | None:
        """Count ready messages of the source and error queue, and of the known delay buckets."""
        delayed = [
            await self._count(topo.delay_queue_name(self._source, ms)) for ms in self._buckets
        ]
        return Backlog(
            ready=await self._count(self._source),
            delayed=sum(n or 0 for n in delayed) if delayed else None,
            errors=await self._count(self._errors),
        )

    async def _count(self, queue: str) -> int | None:
        """Passive-declare ``queue`` on a throwaway channel (a miss closes the channel)."""
        if self._conn is None:
            raise BackendError(f"{self.describe()} is not open")
        try:
            channel = await self._conn.channel(publisher_confirms=False)
        except FAILED as exc:
            raise BackendUnavailable(f"cannot open a channel: {_reply(exc)}") from None
        try:
            declared = await channel.declare_queue(queue, passive=True, robust=False)
            result = declared.declaration_result
            return int(result.message_count) if result.message_count is not None else None
        except FAILED:
            return None
        finally:
            await _quietly(channel.close())


def _live(message: Message) -> AbstractIncomingMessage:
    """Return the delivery behind ``message`` if its channel is open, else raise BackendError."""
    raw: AbstractIncomingMessage = message.receipt
    try:
        raw.channel  # noqa: B018 - raises when the channel closed
    except STALE:
        raise BackendError(
            f"channel of message {message.id} closed; RabbitMQ redelivers it"
        ) from None
    return raw


async def _quietly(awaitable: Any) -> None:
    """Await a settle whose failure only means RabbitMQ already requeued the message."""
    try:
        await awaitable
    except STALE as exc:
        logger.debug("settle skipped: %s", exc)


def _reply(exc: BaseException) -> str:
    """Return the broker's reply text of an AMQP error, else the exception text."""
    texts = [a for a in exc.args if isinstance(a, str)]
    return texts[-1] if texts else (str(exc) or type(exc).__name__)
