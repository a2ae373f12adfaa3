"""Engine overhead on the memory adapter: stalk vs the raw lease/handle/ack loop, same run.

Usage: ``python -m benchmarks.engine [--messages N] [--repeat R]``

The raw loop leases a batch from the same in-process broker, calls the handler inline and acks
the batch: what a hand-written consumer costs. stalk's overhead per message is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.memory import MemoryAdapter, MemoryBroker

BATCH = 100


def fill(n: int) -> MemoryBroker:
    broker = MemoryBroker()
    for i in range(n):
        broker.put("bench", b"%d" % i, {}, 0)
    return broker


def sync_noop(body: bytes) -> None:
    return None


async def async_noop(body: bytes) -> None:
    return None


def raw_loop(n: int, handler: Callable[[bytes], Any]) -> float:
    """Seconds for a hand-written consumer: lease a batch, handle each inline, ack the batch."""
    broker = fill(n)
    is_async = asyncio.iscoroutinefunction(handler)

    async def consume() -> float:
        start = time.perf_counter()
        while True:
            batch = broker.lease("bench", BATCH, 30.0)
            if not batch:
                break
            for message in batch:
                if is_async:
                    await handler(message.body)
                else:
                    handler(message.body)
            for message in batch:
                broker.delete("bench", message)
        return time.perf_counter() - start

    return asyncio.run(consume())


def stalk_loop(n: int, handler: Callable[[bytes], Any], concurrency: int) -> float:
    """Seconds for stalk to drain the same queue with the same handler."""
    broker = fill(n)
    options = CollectorOptions(
        concurrency=concurrency,
        batch_size=BATCH,
        polling_period_s=0.001,
        max_polling_period_s=0.002,
    )
    collector = BaseCollector(MemoryAdapter("bench", broker=broker), handler, options)
    start = time.perf_counter()
    asyncio.run(collector.serve(until_empty=True))
    elapsed = time.perf_counter() - start
    assert collector.stats.acked == n, collector.stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.messages
    print(f"memory adapter, {n} messages, median of {args.repeat} runs, batch {BATCH}\n")
    print(
        "| handler | concurrency | stalk msg/s | stalk µs/msg | raw loop µs/msg "
        "| engine overhead µs/msg |"
    )
    print("|---|---|---|---|---|---|")
    for name, handler in (("async no-op", async_noop), ("sync no-op", sync_noop)):
        raw = statistics.median(raw_loop(n, handler) for _ in range(args.repeat)) / n
        for concurrency in (1, 8):
            per = (
                statistics.median(stalk_loop(n, handler, concurrency) for _ in range(args.repeat))
                / n
            )
            print(
                f"| {name} | {concurrency} | {1 / per:,.0f} | {per * 1e6:.1f} | "
                f"{raw * 1e6:.1f} | {(per - raw) * 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
