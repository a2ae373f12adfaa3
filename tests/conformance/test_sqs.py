"""The conformance suite on SQS (moto's standalone server over HTTP)."""

from __future__ import annotations

import pytest

from stalk.testing import ConformanceSuite
from tests.brokers.sqs import SQSHarness

pytestmark = pytest.mark.broker("sqs")


class TestSQSConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, sqs_endpoint: str) -> SQSHarness:
        return SQSHarness(sqs_endpoint)
