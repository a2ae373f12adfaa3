"""The live progress line: content, and when it is drawn at all."""

from __future__ import annotations

import asyncio
import io
import logging

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.memory import MemoryAdapter
from stalk.ops.progress import CLEAR, Progress, summary, wanted
from stalk.ops.status import Snapshot


def snapshot() -> Snapshot:
    collector = BaseCollector(MemoryAdapter("orders"), lambda body: None, CollectorOptions())
    collector.stats.handled = 1234
    collector.stats.retried = 3
    collector.stats.errored["fatal"] = 2
    return Snapshot.of(collector)


def test_summary_shows_counts_rate_and_in_flight() -> None:
    line = summary(snapshot(), 250.4)
    assert "memory:orders" in line and "1,234 done" in line and "250/s" in line
    assert "3 retries" in line and "2 errors" in line and "0/1 busy" in line


def test_not_drawn_when_quiet_or_not_a_terminal() -> None:
    assert not wanted(io.StringIO(), quiet=False)
    assert not wanted(io.StringIO(), quiet=True)


def test_line_is_cleared_before_a_log_record_and_at_the_end() -> None:
    stream = io.StringIO()
    progress = Progress(snapshot, stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)

    async def scenario() -> None:
        task = asyncio.create_task(progress.run())
        await asyncio.sleep(0.05)
        logging.getLogger("stalk.test").warning("a log line")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    drawn = text.index("1,234 done")
    logged = text.index("a log line")
    assert drawn < text.index(CLEAR, drawn) < logged  # erased before the record was written
    progress.draw()
    progress.clear()
    assert stream.getvalue().endswith(CLEAR)  # and erased when it stops
