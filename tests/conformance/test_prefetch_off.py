"""The conformance suite with ``prefetch=0`` (lease only for free slots, the pre-prefetch
behaviour), on the memory and local backends: both intake modes must keep the contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stalk.options import CollectorOptions
from stalk.testing import AdapterHarness, ConformanceSuite, MemoryHarness
from tests.conformance.test_local import LocalHarness


class _NoPrefetch:
    def options(self, **overrides: Any) -> CollectorOptions:
        return super().options(**{"prefetch": 0, **overrides})  # type: ignore[misc]


class MemoryNoPrefetch(_NoPrefetch, MemoryHarness):
    pass


class LocalNoPrefetch(_NoPrefetch, LocalHarness):
    pass


class TestMemoryNoPrefetchConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> AdapterHarness:
        return MemoryNoPrefetch()


class TestLocalNoPrefetchConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> AdapterHarness:
        return LocalNoPrefetch(tmp_path / "stalk.db")
