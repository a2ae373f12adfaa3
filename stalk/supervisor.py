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
from dataclasses import dataclass, field
from typing import Any

from stalk.collectors.base import Adapter, Backlog
from stalk.http import ControlServer
from stalk.metrics import CollectorStats, Snapshot
from stalk.ops import ENV_REPORT_FD, ENV_SUPERVISOR_PID, ENV_WORKER_ID, EXIT_RECYCLE, OpsConfig
from stalk.progress import Progress, wanted
from stalk.prometheus import Family, MetricsExporter

logger = logging.getLogger(__name__)

#: First wait before restarting a crashed worker; doubles per crash in a row up to the maximum.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
#: A worker that ran this long before it crashed starts the backoff afresh.
STABLE_AFTER_S = 10.0
#: A recycle sooner than this after start is treated as a crash (memory limit below baseline).
MIN_RECYCLE_UPTIME_S = 1.0
#: Seconds between polls of the workers' /status, and the timeout of one request.
POLL_S = 1.0
REQUEST_TIMEOUT_S = 2.0
#: Exit code of a worker whose command line is wrong; restarting cannot help.
EXIT_USAGE = 2


@dataclass
class Worker:
    """One worker slot and the process currently filling it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    port: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    recycles: int = 0
    crashes: int = 0
    last_exit: int | None = None
    retiring: bool = False
    status: dict[str, Any] | None = None
    stats: CollectorStats = field(default_factory=CollectorStats)

    def as_dict(self) -> dict[str, Any]:
        """Return this worker's row of ``/status``."""
        running = self.process is not None and self.process.returncode is None
        return {
            "index": self.index,
            "pid": self.process.pid if running and self.process else None,
            "state": (self.status or {}).get("state", "starting" if running else "restarting"),
            "restarts": self.restarts,
            "recycles": self.recycles,
            "last_exit": self.last_exit,
            "uptime_s": round(time.monotonic() - self.started_at, 1) if running else 0.0,
        }


def worker_command() -> list[str]:
    """Return the command line that started this process, to start each worker with."""
    argv = getattr(sys, "orig_argv", None)
    return [sys.executable, *argv[1:]] if argv else [sys.executable, "-m", "stalk", *sys.argv[1:]]


