"""The amqp adapter's broker plumbing: connect, declare, confirmed publish, queue counts.

Split from ``amqp.py`` to keep each module readable; the adapter is the only user. Everything
here raises stalk's own errors (:mod:`stalk.errors`) with one line naming the broker without
credentials, never an aio-pika exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
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
from pamqp.commands import Basic

from stalk.backoff import Backoff
from stalk.collectors.amqp import topology as topo
from stalk.errors import BackendError, BackendUnavailable, ConfigError, QueueNotFound

if TYPE_CHECKING:
    from stalk.collectors.amqp.settings import AMQPSettings

logger = logging.getLogger(__name__)

#: Errors of a broker operation that did not get through (channel or connection gone, timeout).
FAILED = (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError, RuntimeError)
#: First pause between connect tries; doubles up to ``reconnect_interval_s``.
FIRST_CONNECT_PAUSE_S = 0.5


def reply_text(exc: BaseException) -> str:
    """Return the broker's reply text of an AMQP error, else the exception text."""
    texts = [a for a in exc.args if isinstance(a, str)]
    return texts[-1] if texts else (str(exc) or type(exc).__name__)


async def connect(settings: AMQPSettings, name: str) -> AbstractRobustConnection:
    """Open a robust connection, retrying for ``connect_wait_s``.

    Raises:
        BackendUnavailable: unreachable or login refused, in one line with what to check.
        ConfigError: the URL does not parse.
    """
    where = topo.safe_url(settings.url)
    deadline = time.monotonic() + settings.connect_wait_s
    pause = Backoff(FIRST_CONNECT_PAUSE_S, settings.reconnect_interval_s)
    while True:
        try:
            return await aio_pika.connect_robust(
                settings.url,
                timeout=settings.connect_timeout_s,
                reconnect_interval=settings.reconnect_interval_s,
                client_properties={"connection_name": name},
            )
        except ProbableAuthenticationError:
            raise BackendUnavailable(
                f"RabbitMQ at {where} refused the login; check user, password and vhost in "
                "--option url / STALK_AMQP_URL"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"amqp url is not valid: {exc}") from None
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
            if time.monotonic() + pause.current_s > deadline:
                raise BackendUnavailable(
                    f"cannot reach RabbitMQ at {where} ({problem}); check the server runs "
                    "(rabbitmqctl status) and --option url / STALK_AMQP_URL"
                ) from None
            logger.warning("RabbitMQ at %s not reachable (%s); retrying", where, problem)
            await asyncio.sleep(pause.next())


async def declare(
    channel: AbstractRobustChannel, settings: AMQPSettings, source: str, errors: str
) -> None:
    """Declare (or check) source, error queue, exchange and binding, as ``declare`` says.

    Declared on a robust channel, so aio-pika declares them again after a reconnect.

    Raises:
        QueueNotFound: passive check of something missing.
        ConfigError: an existing queue or exchange has other arguments.
    """
    where = topo.safe_url(settings.url)
    try:
        if settings.declare != "true":
            await channel.declare_queue(source, passive=True)
            if settings.declare == "passive":
                await channel.declare_queue(errors, passive=True)
                if settings.exchange:
                    await channel.declare_exchange(settings.exchange, passive=True)
            return
        args = topo.queue_arguments(settings.queue_type)
        queue = await channel.declare_queue(source, durable=True, arguments=args)
        await channel.declare_queue(errors, durable=True, arguments=args)
        if settings.exchange:
            exchange = await channel.declare_exchange(
                settings.exchange, settings.exchange_type, durable=True
            )
            await queue.bind(exchange, settings.routing_key or source)
    except ChannelNotFoundEntity as exc:
        raise QueueNotFound(
            f"RabbitMQ at {where}: {reply_text(exc)}; create it, or use --option declare=true"
        ) from None
    except ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"RabbitMQ at {where}: {reply_text(exc)}; set --option queue_type (or "
            "exchange_type) to match the existing one, or use --option declare=passive"
        ) from None


