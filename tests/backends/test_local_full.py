"""Hole 11 of issue 14: the local backend on a full disk. A worker could not drain (every lease
and ack writes to the WAL first) and said only "database or disk is full". It must degrade as
clearly as a publish does: a health reason and a log line naming the file and the space needed.

No small filesystem can be made here (no tmpfs), so the full disk is simulated two ways: SQLite's
own SQLITE_FULL from ``PRAGMA max_page_count`` (a real error from SQLite, on a publish), and a
connection whose writes fail with SQLITE_FULL until "space is freed" (the drain side).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.local import LocalAdapter, LocalSettings
from stalk.errors import BackendError
from stalk.testing.harness import FAST_OPTIONS, wait_for

SQLITE_FULL = 13
WRITES = ("UPDATE", "BEGIN", "INSERT", "DELETE")


class FullDisk:
    """A connection whose writes fail as on a full disk while ``full`` is set."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.full = True

    def execute(self, statement: str, *args: Any) -> Any:
        if self.full and statement.lstrip().upper().startswith(WRITES):
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = SQLITE_FULL
            raise error
        return self._conn.execute(statement, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def adapter(path: Path) -> LocalAdapter:
    return LocalAdapter("q", settings=LocalSettings(path=str(path)))


def test_sqlite_full_names_the_file_the_free_space_and_the_room_needed(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def scenario() -> None:
        a = adapter(path)
        await a.open()
        store = a.store

        def cap() -> None:
            pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
            store.conn.execute(f"PRAGMA max_page_count = {pages}")

        await a._call(cap)
        try:
            with pytest.raises(BackendError) as raised:
                await a.publish(b"y" * 200_000)  # needs pages the cap refuses: real SQLITE_FULL
        finally:
            await a.close()
        text = str(raised.value)
        assert str(path) in text and "disk full" in text
        assert "MiB free in" in text and "q.db-wal" in text and "free up to" in text

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_worker_on_a_full_disk_is_unhealthy_says_why_and_drains_once_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.db"

    async def scenario() -> None:
        publisher = adapter(path)
        await publisher.open()
        for i in range(3):
            await publisher.publish(b"m%d" % i)
        await publisher.close()
        a = adapter(path)
        c = BaseCollector(a, lambda body: None, CollectorOptions(**FAST_OPTIONS))
        await c.start()
        disk = FullDisk(a.store.conn)
        a.store.conn = disk  # type: ignore[assignment]
        c.wake()
        try:
            await wait_for(lambda: "disk full" in c.health_reason, 30, "a disk-full health reason")
            assert not c.healthy and str(path) in c.health_reason
            assert "free up to" in c.health_reason
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(str(path) in m and "free up to" in m for m in logged), logged
            disk.full = False  # space freed
            await wait_for(lambda: c.stats.acked == 3, 30, "the queue drained")
            await wait_for(lambda: c.healthy, 30, "healthy again")
        finally:
            await c.stop(2)

    caplog.set_level(logging.WARNING)
    asyncio.run(asyncio.wait_for(scenario(), 60))
