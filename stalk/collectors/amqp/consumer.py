"""The amqp adapter's consumer: prefetch, pause and resume, re-consume after a reopen, settling.

The consumer sits on aiormq, the transport under aio-pika, without aio-pika's per-message
``IncomingMessage`` and its extra task: measured 13-55% faster than a raw aio-pika consumer here
(benchmarks/amqp.py). aio-pika still owns the connection and the robust channel, which restore the
QoS and the declared queues after a reconnect; the consumer itself is consumed again here.

What is wanted (consuming or not, the prefetch) is recorded first, and a keeper task makes the
broker match it: after a reopen, after a ``basic.consume`` or ``basic.qos`` that a connection cut
broke, and on a periodic check. No single call has to succeed for the consumer to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage

from stalk.backoff import Backoff
from stalk.collectors.amqp.broker import FAILED
from stalk.tasks import TaskSet

logger = logging.getLogger(__name__)

#: Called on the loop for each delivery, after it is recorded as unsettled.
OnDelivery = Callable[[DeliveredMessage], None]
#: Called with why the consumer is missing though wanted, and with None once it is back.
OnProblem = Callable[[str | None], None]
#: How often the keeper checks the consumer is still registered without being told to.
CHECK_S = 5.0
#: First and longest pause between the keeper's tries to register the consumer again.
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0


def registered(channel: AbstractChannel) -> dict[str, Any]:
    """The consumers aiormq has on ``channel`` (it drops one RabbitMQ cancels)."""
    consumers: dict[str, Any] = getattr(channel, "consumers", {})
    return consumers


class Unsettled:
    """The book of delivery tags on the consume channel not yet acked or nacked.

    RabbitMQ closes a channel that settles a tag twice, and ``basic.ack(multiple)`` may only cover
    tags that are all done: both need this book. Tags restart at 1 on every new channel, so the
    book belongs to one channel and starts over when deliveries come from another; a delivery of
    an older channel is not held (RabbitMQ requeued it when that channel closed).
    """

    def __init__(self) -> None:
        self.channel: AbstractChannel | None = None
        self.tags: set[int] = set()

    def add(self, raw: DeliveredMessage) -> None:
        """Record a delivery as unsettled."""
        if raw.channel is not self.channel:
            self.channel, self.tags = raw.channel, set()
        self.tags.add(raw.delivery_tag or 0)

    def holds(self, raw: DeliveredMessage) -> bool:
        """True while ``raw`` is unsettled on the live channel."""
        return (
            raw.channel is self.channel
            and not raw.channel.is_closed
            and (raw.delivery_tag or 0) in self.tags
        )

    def take(self, raw: DeliveredMessage) -> bool:
        """Claim the one settle of ``raw``; False if settled already or no longer held."""
        if not self.holds(raw):
            return False
        self.tags.discard(raw.delivery_tag or 0)
        return True

    async def ack(self, raws: Sequence[DeliveredMessage]) -> int:
        """Ack what is still held, in as few frames as the book allows; return how many."""
        tags = sorted(raw.delivery_tag or 0 for raw in raws if self.take(raw))
        channel = self.channel
        if not tags or channel is None:
            return 0
        oldest = min(self.tags, default=tags[-1] + 1)
        covered = [t for t in tags if t < oldest]
        try:
            if len(covered) > 1:  # all up to the oldest unsettled are done: one frame for them
                await channel.basic_ack(covered[-1], multiple=True, wait=False)
                tags = tags[len(covered) :]
            for tag in tags:
                await channel.basic_ack(tag, wait=False)
        except FAILED as exc:
            logger.info("acks skipped (%s); RabbitMQ redelivers those messages", exc)
            return 0
        return len(tags) + (len(covered) if len(covered) > 1 else 0)

    async def nack(self, raw: DeliveredMessage) -> None:
        """Requeue ``raw`` if still held."""
        if self.take(raw):
            try:
                await raw.channel.basic_nack(raw.delivery_tag or 0, requeue=True, wait=False)
            except FAILED as exc:
                logger.debug("nack skipped: %s", exc)


class Consumer:
    """The one consumer of ``queue`` on ``channel``, and the book of what it delivered.

    RabbitMQ applies ``basic.qos`` only to consumers created after it, so a prefetch change
    cancels and consumes again; what the old consumer holds stays ackable on the channel.

    ``resume`` and ``set_prefetch`` record what is wanted and try it at once; when that fails (the
    connection was cut under it) they log and leave it to the keeper, which retries with backoff
    until the broker has exactly one consumer on the live channel with the wanted prefetch, and
    reports the problem meanwhile (``on_problem``, which the adapter turns into /healthz).
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        on_delivery: OnDelivery,
        timeout_s: float,
        on_problem: OnProblem | None = None,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.on_delivery = on_delivery
        self.timeout_s = timeout_s
        self.on_problem = on_problem
        self.book = Unsettled()
        #: The prefetch wanted; ``_qos``/``_qos_on``: the one last applied, and on which channel.
        self.prefetch = 0
        self._qos = 0
        self._qos_on: AbstractChannel | None = None
        self._wanted = False
        self._tag: str | None = None
        self._tag_on: AbstractChannel | None = None
        self._problem: str | None = None
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._tasks = TaskSet(logger, "amqp consumer")
        channel.reopen_callbacks.add(self._on_reopen)

    @property
    def consuming(self) -> bool:
        """True while a consumer is registered with RabbitMQ on a channel that is open."""
        channel = self._tag_on
        return (
            self._tag is not None
            and channel is not None
            and not channel.is_closed
            and self._tag in registered(channel)
        )

    @property
    def in_sync(self) -> bool:
        """True when the broker has what is wanted: no consumer, or one with the prefetch."""
        if not self._wanted:
            return True
        return self.consuming and self._qos_on is self._tag_on and self._qos == self.prefetch

    async def set_prefetch(self, n: int) -> None:
        """Want ``basic.qos`` ``n``; while consuming, re-consume so that RabbitMQ applies it."""
        self.prefetch = n
        await self._sync_now()

    async def resume(self) -> None:
        """Want a consumer (a new consumer tag unless one is registered already)."""
        self._wanted = True
        await self._sync_now()

    async def pause(self) -> None:
        """Cancel the consumer (``basic.cancel``); delivered messages stay ackable."""
        self._wanted = False
        async with self._lock:
            await self._cancel()
        self._report(None)

    def close(self) -> None:
        """Forget the consumer; the connection's close cancels it on the broker."""
        self._wanted, self._tag = False, None
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        self._tasks.cancel()

    async def _deliver(self, raw: DeliveredMessage) -> None:
        self.book.add(raw)
        self.on_delivery(raw)

    # ------------------------------------------------------------------ making it so
    async def _sync_now(self) -> None:
        """Try to match what is wanted now; on failure the keeper retries (never dropped)."""
        self._keep()
        if self.in_sync:
            return
        try:
            async with self._lock:
                await self._converge()
        except Exception as exc:  # a cut under basic.qos/consume: the keeper tries again
            self._failed(exc)
            self._kick.set()

    async def _converge(self) -> None:
        """Under the lock: set the prefetch and register the one consumer on the live channel."""
        if not self._wanted:
            return
        if self.channel.is_closed:  # checked first: no wait for a reconnect with the lock held
            raise ConnectionError("the consume channel is closed; waiting for it to reopen")
        channel = await self.channel.get_underlay_channel()
        live = self.consuming and self._tag_on is channel
        if self._qos_on is not channel or self._qos != self.prefetch:
            prefetch = self.prefetch
            # through the robust channel, which re-applies it after a reopen
            await asyncio.wait_for(self.channel.set_qos(prefetch_count=prefetch), self.timeout_s)
            self._qos, self._qos_on = prefetch, channel
            if live:  # RabbitMQ applies a new QoS to new consumers only
                await self._cancel()
                live = False
        if not live:
            await self._cancel()  # a stale tag (its channel died) is only forgotten
            await self._consume(channel)
        self._report(None)

    async def _consume(self, channel: AbstractChannel) -> None:
        tag = f"stalk-{uuid.uuid4().hex}"
        try:
            await channel.basic_consume(
                self.queue, self._deliver, consumer_tag=tag, timeout=self.timeout_s
            )
        except BaseException:
            # The broker may have registered it though the reply was lost on a live channel:
            # cancel it by its tag, so that a retry cannot leave two consumers.
            registered(channel).pop(tag, None)
            if not channel.is_closed:
                try:
                    await channel.basic_cancel(tag, timeout=self.timeout_s)
                except Exception as exc:
                    logger.debug("cancel of the unconfirmed consumer %s: %s", tag, exc)
            raise
        self._tag, self._tag_on = tag, channel

    async def _cancel(self) -> None:
        tag, channel, self._tag = self._tag, self._tag_on, None
        if tag is None or channel is None or channel.is_closed:
            return  # a consumer dies with its channel
        try:
            await channel.basic_cancel(tag, timeout=self.timeout_s)
        except FAILED as exc:  # the consumer died with its channel already
            logger.debug("cancel of consumer %s: %s", tag, exc)

    def _on_reopen(self, *_: Any) -> None:
        """The channel came back (reconnect or channel error): consume on the new one."""
        self._kick.set()

    # ------------------------------------------------------------------ the keeper
    def _keep(self) -> None:
        """Start the keeper (on the loop, once)."""
        if self._keeper is None or self._keeper.done():
            self._keeper = self._tasks.spawn(self._keep_loop(), "stalk-amqp-consumer-keeper")

    async def _keep_loop(self) -> None:
        """Until closed: whenever the broker lacks what is wanted, make it so, with backoff."""
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        while True:
            with contextlib.suppress(TimeoutError):  # no kick: check anyway now and then
                await asyncio.wait_for(self._kick.wait(), CHECK_S)
            self._kick.clear()
            if self.in_sync:
                backoff.reset()
                continue
            try:
                await self.channel.ready()  # a reconnect under way: wait for it, lock not held
                async with self._lock:
                    await self._converge()
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(backoff.next())
                self._kick.set()
                continue
            if self._problem is None:
                backoff.reset()

    def _failed(self, exc: BaseException) -> None:
        problem = f"no consumer on {self.queue}: {type(exc).__name__}: {exc}".rstrip(": ")
        if problem != self._problem:
            logger.warning("%s; trying again", problem)
        self._report(problem)

    def _report(self, problem: str | None) -> None:
        if problem is None and self._problem is not None:
            logger.info("consumer of %s registered again", self.queue)
        self._problem = problem
        if self.on_problem is not None:
            self.on_problem(problem)
