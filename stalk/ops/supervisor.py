"""``--processes N``: N worker processes running the same ``stalk run`` command line, supervised.

For CPU-bound sync handlers, which one interpreter runs one at a time. Each worker is this very
command line started again with ``STALK_WORKER_ID`` set (so it works the same from ``stalk``,
``python -m stalk`` or a wrapper script), in its own process group so a terminal's Ctrl-C reaches
only the supervisor, which forwards it once. A worker reports on a pipe the port of its own
loopback control server and, as it exits, its final counters; the supervisor polls the servers
to serve one ``/status``, ``/metrics`` and ``/healthz`` for all of them, with counters that stay
monotonic across restarts.

Exit codes of a worker: 0 finished (``--until-empty``), 3 recycled (``--max-messages-per-child``
or ``--max-memory-per-child`` reached: restarted at once), 2 usage error (not restarted: the
supervisor stops), anything else a crash (restarted after 1 s, doubling to 30 s while it keeps
crashing). Signals: TERM/INT drain every worker (again: stop now), TTIN/TTOU add/remove a worker
(gunicorn's convention), USR1/USR2 put every worker to sleep / wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from stalk.backoff import exponential_ceiling
from stalk.collectors.base import Adapter
from stalk.engine.stats import CollectorStats
from stalk.ops.config import (
    ENV_REPORT_FD,
    ENV_SUPERVISOR_PID,
    ENV_WORKER_ID,
    EXIT_RECYCLE,
    OpsConfig,
)
from stalk.ops.fleet import REQUEST_TIMEOUT_S, Fleet, Worker
from stalk.ops.http import ControlServer
from stalk.ops.progress import Progress, wanted
from stalk.tasks import TaskSet

logger = logging.getLogger(__name__)

#: First wait before restarting a crashed worker; doubles per crash in a row up to the maximum.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
#: A worker that ran this long before it crashed starts the backoff afresh.
STABLE_AFTER_S = 10.0
#: Seconds between polls of the workers' /status (progress line, health, counters).
POLL_S = 1.0
#: Exit code of a worker whose command line is wrong; restarting cannot help.
EXIT_USAGE = 2


def worker_command() -> list[str]:
    """Return the command line that started this process, to start each worker with."""
    argv = getattr(sys, "orig_argv", None)
    return [sys.executable, *argv[1:]] if argv else [sys.executable, "-m", "stalk", *sys.argv[1:]]


class Supervisor:
    """Start, watch and restart worker processes of one command line."""

    def __init__(
        self, config: OpsConfig, adapter: Adapter, *, until_empty: bool, command: list[str]
    ) -> None:
        self.config = config
        self.until_empty = until_empty
        self.command = command
        self.fleet = Fleet(adapter, config.processes)
        self.exit_code = 0
        self._keepers = TaskSet(logger, "supervisor")
        self._stop_event = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Supervise until every worker has ended; return the exit code."""
        loop = asyncio.get_running_loop()
        handlers = {
            "SIGTERM": self.stop,
            "SIGINT": self.stop,
            "SIGTTIN": lambda: self.resize(self.fleet.processes + 1),
            "SIGTTOU": lambda: self.resize(self.fleet.processes - 1),
            "SIGUSR1": lambda: self._spawn(self.fleet.sleep()),
            "SIGUSR2": lambda: self._spawn(self.fleet.wake()),
        }
        for name, handler in handlers.items():
            loop.add_signal_handler(getattr(signal, name), handler)
        server = None
        if self.config.http_port is not None:
            server = ControlServer(self.fleet, self.config.http_host, self.config.http_port)
            if not await server.start():
                server = None
        helpers = TaskSet(logger, "supervisor's helpers")
        helpers.spawn(self._poll(), "stalk-fleet-poll")
        if wanted(sys.stderr, self.config.quiet):
            progress = Progress(self.fleet.snapshot, bar=self.until_empty)
            helpers.spawn(progress.run(), "stalk-progress")
        self.resize(self.fleet.processes)
        await self._keepers.join()
        await helpers.drain()
        if server is not None:
            await server.close()
        for name in handlers:
            loop.remove_signal_handler(getattr(signal, name))
        logger.info("supervisor done: %s", self.fleet.snapshot().stats.outcomes())
        return self.exit_code

    def stop(self) -> None:
        """Drain every worker (SIGTERM to each); a second call makes them stop at once."""
        again = self.fleet.stopping
        self.fleet.stopping = True
        self._stop_event.set()
        logger.info(
            "%s %d worker(s)", "stopping now" if again else "draining", len(self.fleet.workers)
        )
        for worker in self.fleet.workers.values():
            _signal(worker, signal.SIGTERM)

    def resize(self, processes: int) -> None:
        """Run ``processes`` workers: start the missing slots, retire the highest ones."""
        if self.fleet.stopping or processes < 1:
            return
        self.fleet.processes = processes
        for index in range(processes):
            if index not in self.fleet.workers:
                worker = self.fleet.workers[index] = Worker(index)
                self._spawn(self._keep(worker))
        for worker in list(self.fleet.workers.values()):
            if worker.index >= processes and not worker.retiring:
                worker.retiring = True
                _signal(worker, signal.SIGTERM)
        logger.info("supervising %d worker process(es)", processes)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._keepers.spawn(coro)

    async def _keep(self, worker: Worker) -> None:
        delay = 0.0
        try:
            while not (self.fleet.stopping or worker.retiring):
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_event.wait(), delay)
                    if self.fleet.stopping or worker.retiring:
                        break
                code = await self._run_once(worker)
                if self.fleet.stopping or worker.retiring or not self._restart(worker, code):
                    break
                delay = self._delay(worker, code)
        finally:
            self.fleet.workers.pop(worker.index, None)

    def _restart(self, worker: Worker, code: int) -> bool:
        if code == 0 and self.until_empty:
            logger.info("worker %d finished", worker.index)
            return False
        if code == EXIT_USAGE:
            logger.error("worker %d exited with a usage error; stopping", worker.index)
            self.exit_code = EXIT_USAGE
            self.stop()
            return False
        return True

    def _delay(self, worker: Worker, code: int) -> float:
        uptime = time.monotonic() - worker.started_at
        worker.restarts += 1
        if code == EXIT_RECYCLE:  # planned; a worker recycles only after it handled something
            worker.recycles += 1
            worker.crashes = 0
            return 0.0
        worker.crashes = 1 if uptime >= STABLE_AFTER_S else worker.crashes + 1
        delay = exponential_ceiling(RESTART_BACKOFF_S, worker.crashes, MAX_RESTART_BACKOFF_S)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        logger.warning("worker %d %s; restarting in %.1fs", worker.index, how, delay)
        return delay

    async def _run_once(self, worker: Worker) -> int:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            ENV_WORKER_ID: str(worker.index),
            ENV_REPORT_FD: str(write_fd),
            ENV_SUPERVISOR_PID: str(os.getpid()),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, env=env, pass_fds=(write_fd,), process_group=0
            )
        except OSError as exc:
            os.close(read_fd)
            logger.error("cannot start worker %d: %s", worker.index, exc)
            return 1
        finally:
            os.close(write_fd)
        worker.process, worker.started_at = process, time.monotonic()
        worker.port, worker.status, worker.stats = None, None, CollectorStats()
        reports = asyncio.get_running_loop().create_task(self._read_reports(worker, read_fd))
        code = await process.wait()
        final = None
        with contextlib.suppress(Exception):
            final = await asyncio.wait_for(reports, REQUEST_TIMEOUT_S)
        self.fleet.retired.add(final if final is not None else worker.stats)
        worker.port, worker.status, worker.stats, worker.last_exit = (
            None,
            None,
            CollectorStats(),
            code,
        )
        return code

    async def _read_reports(self, worker: Worker, read_fd: int) -> CollectorStats | None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
        )
        final = None
        try:
            while line := (await reader.readline()).decode().strip():
                kind, _, value = line.partition(" ")
                if kind == "port":
                    worker.port = int(value) or None
                    if worker.port and not self.fleet.want_awake:
                        await self.fleet.post(worker, "/sleep")
                elif kind == "final":
                    final = CollectorStats.from_state(json.loads(value))
        finally:
            transport.close()
        return final

    # ------------------------------------------------------------------ polling and Control
    async def _poll(self) -> None:
        while True:
            await self.fleet.refresh()
            await asyncio.sleep(POLL_S)


def _signal(worker: Worker, sig: signal.Signals) -> None:
    process = worker.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def supervise(config: OpsConfig, adapter: Adapter, *, until_empty: bool = False) -> int:
    """Run ``config.processes`` supervised workers of this command line; return the exit code."""
    supervisor = Supervisor(config, adapter, until_empty=until_empty, command=worker_command())
    return asyncio.run(supervisor.run())
