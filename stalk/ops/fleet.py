"""The worker processes of a supervisor seen as one collector: summed counters, one health.

The supervisor (``stalk.ops.supervisor``) starts and restarts processes; this module keeps what it
knows of each and answers the control server's questions (it is a :class:`stalk.ops.http.Control`).
Each worker serves ``/status`` on a loopback port it reported; a fleet polls those, sums their
counters with those of workers that already exited (so counters never go back on a restart),
and forwards sleep, wake and scale to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from stalk.collectors.base import Adapter, Backlog
from stalk.engine.stats import CollectorStats
from stalk.ops.prometheus import Family, MetricsExporter
from stalk.ops.status import Snapshot

#: Seconds one request to a worker may take.
REQUEST_TIMEOUT_S = 2.0


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
            "concurrency": int((self.status or {}).get("concurrency", 0)),
            "in_flight": int((self.status or {}).get("in_flight", 0)),
        }


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


class Fleet:
    """What a supervisor knows of its workers, and the control (:mod:`stalk.ops.http`) over them."""

    def __init__(self, adapter: Adapter, processes: int) -> None:
        self.adapter = adapter
        self.processes = processes
        self.workers: dict[int, Worker] = {}
        #: Final counters of worker processes that have exited.
        self.retired = CollectorStats()
        self.stopping = False
        self.want_awake = True
        self.exporter = MetricsExporter(lambda: [self.snapshot()], extra=self.worker_families)

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

    async def post(self, worker: Worker, path: str) -> None:
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
        ages = [s["backlog_age_s"] for s in statuses if s.get("backlog_age_s") is not None]
        stats.backlog_at = time.time() - min(ages) if ages else None
        states = {s["state"] for s in statuses}
        state = "draining" if self.stopping else states.pop() if len(states) == 1 else "starting"
        healthy, reason = self.health_now()
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

    def health_now(self) -> tuple[bool, str]:
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

    def worker_families(self) -> list[Family]:
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
        return self.health_now()

    async def metrics(self) -> tuple[bytes, str]:
        await self.refresh()
        return self.exporter.render()

    async def sleep(self) -> None:
        self.want_awake = False
        await asyncio.gather(*(self.post(w, "/sleep") for w in list(self.workers.values())))

    async def wake(self) -> None:
        self.want_awake = True
        await asyncio.gather(*(self.post(w, "/wake") for w in list(self.workers.values())))

    async def scale(self, concurrency: int) -> None:
        path = f"/scale?concurrency={concurrency}"
        await asyncio.gather(*(self.post(w, path) for w in list(self.workers.values())))
