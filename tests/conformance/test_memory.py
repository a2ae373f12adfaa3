"""The conformance suite on the in-process memory adapters (polling and push)."""

from __future__ import annotations

import pytest

from stalk.collectors.base import Adapter
from stalk.collectors.memory import MemoryPushAdapter
from stalk.testing import AdapterHarness, ConformanceSuite, MemoryHarness


class MemoryPushHarness(MemoryHarness):
    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        return MemoryPushAdapter(source, error_topic=error_topic, broker=self.broker)


class TestMemoryConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> AdapterHarness:
        return MemoryHarness()


class TestMemoryPushConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> AdapterHarness:
        return MemoryPushHarness()
