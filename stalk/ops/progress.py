"""A live one-line summary for people watching ``stalk run`` in a terminal.

Drawn twice a second from counters the engine keeps anyway, so it costs the hot path nothing.
It is off with ``--quiet``, when stderr is not a terminal (pipes, CI, containers), and while the
process is in the background (writing there would stop it with SIGTTOU, which stalk reads as
"scale down"). Log lines still appear: each root log handler erases the line before a record and
draws it again right after, so the line is on screen whenever the terminal is idle. It shows the
backlog left, the rate over the last seconds and an ETA where the backend counts its backlog,
and with ``--until-empty`` a progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from stalk.ops.status import Snapshot

#: Seconds between redraws.
REDRAW_S = 0.5
#: Erase the current terminal line and return to its start.
CLEAR = "\r\x1b[K"
#: Seconds of history the rate is computed over.
RATE_WINDOW_S = 5.0
#: Characters of the ``--until-empty`` progress bar.
BAR_WIDTH = 20


def wanted(stream: TextIO, quiet: bool) -> bool:
    """Return True when a progress line belongs on ``stream``: a foreground terminal."""
    if quiet:
        return False
    try:
        fd = stream.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def remaining(snap: Snapshot) -> int | None:
    """Messages still to do where the backend counts them: ready + delayed + our in-flight."""
    backlog = snap.stats.backlog
    if backlog is None or backlog.ready is None:
        return None
    return backlog.ready + (backlog.delayed or 0) + snap.in_flight


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summary(snap: Snapshot, rate: float, *, bar: bool = False) -> str:
    """Return the line: done, rate, backlog left and ETA where known, retries, errors, busy.

    With ``bar`` (``--until-empty``) and a known backlog it starts with a progress bar.
    """
    outcomes = snap.stats.outcomes()
    errors = sum(outcomes["errors"].values())
    done = outcomes["acked"] + errors + outcomes["dropped"]
    left = remaining(snap)
    parts = [f"stalk {snap.description}", snap.state, f"{done:,} done", f"{rate:,.0f}/s"]
    if left is not None:
        parts.append(f"{left:,} left")
        if rate > 0 and left:
            parts.append(f"ETA {_eta(left / rate)}")
    parts += [
        f"{outcomes['retried']:,} retries",
        f"{errors:,} errors",
        f"{min(snap.in_flight, snap.concurrency)}/{snap.concurrency} busy",  # not prefetched
    ]
    line = " · ".join(parts)
    if bar and left is not None:
        total = done + left
        share = done / total if total else 1.0
        filled = int(share * BAR_WIDTH)
        line = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {share:4.0%} " + line
    return line


class Progress:
    """Redraw :func:`summary` of ``read()`` on ``stream`` every ``REDRAW_S`` until cancelled,
    and right after every log record (the record erases it first), so it survives log output.
    """

    def __init__(
        self, read: Callable[[], Snapshot], stream: TextIO | None = None, *, bar: bool = False
    ) -> None:
        self.read = read
        self.stream = stream if stream is not None else sys.stderr
        self.bar = bar
        self.rate = 0.0
        self._drawn = False
        self._lock = threading.RLock()  # log records come from handler threads too
        self._samples: list[tuple[float, int]] = []
        self._wrapped: list[logging.Handler] = []

    def clear(self) -> None:
        """Erase the line if it is shown (before a log record or at exit)."""
        with self._lock:
            if self._drawn:
                self._drawn = False
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write(CLEAR)
                    self.stream.flush()

    def sample(self) -> None:
        """Record progress now; the rate is over the last ``RATE_WINDOW_S``."""
        now, done = time.monotonic(), self.read().stats.handled
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.pop(0)
        first_t, first_done = self._samples[0]
        self.rate = (done - first_done) / (now - first_t) if now > first_t else 0.0

    def draw(self) -> None:
        """Write the current summary over the previous one."""
        line = summary(self.read(), self.rate, bar=self.bar)
        width = shutil.get_terminal_size().columns - 1
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(CLEAR + line[:width])
            self.stream.flush()
            self._drawn = True

    def _watch(self, handler: logging.Handler) -> None:
        emit = handler.emit

        def emit_then_redraw(record: logging.LogRecord) -> None:
            with self._lock:
                self.clear()
                emit(record)
                with contextlib.suppress(Exception):
                    self.draw()

        setattr(handler, "emit", emit_then_redraw)  # noqa: B010 - an instance attribute
        self._wrapped.append(handler)

    async def run(self) -> None:
        """Redraw until cancelled; then clear the line and give the log handlers back."""
        for handler in list(logging.getLogger().handlers):
            self._watch(handler)
        try:
            while True:
                self.sample()
                self.draw()
                await asyncio.sleep(REDRAW_S)
        finally:
            for handler in self._wrapped:
                vars(handler).pop("emit", None)  # the class's emit again
            self._wrapped.clear()
            self.clear()
