"""Hole 7 of issue 14: on AMQP a release stalk made itself (a stop whose grace ran out) counted
as a failed delivery, so after a few deploys healthy messages went to the error topic as
``poison``. Against the real broker, classic and quorum queues; no timed assertions."""

from __future__ import annotations

import asyncio

import pytest

from stalk import BaseCollector
from stalk.testing.harness import Recorder, Running, wait_for
from tests.backends.test_amqp import PATIENCE_S, options, queue_count, run
from tests.brokers.amqp import AMQPHarness

pytestmark = pytest.mark.broker("amqp")

#: Stops whose grace runs out with the message in the handler, before one that handles it.
STOPS = 3


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_releases_on_shutdown_spend_no_attempt(amqp_url: str, queue_type: str) -> None:
    harness = AMQPHarness(amqp_url, queue_type=queue_type)

    async def scenario() -> None:
        source, errors = harness.new_names()
        publisher = harness.make_adapter(source, errors)
        await publisher.open()
        await publisher.publish(b"healthy")
        await publisher.close()
        never = asyncio.Event()
        for stop in range(STOPS):
            held = Recorder()

            async def hang(body: bytes, message: object, held: Recorder = held) -> None:
                held.enter(body, message)
                await never.wait()

            # Retries to spare here, so that a counted release shows as attempt 2 at once.
            c = BaseCollector(harness.make_adapter(source, errors), hang, options(max_retries=9))
            await c.start()
            c.wake()
            await wait_for(lambda held=held: held.active == 1, PATIENCE_S, f"stop {stop} holding")
            assert held.deliveries[0].attempt == 1, f"stop {stop}: a release counted an attempt"
            await c.stop(0)  # the grace runs out: the running handler's message is released
            assert c.stats.released == 1
        done = Recorder()
        c = BaseCollector(harness.make_adapter(source, errors), done, options(max_retries=0))
        async with Running(c):
            await wait_for(lambda: c.stats.acked == 1, PATIENCE_S, "the healthy message handled")
        assert [m.attempt for m in done.deliveries] == [1]
        assert c.stats.errored.get("poison", 0) == 0
        assert await queue_count(amqp_url, errors) == 0, "a released message went to the errors"
        assert await queue_count(amqp_url, source) == 0

    try:
        run(scenario())
    finally:
        harness.cleanup()
