"""stalk's pubsub adapter beside the raw client loop of the same mode, same emulator, same run.

Usage: ``python -m benchmarks.pubsub [--messages N] [--modes pull,streaming] [--concurrency C]
[--pull-concurrency P] [--prefetch F] [--repeat R] [--emulator HOST:PORT]``. Without
``--emulator`` it starts its own Pub/Sub emulator (the Cloud SDK's, as the tests find it) on a
free loopback port and stops it at the end.

Each round fills a fresh topic and subscription (ack deadline 30 s, the engine's default lease,
no dead-letter policy) with ``N`` 100-byte messages, then times a cold drain until every message
is acked:

- ``raw pull``: one grpc.aio ``SubscriberAsyncClient``: ``pull(max_messages=100)`` then an
  awaited ``acknowledge`` of the batch, in a loop. Unary pull is ~15x faster than streaming pull
  on the emulator, so each mode is compared with its own raw loop only.
- ``stalk pull``: :class:`stalk.BaseCollector` over ``PubSubAdapter(mode=pull)`` with a no-op
  async handler, ``concurrency = P`` (32) and ``prefetch = F`` (200): pulls of 100, as the raw
  loop's, with the next one leased while a batch is handled and acked (the best of a sweep of
  8/32/100 x 100/200/300 here).
- ``raw streaming``: ``SubscriberClient.subscribe()`` with ``FlowControl(max_messages=C)`` and
  a callback that calls ``message.ack()``.
- ``stalk streaming``: ``PubSubAdapter(mode=streaming, flow_messages=C)`` (its own
  StreamingPull on grpc.aio, settles as unary calls), ``concurrency = C``.

After an untimed warm-up round, contenders alternate their order round by round, each on a
fresh subscription deleted after its drain; each figure is the median of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from benchmarks import drain_seconds
from stalk import BaseCollector, CollectorOptions
from stalk.collectors.pubsub import PubSubAdapter, PubSubSettings
from tests.brokers.pubsub import PROJECT, Emulator, create, emulator_binary

BODY = b"x" * 100
BATCH = 100

Drain = Callable[[str, str, int, int], Awaitable[float]]


@contextmanager
def own_emulator() -> Iterator[str]:
    """Start the emulator on a free loopback port; yield its host:port."""
    binary = emulator_binary()
    if binary is None:
        raise SystemExit("no Pub/Sub emulator: install the Cloud SDK's pubsub-emulator")
    emulator = Emulator(binary)
    emulator.start()
    try:
        yield emulator.host
    finally:
        emulator.stop()


def settings(host: str, **extra: object) -> PubSubSettings:
    return PubSubSettings(project=PROJECT, emulator_host=host, **extra)  # type: ignore[arg-type]


async def fill(host: str, name: str, n: int) -> None:
    """Create topic and subscription ``name``, then publish ``n`` bodies in batches."""
    await create(host, name, dead_letter=False, ack_deadline_s=30)
    adapter = PubSubAdapter(name, settings=settings(host))
    await adapter.open()
    try:
        for start in range(0, n, 1000):
            await adapter.publish_batch([BODY] * min(1000, n - start))
    finally:
        await adapter.close()


async def raw_pull(host: str, name: str, n: int, concurrency: int) -> float:
    import grpc  # type: ignore[import-untyped]
    from google.pubsub_v1 import SubscriberAsyncClient
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    path = f"projects/{PROJECT}/subscriptions/{name}"
    start = time.perf_counter()
    channel = grpc.aio.insecure_channel(host)
    client = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
    count = 0
    while count < n:
        response = await client.pull(subscription=path, max_messages=BATCH, timeout=5.0)
        ack_ids = [m.ack_id for m in response.received_messages]
        if ack_ids:
            await client.acknowledge(subscription=path, ack_ids=ack_ids)
        count += len(ack_ids)
    elapsed = time.perf_counter() - start
    await channel.close()
    return elapsed


#: stalk pull's engine settings (see the module docstring); set from the command line.
PULL = {"concurrency": 32, "prefetch": 200}


async def stalk_drain(host: str, name: str, n: int, concurrency: int, mode: str) -> float:
    async def handler(body: bytes) -> None:
        return None

    start = time.perf_counter()
    extra = {"flow_messages": concurrency} if mode == "streaming" else {}
    adapter = PubSubAdapter(name, settings=settings(host, mode=mode, **extra))
    if mode == "pull":
        opts = CollectorOptions(concurrency=PULL["concurrency"], prefetch=PULL["prefetch"])
    else:
        opts = CollectorOptions(concurrency=concurrency)
    collector = BaseCollector(adapter, handler, opts)
    return await drain_seconds(collector, n, start)


async def stalk_pull(host: str, name: str, n: int, concurrency: int) -> float:
    return await stalk_drain(host, name, n, concurrency, "pull")


async def stalk_streaming(host: str, name: str, n: int, concurrency: int) -> float:
    return await stalk_drain(host, name, n, concurrency, "streaming")


async def raw_streaming(host: str, name: str, n: int, concurrency: int) -> float:
    return await asyncio.to_thread(_raw_streaming, host, name, n, concurrency)


def _raw_streaming(host: str, name: str, n: int, concurrency: int) -> float:
    import grpc
    from google.cloud import pubsub_v1  # type: ignore[import-untyped]
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    done = threading.Event()
    lock = threading.Lock()
    count = 0

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        nonlocal count
        message.ack()
        with lock:
            count += 1
            if count >= n:
                done.set()

    start = time.perf_counter()
    transport = SubscriberGrpcTransport(channel=grpc.insecure_channel(host))
    client = pubsub_v1.SubscriberClient(transport=transport)
    flow = pubsub_v1.types.FlowControl(max_messages=concurrency)
    future = client.subscribe(f"projects/{PROJECT}/subscriptions/{name}", callback, flow)
    done.wait(600)
    elapsed = time.perf_counter() - start
    future.cancel()
    try:
        future.result(30)
    except Exception as exc:
        logging.debug("raw stream closed: %r", exc)
    client.close()
    return elapsed


CONTENDERS: dict[str, dict[str, Drain]] = {
    "pull": {"raw pull": raw_pull, "stalk pull": stalk_pull},
    "streaming": {"raw streaming": raw_streaming, "stalk streaming": stalk_streaming},
}


async def drop(host: str, name: str) -> None:
    """Delete round ``name``'s subscription and topics: the emulator keeps every acked message of
    a live subscription, and slowed down round by round when they piled up."""
    import grpc
    from google.api_core import exceptions as gexc
    from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    channel = grpc.aio.insecure_channel(host)
    try:
        sub = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
        pub = PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=channel))
        with contextlib.suppress(gexc.NotFound):
            await sub.delete_subscription(subscription=f"projects/{PROJECT}/subscriptions/{name}")
        for topic in (name, f"{name}-dead"):
            with contextlib.suppress(gexc.NotFound):
                await pub.delete_topic(topic=f"projects/{PROJECT}/topics/{topic}")
    finally:
        await channel.close()


async def one_drain(host: str, drain: Drain, n: int, concurrency: int) -> float:
    """Fill a fresh subscription, drain it with ``drain``, delete it; return msg/s."""
    name = f"bench-{uuid.uuid4().hex[:10]}"
    await fill(host, name, n)
    try:
        return n / await drain(host, name, n, concurrency)
    finally:
        await drop(host, name)


async def measure(
    host: str, n: int, modes: list[str], concurrency: int, repeat: int
) -> dict[str, float]:
    """Return the median msg/s per contender.

    One untimed round of every contender first warms the emulator's JIT (the first drain after
    a start was up to 2x slower, charged to whichever contender ran first), and the order of the
    contenders alternates round by round, so neither always drains the first or the second
    subscription of a round.
    """
    rates: dict[str, list[float]] = {}
    for mode in modes:
        contenders = list(CONTENDERS[mode].items())
        for _label, drain in contenders:
            await one_drain(host, drain, min(n, 5_000), concurrency)
        for round_ in range(repeat):
            ordered = contenders if round_ % 2 == 0 else contenders[::-1]
            for label, drain in ordered:
                rates.setdefault(label, []).append(await one_drain(host, drain, n, concurrency))
    return {label: statistics.median(values) for label, values in rates.items()}


def table(rates: dict[str, float], n: int, repeat: int, concurrency: int) -> str:
    lines = [
        f"Pub/Sub emulator drain, {n} 100-byte messages, median of {repeat}; streaming "
        f"flow control {concurrency}; stalk pull concurrency {PULL['concurrency']}, prefetch "
        f"{PULL['prefetch']}:",
        "",
        "| contender | msg/s | vs raw loop of the same mode |",
        "|---|---:|---:|",
    ]
    for label, rate in rates.items():
        raw = rates.get(f"raw {label.split()[-1]}")
        ratio = f"{rate / raw:.2f}x" if raw else "-"
        lines.append(f"| {label} | {rate:,.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pubsub", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--modes", default="pull,streaming")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--pull-concurrency", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--emulator", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    modes = [m for m in args.modes.split(",") if m]
    PULL.update(concurrency=args.pull_concurrency, prefetch=args.prefetch)
    if args.emulator:
        rates = asyncio.run(measure(args.emulator, args.messages, modes, args.concurrency,
                                    args.repeat))  # fmt: skip
    else:
        with own_emulator() as host:
            rates = asyncio.run(measure(host, args.messages, modes, args.concurrency,
                                        args.repeat))  # fmt: skip
    print(table(rates, args.messages, args.repeat, args.concurrency))


if __name__ == "__main__":
    main()
