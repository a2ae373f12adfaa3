"""The conformance suite on SQS (moto's standalone server over HTTP)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from stalk.collectors.sqs import SQSAdapter, SQSSettings
from stalk.testing import ConformanceSuite
from tests.brokers.sqs import SQSHarness

pytestmark = pytest.mark.broker("sqs")


class TestSQSConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, sqs_endpoint: str) -> SQSHarness:
        return SQSHarness(sqs_endpoint)


class _OwnGroupSQSAdapter(SQSAdapter):
    """Publishes each message in its own FIFO group unless told, so the suite's concurrency
    checks apply (one group is handled one message at a time, by design)."""

    async def publish(self, body: bytes, attributes: Any = None, delay_s: float = 0.0) -> str:
        attributes = {"stalk-group-id": uuid.uuid4().hex, **(attributes or {})}
        return await super().publish(body, attributes, delay_s)


class SQSFifoHarness(SQSHarness):
    """FIFO queues (``.fifo``), each message in its own group."""

    def make_adapter(self, source: str, error_topic: str) -> Any:
        if error_topic.endswith(".fifo-errors"):  # the kit's read_errors appends "-errors"
            error_topic = _OwnGroupSQSAdapter().default_error_topic(error_topic[: -len("-errors")])
        settings = SQSSettings(endpoint_url=self.endpoint, **self.settings)
        return _OwnGroupSQSAdapter(source, error_topic=error_topic, settings=settings)

    def new_names(self) -> tuple[str, str]:
        stem = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return f"{stem}.fifo", f"{stem}-errors.fifo"


class TestSQSFifoConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, sqs_endpoint: str) -> SQSFifoHarness:
        return SQSFifoHarness(sqs_endpoint)
