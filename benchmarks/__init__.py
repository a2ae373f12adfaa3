"""stalk against the raw client loop of each backend, same broker, same run."""

from __future__ import annotations

import asyncio
import time

from stalk import BaseCollector


async def drain_seconds(collector: BaseCollector, n: int, started: float) -> float:
    """Run ``collector`` until it acked ``n`` messages; return seconds since ``started``.

    The stop is not timed: it is the same for every contender and not part of a drain.
    """
    await collector.start()
    collector.wake()
    while collector.stats.acked < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    await collector.stop(5.0)
    return elapsed
