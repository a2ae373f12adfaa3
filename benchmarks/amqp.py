"""stalk's amqp adapter beside a raw aio-pika consumer and FastStream, same broker, same run.

Usage: ``python -m benchmarks.amqp [--messages N] [--prefetch 1,10,100] [--repeat R] [--url URL]``
(needs a RabbitMQ: ``scripts/start-rabbitmq.sh``; FastStream is a benchmark-only dependency,
``pip install 'faststream[rabbit]'``, skipped when missing).

Each round fills a fresh durable classic queue with ``N`` persistent 100-byte messages, then
times a cold drain, connection set-up included, until every message is acked:

- ``raw aio-pika``: ``connect_robust``, ``basic.qos(prefetch)``, a consumer callback that acks.
  The floor any aio-pika based consumer works on.
- ``stalk amqp``: :class:`stalk.BaseCollector` over :class:`AMQPAdapter` with a no-op async
  handler and ``concurrency = prefetch`` (the adapter sets the same ``basic.qos``); stops the
  clock once the engine has acked all ``N``.
- ``FastStream``: ``RabbitBroker`` with one ``subscriber`` on a channel with the same prefetch,
  default ack policy (ack after the handler); stops the clock when the handler has seen all
  ``N`` (its last ack is still in flight, a slight advantage to it).

Contenders alternate within each round; each figure is the median of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika

from benchmarks import drain_seconds
from stalk import BaseCollector, CollectorOptions
from stalk.collectors.amqp import AMQPAdapter, AMQPSettings

BODY = b"x" * 100
ARGS = {"x-queue-type": "classic"}
DEFAULT_URL = os.environ.get("STALK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

Drain = Callable[[str, str, int, int], Awaitable[float]]


async def fill(url: str, queue: str, n: int) -> None:
    """Declare ``queue`` and publish ``n`` persistent messages, confirmed, 500 at a time."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=ARGS)
        exchange = channel.default_exchange
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue,
                    )
                    for _ in range(min(500, n - start))
                )
            )
    finally:
        await connection.close()


async def drop(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.queue_delete(f"{queue}-errors")
    finally:
        await connection.close()


async def raw_aiopika(url: str, queue: str, n: int, prefetch: int) -> float:
    done = asyncio.Event()
    count = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count == n:
            done.set()

    start = time.perf_counter()
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    q = await channel.declare_queue(queue, durable=True, arguments=ARGS)
    await q.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - start
    await connection.close()
    return elapsed


async def stalk_amqp(url: str, queue: str, n: int, prefetch: int) -> float:
    async def handler(body: bytes) -> None:
        return None

    start = time.perf_counter()
    adapter = AMQPAdapter(queue, settings=AMQPSettings(url=url))
    collector = BaseCollector(adapter, handler, CollectorOptions(concurrency=prefetch))
    return await drain_seconds(collector, n, start)


async def faststream(url: str, queue: str, n: int, prefetch: int) -> float:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    done = asyncio.Event()
    count = 0
    broker = RabbitBroker(url, logger=None)

    @broker.subscriber(RabbitQueue(queue, durable=True), channel=Channel(prefetch_count=prefetch))
    async def handle(body: bytes) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    start = time.perf_counter()
    await broker.start()
    await done.wait()
    elapsed = time.perf_counter() - start
    await broker.stop()
    return elapsed


def contenders() -> dict[str, Drain]:
    found: dict[str, Drain] = {"raw aio-pika": raw_aiopika, "stalk amqp": stalk_amqp}
    if importlib.util.find_spec("faststream") is not None:
        found["FastStream"] = faststream
    return found


async def measure(
    url: str, n: int, prefetches: list[int], repeat: int
) -> dict[tuple[str, int], float]:
    """Return median msg/s per (contender, prefetch)."""
    rates: dict[tuple[str, int], list[float]] = {}
    for prefetch in prefetches:
        for _ in range(repeat):
            for name, drain in contenders().items():
                queue = f"stalk-bench-{uuid.uuid4().hex[:8]}"
                await fill(url, queue, n)
                try:
                    seconds = await drain(url, queue, n, prefetch)
                finally:
                    await drop(url, queue)
                rates.setdefault((name, prefetch), []).append(n / seconds)
    return {key: statistics.median(values) for key, values in rates.items()}


def table(rates: dict[tuple[str, int], float], n: int, repeat: int) -> str:
    lines = [
        f"AMQP drain, {n} persistent 100-byte messages, median of {repeat}, same RabbitMQ:",
        "",
        "| contender | prefetch | msg/s | vs raw aio-pika |",
        "|---|---:|---:|---:|",
    ]
    for (name, prefetch), rate in rates.items():
        raw = rates[("raw aio-pika", prefetch)]
        lines.append(f"| {name} | {prefetch} | {rate:,.0f} | {rate / raw:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amqp", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--prefetch", default="1,10,100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default=DEFAULT_URL)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prefetches = [int(p) for p in args.prefetch.split(",")]
    rates = asyncio.run(measure(args.url, args.messages, prefetches, args.repeat))
    print(table(rates, args.messages, args.repeat))


if __name__ == "__main__":
    main()
