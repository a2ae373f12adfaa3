"""Everything ``stalk run`` does around one collector: control server, backlog gauge, autoscaler,
progress line, outcome log, and the worker side of ``--processes`` (recycling, reporting).

Each piece is a background task on the collector's loop that reads counters the engine keeps
anyway; the only per-message hook (``on_outcome``) is installed when something needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from stalk.engine.collector import BaseCollector
from stalk.engine.policy import Action
from stalk.message import Message
from stalk.ops.autoscale import Autoscaler, AutoscaleSettings
from stalk.ops.config import EXIT_RECYCLE, OpsConfig
from stalk.ops.http import CollectorControl, ControlServer
from stalk.ops.logs import outcome_logger
from stalk.ops.progress import Progress, wanted
from stalk.ops.status import Snapshot
from stalk.tasks import TaskSet

logger = logging.getLogger(__name__)

#: Seconds between backlog polls (the gauge), and between recycling/parent checks.
BACKLOG_POLL_S = 5.0
AUTOSCALE_BACKLOG_POLL_S = 1.0
WATCH_S = 0.5


class WorkerLogTag(logging.Filter):
    """Mark a worker process's records: ``worker`` in JSON, ``logger/wN`` in text."""

    def __init__(self, worker_id: int) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.worker_id
            record.name = f"{record.name}/w{self.worker_id}"
        return True


def rss_bytes() -> int | None:
    """Return this process's resident memory (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024


async def poll_backlog(collector: BaseCollector, interval_s: float) -> None:
    """Keep ``collector.stats.backlog`` fresh for the gauge and the autoscaler."""
    adapter = collector.adapter
    while adapter.features.backlog and collector.state not in ("draining", "stopped"):
        try:
            collector.stats.backlog = await asyncio.wait_for(adapter.backlog(), interval_s * 2)
            collector.stats.backlog_at = time.time()
        except Exception as exc:
            logger.debug("backlog of %s unavailable: %s", adapter.describe(), exc)
        await asyncio.sleep(interval_s)


class Operations:
    """The background tasks around one collector; :meth:`run` returns the exit code."""

    def __init__(self, collector: BaseCollector, config: OpsConfig) -> None:
        self.collector = collector
        self.config = config
        self.exit_code = 0
        self.recycle_reason: str | None = None
        self.autoscaler: Autoscaler | None = None
        if config.autoscale is not None:
            low, high = config.autoscale
            self.autoscaler = Autoscaler(collector, AutoscaleSettings(low, high))
            collector.scale(self.autoscaler.settings.clamp(collector.concurrency))
        self._tasks = TaskSet(logger, "operations")
        #: The control server once listening (None when off or its port was taken).
        self.server: ControlServer | None = None

    def _count_to_limit(self, message: Message, action: Action, seconds: float) -> None:
        """Stop intake right at ``--max-messages-per-child`` (checked per message, only if set)."""
        stats, limit = self.collector.stats, self.config.max_messages
        if limit is not None and stats.handled >= limit and self.recycle_reason is None:
            self._recycle(f"handled {stats.handled} messages (limit {limit})")

    def _recycle(self, reason: str) -> None:
        logger.info("worker recycling: %s", reason)
        self.recycle_reason, self.exit_code = reason, EXIT_RECYCLE
        self.collector.stop()

    def _observers(self) -> Callable[[Message, Action, float], None] | None:
        found = [outcome_logger(self.collector.adapter.name)]
        if self.config.max_messages is not None:
            found.append(self._count_to_limit)
        if self.autoscaler is not None and not self.collector.adapter.features.backlog:
            found.append(self.autoscaler.observe)
        hooks = [hook for hook in found if hook is not None]
        if len(hooks) <= 1:
            return hooks[0] if hooks else None

        def both(message: Message, action: Action, seconds: float) -> None:
            for hook in hooks:
                hook(message, action, seconds)

        return both

    def status_extras(self) -> dict[str, Any]:
        """Fields ``/status`` adds to the collector's own."""
        extras: dict[str, Any] = {"pid": os.getpid()}
        if self.autoscaler is not None:
            extras.update(self.autoscaler.status())
        if self.config.worker_id is not None:
            extras["worker"] = self.config.worker_id
        return extras

    async def _watch(self) -> None:
        """Recycle over the memory limit; stop if the supervisor died.

        Memory is checked only once the worker handled something, as Celery does after a task:
        a limit under the start-up footprint then recycles per message, never in a tight loop.
        """
        config, stats = self.config, self.collector.stats
        limit = config.max_memory_bytes
        while self.collector.state not in ("draining", "stopped"):
            await asyncio.sleep(WATCH_S)
            if config.supervisor_pid is not None and os.getppid() != config.supervisor_pid:
                logger.warning("supervisor %d is gone; stopping", config.supervisor_pid)
                self.collector.stop()
                return
            rss = rss_bytes() if limit is not None and stats.handled else None
            if rss is not None and limit is not None and rss > limit and not self.recycle_reason:
                self._recycle(f"resident memory {rss >> 20} MiB over {limit >> 20} MiB")
                return

    def _report(self, line: str) -> None:
        if self.config.report_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.config.report_fd, (line + "\n").encode())

    async def _report_port(self, server: ControlServer | None) -> None:
        while self.collector.state == "asleep":  # signals are installed before wake()
            await asyncio.sleep(0.02)
        self._report(f"port {server.port if server is not None else 0}")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    async def run(self, *, until_empty: bool = False) -> int:
        """Start the collector and its companions; return once it stopped, with the exit code."""
        collector, config = self.collector, self.config
        collector.on_outcome = self._observers()
        if config.worker_id is not None:
            for handler in logging.getLogger().handlers:
                handler.addFilter(WorkerLogTag(config.worker_id))
        await collector.start()
        server: ControlServer | None = None
        port = 0 if config.worker_id is not None else config.http_port
        if port is not None:
            host = "127.0.0.1" if config.worker_id is not None else config.http_host
            server = ControlServer(CollectorControl(collector, self.status_extras), host, port)
            if not await server.start():
                server = None
        self.server = server
        show_progress = config.worker_id is None and wanted(sys.stderr, config.quiet)
        # a person watching the progress line wants a fresh backlog, as the autoscaler does
        fast = self.autoscaler is not None or show_progress
        interval = AUTOSCALE_BACKLOG_POLL_S if fast else BACKLOG_POLL_S
        self._spawn(poll_backlog(collector, interval))
        self._spawn(self._watch())
        if self.autoscaler is not None:
            self._spawn(self.autoscaler.run())
        if config.report_fd is not None:
            self._spawn(self._report_port(server))
        if show_progress:
            self._spawn(Progress(lambda: Snapshot.of(collector), bar=until_empty).run())
        try:
            await collector.serve(until_empty=until_empty, install_signals=True)
        finally:
            await self._tasks.drain()
            if server is not None:
                await server.close()
            self._report(f"final {json.dumps(collector.stats.to_state())}")
        return self.exit_code


def run_operations(
    collector: BaseCollector, config: OpsConfig, *, until_empty: bool = False
) -> int:
    """Run ``collector`` with its operations until stopped; return the process exit code."""
    return asyncio.run(Operations(collector, config).run(until_empty=until_empty))