def copy_of(
    body: bytes,
    headers: dict[str, Any],
    message_id: str,
    like: Basic.Properties | None,
) -> aio_pika.Message:
    """Build a persistent message, keeping the original's descriptive properties.

    ``expiration`` and ``user_id`` are not copied: one would cut the delay short, the broker
    refuses the other unless it names the publishing user.
    """
    if like is None:
        return aio_pika.Message(
            body,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            timestamp=time.time(),
        )
    return aio_pika.Message(
        body,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        timestamp=like.timestamp or time.time(),
        content_type=like.content_type,
        content_encoding=like.content_encoding,
        correlation_id=like.correlation_id,
        reply_to=like.reply_to,
        priority=like.priority,
        type=like.message_type,
        app_id=like.app_id,
    )


class Publisher:
    """Confirmed publishes to the source, its delay buckets and the error queue.

    Uses its own channel in confirm mode with ``on_return_raises``: each :meth:`send` returns only
    once RabbitMQ confirmed the message, and raises when it was nacked or could not be routed.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        source: str,
        settings: AMQPSettings,
        buckets: dict[int, float],
    ) -> None:
        self.channel = channel
        self.source = source
        self.settings = settings
        #: delay bucket (ms) -> monotonic time it was last declared (the adapter's, shared).
        self.buckets = buckets

    async def route(self, delay_s: float) -> str:
        """Return the queue a message delayed ``delay_s`` goes to, declaring its bucket if due.

        Raises:
            BackendError: the bucket could not be declared.
        """
        ms = topo.bucket_ms(delay_s)
        if ms == 0:
            return self.source
        if delay_s * 1000 > topo.MAX_DELAY_MS:
            logger.warning("delay %.0fs capped at %.0fs", delay_s, topo.MAX_DELAY_MS / 1000)
        name = topo.delay_queue_name(self.source, ms)
        now = time.monotonic()
        if now - self.buckets.get(ms, -1e18) >= topo.redeclare_every_s(ms):
            args = topo.delay_queue_arguments(self.source, ms, self.settings.queue_type)
            try:
                await self.channel.declare_queue(  # first: no bucket without its marker
                    topo.delay_marker_name(self.source),
                    durable=True,
                    arguments=topo.delay_marker_arguments(),
                    robust=False,
                    timeout=self.settings.timeout_s,
                )
                await self.channel.declare_queue(
                    name,
                    durable=True,
                    arguments=args,
                    robust=False,
                    timeout=self.settings.timeout_s,
                )
            except FAILED as exc:
                raise BackendError(
                    f"cannot declare delay queue {name!r}: {reply_text(exc)}"
                ) from None
            self.buckets[ms] = now
        return name

    async def send(self, queue: str, message: aio_pika.Message) -> None:
        """Publish ``message`` to ``queue`` through the default exchange; wait for the confirm.

        Raises:
            BackendError: unroutable (no such queue) or nacked (queue full, broker trouble).
            BackendUnavailable: no confirm within ``timeout_s`` or the connection is down.
        """
        try:
            await self.channel.default_exchange.publish(
                message, queue, mandatory=True, timeout=self.settings.timeout_s
            )
        except PublishError:
            raise BackendError(f"RabbitMQ has no queue {queue!r} to route to") from None
        except DeliveryError as exc:
            raise BackendError(f"RabbitMQ refused the publish to {queue!r}: {exc}") from None
        except FAILED as exc:
            raise BackendUnavailable(
                f"publish to {queue!r} not confirmed: {reply_text(exc)}"
            ) from None


async def count_many(
    connection: AbstractRobustConnection, queues: Sequence[str]
) -> dict[str, int | None]:
    """Return :func:`count` of each queue.

    One after the other: a missing queue closes its probe's channel, and opening channels in
    parallel while the broker closes others made RabbitMQ refuse the connection ("second
    'channel.open' seen"), so the probes stay sequential (~5 ms each on loopback).
    """
    return {queue: await count(connection, queue) for queue in queues}


async def count(connection: AbstractRobustConnection, queue: str) -> int | None:
    """Return the ready messages of ``queue``, ``None`` if it does not exist.

    Uses a throwaway channel: a passive declare of a missing queue closes its channel.
    """
    try:
        channel = await connection.channel(publisher_confirms=False)
    except FAILED as exc:
        raise BackendUnavailable(f"cannot open a channel: {reply_text(exc)}") from None
    try:
        declared = await channel.declare_queue(queue, passive=True, robust=False)
        found = declared.declaration_result.message_count
        return int(found) if found is not None else None
    except FAILED:
        return None
    finally:
        try:
            await channel.close()
        except FAILED as exc:
            logger.debug("closing a count channel: %s", exc)
