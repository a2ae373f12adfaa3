"""Cost of the operations layer on the engine's hot path: metrics, hooks, control server.

Usage: ``python -m benchmarks.ops [--messages N] [--repeat R]``

Drains the same memory queue with a no-op handler four ways, same run:
- ``bare counters``: the engine with the histogram update replaced by the two plain adds it
  had before (what "metrics off" would cost);
- ``engine``: the engine as shipped (duration histogram, on_outcome check);
- ``+ observer``: an ``on_outcome`` observer installed (what --max-messages-per-child adds);
- ``+ ops``: run by ``stalk.ops.Operations`` with the control server, backlog poller and
  autoscaler on, while a client scrapes ``/metrics`` every 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.stats import CollectorStats
from stalk.ops.runner import Operations, OpsConfig

BATCH = 100


async def noop(body: bytes) -> None:
    return None


def collector(n: int, concurrency: int) -> BaseCollector:
    broker = MemoryBroker()
    for i in range(n):
        broker.put("bench", b"%d" % i, {}, 0)
    options = CollectorOptions(
        concurrency=concurrency,
        batch_size=BATCH,
        polling_period_s=0.001,
        max_polling_period_s=0.002,
    )
    return BaseCollector(MemoryAdapter("bench", broker=broker), noop, options)


class BareStats(CollectorStats):
    def observe(self, seconds: float) -> None:
        self.handled += 1
        self.handler_seconds += seconds


async def scrape(port_of: Any) -> None:
    while True:
        await asyncio.sleep(0.05)
        port = port_of()
        if not port:
            continue
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.read()
        writer.close()


def drain(n: int, concurrency: int, mode: str) -> float:
    c = collector(n, concurrency)
    if mode == "bare counters":
        c.stats = BareStats()
    if mode == "+ observer":
        c.on_outcome = lambda message, action, seconds: None

    async def go() -> float:
        start = time.perf_counter()
        if mode != "+ ops":
            await c.serve(until_empty=True)
            return time.perf_counter() - start
        ops = Operations(
            c, OpsConfig(http_port=0, autoscale=(concurrency, concurrency), quiet=True)
        )
        scraper = asyncio.create_task(scrape(lambda: ops.server.port if ops.server else None))
        await ops.run(until_empty=True)
        scraper.cancel()
        return time.perf_counter() - start

    elapsed = asyncio.run(go())
    assert c.stats.acked == n, c.stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = args.messages
    print(f"memory adapter, async no-op handler, {n} messages, median of {args.repeat} runs\n")
    print("| mode | concurrency | msg/s | µs/msg | vs bare counters µs/msg |")
    print("|---|---|---|---|---|")
    modes = ("bare counters", "engine", "+ observer", "+ ops")
    for concurrency in (1, 8):
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeat):  # interleaved, so drift on a busy machine hits all alike
            for mode in modes:
                runs[mode].append(drain(n, concurrency, mode))
        base = statistics.median(runs[modes[0]]) / n
        for mode in modes:
            per = statistics.median(runs[mode]) / n
            print(
                f"| {mode} | {concurrency} | {1 / per:,.0f} | {per * 1e6:.2f} | "
                f"{(per - base) * 1e6:+.2f} |"
            )


if __name__ == "__main__":
    main()
