"""The conformance suite on NSQ: a real nsqd on loopback, started by the fixture."""

from __future__ import annotations

import pytest

from stalk.testing import ConformanceSuite
from tests.brokers.nsq import NSQD, NSQHarness

pytestmark = pytest.mark.broker("nsq")


class TestNSQConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, nsqd: NSQD) -> NSQHarness:
        return NSQHarness(nsqd)
