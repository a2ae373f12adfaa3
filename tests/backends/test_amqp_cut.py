"""A TCP connection cut while the amqp consumer is being (re)started must not leave it missing.

The chaos suite found a worker that stood still forever after a cut during ``wake()``: the
``stalk-resume`` task died with the connection, the consumer was never registered again, and
the queue had 0 consumers with messages ready. Here a proxy of our own (the chaos suite's) sits
between the adapter and RabbitMQ and cuts the connection right as the consumer is started,
resumed and re-prefetched; afterwards the queue must have exactly one consumer again and
messages must be handled. Every wait is for a condition, with a generous limit.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.amqp import AMQPAdapter
from stalk.testing.harness import Recorder, wait_for
from tests.brokers.amqp import AMQPHarness
from tests.chaos.proxy import Proxy

pytestmark = pytest.mark.broker("amqp")

SCENARIO_TIMEOUT_S = 240.0
PATIENCE_S = 60.0


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    auth = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


async def consumers(url: str, queue: str) -> int:
    """How many consumers RabbitMQ has on ``queue`` (a passive declare, straight to the broker)."""
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count)
    finally:
        await connection.close()


async def publish(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` to ``queue`` straight to the broker, confirmed."""
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    finally:
        await connection.close()


async def wait_consumers(url: str, queue: str, want: int, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + PATIENCE_S
    while (count := await consumers(url, queue)) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {count} consumers, not {want}")
        await asyncio.sleep(0.1)


#: How long after the call reaches the loop the connection is cut: before, during and after
#: the ``basic.qos`` and ``basic.consume`` round trips on loopback.
CUT_AFTER_S = (0, 0, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03)


def test_cut_while_starting_the_consumer_restores_exactly_one(amqp_url: str) -> None:
    """Cut the connection right as the first wake, a later wake and a scale reach the broker,
    with no call after it: the awake worker gets exactly one consumer back by itself and
    handles what is published."""
    target = urlsplit(amqp_url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5672)
    harness = AMQPHarness(through(amqp_url, proxy.port), reconnect_interval_s=0.2)
    direct = AMQPHarness(amqp_url)

    async def cut_after(delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        proxy.cut()

    async def scenario() -> None:
        source, errors = harness.new_names()
        direct.queues += [source, errors]
        rec = Recorder()
        options = CollectorOptions(concurrency=4, shutdown_grace_s=2.0)
        # The first wake starts the consumer (basic.qos, then basic.consume): cut during it.
        for delay_s in CUT_AFTER_S:
            c = BaseCollector(harness.make_adapter(source, errors), rec, options)
            await c.start()  # asleep: the first wake() starts the consumer
            try:
                c.wake()
                await cut_after(delay_s)
                await wait_consumers(amqp_url, source, 1, f"the consumer, start cut at {delay_s}")
            finally:
                await c.stop(2.0)
            await wait_consumers(amqp_url, source, 0, "the stopped worker's consumer gone")
        c = BaseCollector(harness.make_adapter(source, errors), rec, options)
        await c.start()
        try:
            assert isinstance(c.adapter, AMQPAdapter)
            c.wake()
            await wait_consumers(amqp_url, source, 1, "the consumer")
            for i, delay_s in enumerate(CUT_AFTER_S):
                # A later wake (basic.consume again after a sleep's basic.cancel): cut during it.
                c.sleep()
                await wait_consumers(amqp_url, source, 0, "the consumer cancelled by sleep")
                c.wake()
                await cut_after(delay_s)
                await wait_consumers(amqp_url, source, 1, f"the consumer, wake cut at {delay_s}")
                # A prefetch change (basic.qos, basic.cancel, basic.consume): cut during it.
                fresh = f"fresh{i}".encode()
                await publish(amqp_url, source, [fresh])  # the first one ends the careful 1
                await wait_for(lambda f=fresh: f in rec.done, PATIENCE_S, "the fresh message")
                c.scale(2 + i % 5)
                await cut_after(delay_s)
                await wait_consumers(amqp_url, source, 1, f"the consumer, scale cut at {delay_s}")
            bodies = {f"m{i}".encode() for i in range(30)}
            await publish(amqp_url, source, sorted(bodies))
            await wait_for(lambda: bodies <= set(rec.done), PATIENCE_S, "every message handled")
            assert await consumers(amqp_url, source) == 1, "more than one consumer"
            await wait_for(lambda: c.healthy, PATIENCE_S, f"healthy again ({c.health_reason})")
        finally:
            await c.stop(2.0)

    try:
        asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))
    finally:
        proxy.close()
        direct.cleanup()
