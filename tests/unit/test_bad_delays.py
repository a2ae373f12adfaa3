"""Issue 14, hole 3: a retry delay that is nan, inf, negative or not a number is the handler's
bug, refused where the Result is made and routed as ``fatal`` like a wrong return type; a finite
delay past ``max_named_delay_s`` is shortened to it (no message parked for days)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, Result, retry
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.policy import RetryLater, RetryPolicy, decide
from stalk.errors import InvalidResult
from stalk.message import ATTR_ERROR_TYPE, ATTR_REASON
from stalk.testing.harness import FAST_OPTIONS

BAD_DELAYS: list[Any] = [math.nan, math.inf, -math.inf, -1, -0.001, "5", True, [1]]


@pytest.mark.parametrize("delay", BAD_DELAYS, ids=repr)
def test_a_bad_delay_is_refused_where_the_result_is_made(delay: Any) -> None:
    with pytest.raises(InvalidResult, match=r"Result\.delay"):
        retry("x", delay=delay)
    with pytest.raises(ValueError):  # InvalidResult is a ValueError, as the old check raised
        Result(error="x", retry=True, delay=delay)


@pytest.mark.parametrize("delay", [0, 0.0, 1, 2.5, 3600, 1e12])
def test_finite_delays_are_taken_and_capped_at_max_named_delay(delay: float) -> None:
    """The backoff cap (300 s) does not shorten a named hour; the named-delay cap stops 1e12."""
    policy = RetryPolicy(
        max_retries=3, retry_interval_s=1.0, max_retry_delay_s=300.0, max_named_delay_s=86400.0
    )
    assert decide(retry("x", delay=delay), 1, policy) == RetryLater(min(delay, 86400.0))


@pytest.mark.parametrize("delay", [math.nan, math.inf, -5.0], ids=repr)
@pytest.mark.parametrize("style", ["sync", "async"])
def test_a_handler_asking_a_bad_delay_goes_to_the_error_topic_as_fatal(
    delay: float, style: str
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        for body in (b"bad", b"good"):
            broker.put("q", body, {}, 0)
        seen: list[bytes] = []

        def decide_(body: bytes) -> Result | None:
            seen.append(body)
            return retry("try later", delay=delay) if body == b"bad" else None

        async def async_handler(body: bytes) -> Result | None:
            return decide_(body)

        handler = decide_ if style == "sync" else async_handler
        c = BaseCollector(
            MemoryAdapter("q", broker=broker),
            handler,
            CollectorOptions(**{**FAST_OPTIONS, "max_retries": 3}),
        )
        await c.serve(until_empty=True)
        assert seen.count(b"bad") == 1, "retried a bug"
        assert b"good" in seen and c.stats.acked == 2
        errors = broker.queue("q-errors").ready
        assert len(errors) == 1
        attrs = errors[0].attributes
        assert attrs[ATTR_REASON] == "fatal" and attrs[ATTR_ERROR_TYPE] == "InvalidResult"

    asyncio.run(asyncio.wait_for(scenario(), 60))
