"""The conformance suite on Pub/Sub: the real emulator on loopback, in both intake modes."""

from __future__ import annotations

import pytest

from stalk.testing import ConformanceSuite
from tests.brokers.pubsub import Emulator, PubSubHarness

pytestmark = pytest.mark.broker("pubsub")


class TestPubSubPullConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, pubsub_emulator: Emulator) -> PubSubHarness:
        return PubSubHarness(pubsub_emulator, mode="pull")


class TestPubSubStreamingConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, pubsub_emulator: Emulator) -> PubSubHarness:
        return PubSubHarness(pubsub_emulator, mode="streaming")
