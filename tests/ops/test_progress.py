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
    collector.stats.handled = 1240
    collector.stats.acked = 1234  # done: 1232 acked + 2 to the error topic
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


def test_line_shows_backlog_left_eta_and_a_bar_with_until_empty() -> None:
    from stalk.collectors.base import Backlog

    snap = snapshot()
    snap.stats.backlog = Backlog(ready=1000, delayed=234)
    line = summary(snap, 100.0, bar=True)
    assert "1,234 left" in line and "ETA 12s" in line
    assert line.startswith("[##########----------]  50% ")
    assert "left" not in summary(snapshot(), 100.0)  # a backend that cannot count: no guess


def test_line_is_drawn_again_right_after_each_log_record() -> None:
    stream = io.StringIO()
    progress = Progress(snapshot, stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)

    async def scenario() -> None:
        task = asyncio.create_task(progress.run())
        await asyncio.sleep(0.05)
        for i in range(30):  # a burst of retries logging faster than the redraw period
            logging.getLogger("stalk.test").warning("log line %d", i)
        after = stream.getvalue().rsplit("log line 29", 1)[1]
        assert "1,234 done" in after  # the line is back at once, not at the next tick
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
    assert "emit" not in vars(handler)  # the handler is given back as it was
