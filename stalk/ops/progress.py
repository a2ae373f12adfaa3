"""A live one-line summary for people watching ``stalk run`` in a terminal.

Drawn twice a second from counters the engine keeps anyway, so it costs the hot path nothing.
It is off with ``--quiet``, when stderr is not a terminal (pipes, CI, containers), and while the
process is in the background (writing there would stop it with SIGTTOU, which stalk reads as
"scale down"). Log lines still appear: the line is cleared before each record and redrawn after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

from stalk.ops.status import Snapshot

#: Seconds between redraws.
REDRAW_S = 0.5
#: Erase the current terminal line and return to its start.
CLEAR = "\r\x1b[K"


def wanted(stream: TextIO, quiet: bool) -> bool:
    """Return True when a progress line belongs on ``stream``: a foreground terminal."""
    if quiet:
        return False
    try:
        fd = stream.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def summary(snap: Snapshot, rate: float) -> str:
    """Return the line: processed, rate, retries, errors, in-flight, state."""
    stats = snap.stats
    errors = sum(stats.errored.values())
    return (
        f"stalk {snap.description} · {snap.state} · {stats.handled:,} done · {rate:,.0f}/s · "
        f"{stats.retried:,} retries · {errors:,} errors · {snap.in_flight}/{snap.concurrency} busy"
    )


class _ClearBeforeLog(logging.Filter):
    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class Progress:
    """Redraw :func:`summary` of ``read()`` on ``stream`` every ``REDRAW_S`` until cancelled."""

    def __init__(self, read: Callable[[], Snapshot], stream: TextIO | None = None) -> None:
        self.read = read
        self.stream = stream if stream is not None else sys.stderr
        self._drawn = False
        self._filter = _ClearBeforeLog(self)
        self._last: tuple[float, int] | None = None

    def clear(self) -> None:
        """Erase the line if it is shown (before a log record or at exit)."""
        if self._drawn:
            self._drawn = False
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(CLEAR)
                self.stream.flush()

    def draw(self) -> None:
        """Write the current summary over the previous one."""
        snap = self.read()
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (snap.stats.handled - self._last[1]) / (now - self._last[0])
        self._last = (now, snap.stats.handled)
        width = shutil.get_terminal_size().columns - 1
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(CLEAR + summary(snap, rate)[:width])
            self.stream.flush()
            self._drawn = True

    async def run(self) -> None:
        """Redraw until cancelled; then clear the line and stop watching log records."""
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(self._filter)
        try:
            while True:
                self.draw()
                await asyncio.sleep(REDRAW_S)
        finally:
            for handler in handlers:
                handler.removeFilter(self._filter)
            self.clear()
