"""The conformance suite on RabbitMQ, with classic and with quorum queues."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stalk.testing import ConformanceSuite
from tests.brokers.amqp import AMQPHarness

pytestmark = pytest.mark.broker("amqp")


class TestAMQPConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, amqp_url: str) -> Iterator[AMQPHarness]:
        harness = AMQPHarness(amqp_url)
        yield harness
        harness.cleanup()


class TestAMQPQuorumConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, amqp_url: str) -> Iterator[AMQPHarness]:
        harness = AMQPHarness(amqp_url, queue_type="quorum")
        yield harness
        harness.cleanup()
