"""The conformance suite on the local backend: a real SQLite file per test, real WAL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from stalk.collectors.base import Adapter
from stalk.collectors.local import LocalAdapter, LocalSettings
from stalk.testing import AdapterHarness, ConformanceSuite


class LocalHarness(AdapterHarness):
    """Every adapter of a test shares one file, as separate processes would."""

    def __init__(self, path: Path, durability: str = "normal") -> None:
        self.settings = LocalSettings(path=str(path), durability=durability)

    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        return LocalAdapter(source, error_topic=error_topic, settings=self.settings)

    async def restart(self) -> None:
        """No server to restart: reopen the file, fold the WAL into it and close it again.

        The suite calls this with every adapter closed, so what the next collector reads comes
        from the file alone.
        """
        await asyncio.to_thread(_checkpoint, self.settings.path)


def _checkpoint(path: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


class TestLocalConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> AdapterHarness:
        return LocalHarness(tmp_path / "stalk.db")


class TestLocalFullDurabilityConformance(ConformanceSuite):
    """The default durability, so the fsync path meets every scenario too."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> AdapterHarness:
        return LocalHarness(tmp_path / "stalk.db", durability="full")
