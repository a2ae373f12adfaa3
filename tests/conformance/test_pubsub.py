"""The conformance suite on Pub/Sub: the real emulator on loopback, in both intake modes.

Streaming mode passes it whole because the adapter ends a stream with a half-close: a
*cancelled* StreamingPull stays a delivery target on the emulator for ~10-20 s (see
:mod:`stalk.collectors.pubsub.streaming`), which cost the tests that stop or sleep a streaming
worker a lost delivery, a 10 s wait and a counted attempt.
"""

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
