"""Messages the engine routes before their handler runs (poison, expired, too large) are outcomes
like any other: counted in /metrics, seen by ``on_outcome`` and logged with the outcome fields."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.policy import Action, RouteToError
from stalk.message import ATTR_ATTEMPTS, ATTR_REASON, Message
from stalk.ops.http import CollectorControl, ControlServer
from stalk.testing.harness import FAST_OPTIONS, wait_for
from tests.ops._proc import http


def test_poison_expired_and_too_large_are_counted_observed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("jobs", b"poison", {}, 0)
        for _ in range(2):  # two workers died holding it: leased, never settled
            assert broker.lease("jobs", 1, 0.0)
        broker.put("jobs", b"stale", {}, 0)
        broker.queue("jobs").ready[-1].enqueued_at -= 3600
        broker.put("jobs", b"x" * 2000, {}, 0)
        broker.put("jobs", b"fine", {}, 0)
        handled: list[bytes] = []
        seen: list[tuple[bytes, Action, float]] = []
        options = {**FAST_OPTIONS, "max_retries": 1, "message_ttl_s": 600.0}
        collector = BaseCollector(
            MemoryAdapter("jobs", broker=broker),
            lambda body: handled.append(body),
            CollectorOptions(**options, max_message_bytes=1000),
        )
        collector.on_outcome = lambda m, action, s: seen.append((m.body, action, s))
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        collector.wake()
        try:
            await wait_for(lambda: len(broker.queue("jobs-errors").ready) == 3, 10, "3 routed")
            await wait_for(lambda: handled == [b"fine"], 10, "the good one handled")
            _, body, _ = await asyncio.to_thread(http, server.port, "/metrics", "GET")
        finally:
            await collector.stop(2)
            await server.close()
        errored = {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == "stalk_messages_errored_total" and s.value
        }
        assert errored == {"poison": 1, "expired": 1, "too_large": 1}
        routed = {b[:6]: a for b, a, _ in seen if isinstance(a, RouteToError)}
        assert routed == {
            b"poison": RouteToError("poison"),
            b"stale": RouteToError("expired"),
            b"xxxxxx": RouteToError("too_large"),
        }
        copies: dict[str, Any] = {
            e.body[:6].decode(): e.attributes for e in broker.queue("jobs-errors").ready
        }
        assert copies["poison"][ATTR_REASON] == "poison"
        assert copies["poison"][ATTR_ATTEMPTS] == "2", "two deliveries ran (and died) before"
        outcomes = {getattr(r, "outcome", None) for r in caplog.records}
        assert {"error:poison", "error:expired", "error:too_large"} <= outcomes

    with caplog.at_level(logging.INFO, logger="stalk.collector"):
        asyncio.run(asyncio.wait_for(scenario(), 60))


def test_uncounted_redelivery_is_counted_in_the_broker_before_it_runs() -> None:
    """Where the broker cannot count deliveries (AMQP classic), a redelivery is first re-queued
    with attempt + 1 (``retry_later(message, 0)``), so a message that kills its worker stops."""

    class Uncounted(MemoryAdapter):
        async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
            got = await super().get_messages(max_messages, wait_s)
            for message in got:
                message.deliveries_counted = False
                message.redelivered = message.attributes.get("died") == "yes"
                message.attempt = int(message.attributes.get("stalk-attempt", "1"))
            return got

        async def retry_later(self, message: Message, delay_s: float) -> None:
            message.attributes["stalk-attempt"] = str(message.attempt + 1)
            message.attributes["died"] = "no"
            await super().retry_later(message, delay_s)

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("jobs", b"m", {"died": "yes", "stalk-attempt": "1"}, 0)
        attempts: list[int] = []
        collector = BaseCollector(
            Uncounted("jobs", broker=broker),
            lambda body, message: attempts.append(message.attempt),
            CollectorOptions(**{**FAST_OPTIONS, "max_retries": 3}),
        )
        await collector.start()
        collector.wake()
        try:
            await wait_for(lambda: attempts == [2], 10, "the counted copy handled")
        finally:
            await collector.stop(2)

    asyncio.run(asyncio.wait_for(scenario(), 60))