async def request(port: int, method: str, path: str) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request to a worker's control server on loopback."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S
    )
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Supervisor:
    """Start, watch and restart worker processes; also the :class:`~stalk.http.Control` of them."""

    def __init__(
        self, config: OpsConfig, adapter: Adapter, *, until_empty: bool, command: list[str]
    ) -> None:
        self.config = config
        self.adapter = adapter
        self.until_empty = until_empty
        self.command = command
        self.processes = config.processes
        self.workers: dict[int, Worker] = {}
        self.retired = CollectorStats()
        self.stopping = False
        self.want_awake = True
        self.exit_code = 0
        self._keepers: set[asyncio.Task[None]] = set()
        self._stop_event = asyncio.Event()
        self.exporter = MetricsExporter(lambda: [self.snapshot()], extra=self._worker_families)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Supervise until every worker has ended; return the exit code."""
        loop = asyncio.get_running_loop()
        handlers = {
            "SIGTERM": self.stop,
            "SIGINT": self.stop,
            "SIGTTIN": lambda: self.resize(self.processes + 1),
            "SIGTTOU": lambda: self.resize(self.processes - 1),
            "SIGUSR1": lambda: self._spawn(self.sleep()),
            "SIGUSR2": lambda: self._spawn(self.wake()),
        }
        for name, handler in handlers.items():
            loop.add_signal_handler(getattr(signal, name), handler)
        server = None
        if self.config.http_port is not None:
            server = ControlServer(self, self.config.http_host, self.config.http_port)
            if not await server.start():
                server = None
        helpers = [loop.create_task(self._poll())]
        if wanted(sys.stderr, self.config.quiet):
            helpers.append(loop.create_task(Progress(self.snapshot).run()))
        self.resize(self.processes)
        while self._keepers:
            await asyncio.wait(set(self._keepers))
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if server is not None:
            await server.close()
        for name in handlers:
            loop.remove_signal_handler(getattr(signal, name))
        logger.info("supervisor done: %s", self.snapshot().stats.as_dict())
        return self.exit_code

    def stop(self) -> None:
        """Drain every worker (SIGTERM to each); a second call makes them stop at once."""
        again = self.stopping
        self.stopping = True
        self._stop_event.set()
        logger.info("%s %d worker(s)", "stopping now" if again else "draining", len(self.workers))
        for worker in self.workers.values():
            _signal(worker, signal.SIGTERM)

    def resize(self, processes: int) -> None:
        """Run ``processes`` workers: start the missing slots, retire the highest ones."""
        if self.stopping or processes < 1:
            return
        self.processes = processes
        for index in range(processes):
            if index not in self.workers:
                worker = self.workers[index] = Worker(index)
                self._spawn(self._keep(worker))
        for worker in list(self.workers.values()):
            if worker.index >= processes and not worker.retiring:
                worker.retiring = True
                _signal(worker, signal.SIGTERM)
        logger.info("supervising %d worker process(es)", processes)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._keepers.add(task)
        task.add_done_callback(self._keepers.discard)

    async def _keep(self, worker: Worker) -> None:
        delay = 0.0
        try:
            while not (self.stopping or worker.retiring):
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_event.wait(), delay)
                    if self.stopping or worker.retiring:
                        break
                code = await self._run_once(worker)
                if self.stopping or worker.retiring or not self._restart(worker, code):
                    break
                delay = self._delay(worker, code)
        finally:
            self.workers.pop(worker.index, None)

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
        if code == EXIT_RECYCLE and uptime >= MIN_RECYCLE_UPTIME_S:
            worker.recycles += 1
            worker.crashes = 0
            return 0.0
        worker.crashes = 1 if uptime >= STABLE_AFTER_S else worker.crashes + 1
        delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2.0 ** (worker.crashes - 1))
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
        self.retired.add(final if final is not None else worker.stats)
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
                    if worker.port and not self.want_awake:
                        await self._post(worker, "/sleep")
                elif kind == "final":
                    final = CollectorStats.from_state(json.loads(value))
        finally:
            transport.close()
        return final

    # ------------------------------------------------------------------ polling and Control
    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_S)

    async def refresh(self) -> None:
        """Read every worker's /status now."""
        await asyncio.gather(*(self._read_status(w) for w in list(self.workers.values())))

    async def _read_status(self, worker: Worker) -> None:
        if worker.port is None:
            return
        try:
            code, body = await request(worker.port, "GET", "/status")
            status = json.loads(body)
        except (OSError, TimeoutError, ValueError, IndexError):
            return
        if code == 200 and worker.port is not None:
            worker.status, worker.stats = status, CollectorStats.from_state(status["counts"])

    async def _post(self, worker: Worker, path: str) -> None:
        if worker.port is not None:
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                await request(worker.port, "POST", path)

    def snapshot(self) -> Snapshot:
        """Return all workers as one collector: summed counters, shared backlog."""
        stats = CollectorStats()
        stats.add(self.retired)
        statuses = [w.status for w in self.workers.values() if w.status is not None]
        for worker in self.workers.values():
            stats.add(worker.stats)
        backlogs = [s["backlog"] for s in statuses if s.get("backlog")]
        stats.backlog = Backlog(**backlogs[0]) if backlogs else None
        states = {s["state"] for s in statuses}
        state = "draining" if self.stopping else states.pop() if len(states) == 1 else "starting"
        healthy, reason = self._health()
        return Snapshot(
            backend=self.adapter.name,
            source=str(self.adapter.source or ""),
            description=f"{self.adapter.describe()} x{self.processes}",
            state=state,
            healthy=healthy,
            health_reason=reason,
            concurrency=sum(int(s.get("concurrency", 0)) for s in statuses),
            in_flight=sum(int(s.get("in_flight", 0)) for s in statuses),
            stats=stats,
        )

    def _health(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        for index in range(self.processes):
            worker = self.workers.get(index)
            if worker is None or worker.status is None:
                last = worker.last_exit if worker else None
                return False, f"worker {index} " + (
                    "starting" if last is None else f"restarting after exit {last}"
                )
            if not worker.status.get("healthy"):
                return False, f"worker {index}: {worker.status.get('health_reason')}"
        return True, "ok"

    def _worker_families(self) -> list[Family]:
        labels = {"backend": self.adapter.name, "source": str(self.adapter.source or "")}
        rows = list(self.workers.values())
        return [
            Family(
                "stalk_worker_processes",
                "gauge",
                "Worker processes wanted.",
                [("stalk_worker_processes", labels, self.processes)],
            ),
            Family(
                "stalk_worker_restarts",
                "counter",
                "Worker restarts (crashes and recycles).",
                [("stalk_worker_restarts_total", labels, sum(w.restarts for w in rows))],
            ),
            Family(
                "stalk_worker_recycles",
                "counter",
                "Workers replaced at a per-child limit.",
                [("stalk_worker_recycles_total", labels, sum(w.recycles for w in rows))],
            ),
        ]

    async def status(self) -> dict[str, Any]:
        await self.refresh()
        doc = self.snapshot().as_dict()
        doc.update(pid=os.getpid(), processes=self.processes)
        doc["workers"] = [w.as_dict() for w in sorted(self.workers.values(), key=lambda w: w.index)]
        return doc

    async def health(self) -> tuple[bool, str]:
        await self.refresh()
        return self._health()

    async def metrics(self) -> tuple[bytes, str]:
        await self.refresh()
        return self.exporter.render()

    async def sleep(self) -> None:
        self.want_awake = False
        await asyncio.gather(*(self._post(w, "/sleep") for w in list(self.workers.values())))

    async def wake(self) -> None:
        self.want_awake = True
        await asyncio.gather(*(self._post(w, "/wake") for w in list(self.workers.values())))

    async def scale(self, concurrency: int) -> None:
        path = f"/scale?concurrency={concurrency}"
        await asyncio.gather(*(self._post(w, path) for w in list(self.workers.values())))


def _signal(worker: Worker, sig: signal.Signals) -> None:
    process = worker.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def supervise(config: OpsConfig, adapter: Adapter, *, until_empty: bool = False) -> int:
    """Run ``config.processes`` supervised workers of this command line; return the exit code."""
    supervisor = Supervisor(config, adapter, until_empty=until_empty, command=worker_command())
    return asyncio.run(supervisor.run())
