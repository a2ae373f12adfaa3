"""Engine behaviour on the memory adapter: intake, failure paths, heartbeat, watchdog, controls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, Message, fatal, retry
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.errors import BackendUnavailable
from stalk.message import Failure
from stalk.testing.harness import FAST_OPTIONS, Recorder, wait_for


def options(**overrides: Any) -> CollectorOptions:
    return CollectorOptions(**{**FAST_OPTIONS, **overrides})


class FlakyAdapter(MemoryAdapter):
    """A memory adapter whose operations fail a set number of times."""

    def __init__(self, broker: MemoryBroker, **fail: int) -> None:
        super().__init__("q", error_topic="q-errors", broker=broker)
        self.fail = dict(fail)
        self.extended: list[str] = []

    def _maybe_fail(self, op: str) -> None:
        if self.fail.get(op, 0) > 0:
            self.fail[op] -= 1
            raise BackendUnavailable(f"{op} failed on purpose")

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        self._maybe_fail("poll")
        return await super().get_messages(max_messages, wait_s)

    async def ack(self, messages: Sequence[Message]) -> None:
        self._maybe_fail("ack")
        await super().ack(messages)

    async def retry_later(self, message: Message, delay_s: float) -> None:
        self._maybe_fail("retry")
        await super().retry_later(message, delay_s)

    async def publish_error(self, message: Message, failure: Failure) -> None:
        self._maybe_fail("error")
        await super().publish_error(message, failure)

    async def extend(self, message: Message, seconds: float) -> None:
        self.extended.append(message.id)
        await super().extend(message, seconds)


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_engine_library_collector_starts_asleep() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"x", {}, 0)
        rec = Recorder()
        c = BaseCollector(MemoryAdapter("q", broker=broker), rec, options())
        await c.start()
        await asyncio.sleep(0.3)
        assert c.state == "asleep" and rec.bodies() == []
        c.wake()
        await wait_for(lambda: rec.done == [b"x"], 10, "delivery after wake")
        await c.stop()
        assert c.state == "stopped"

    run(scenario())


def test_engine_poll_errors_back_off_and_recover() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"x", {}, 0)
        rec = Recorder()
        c = BaseCollector(FlakyAdapter(broker, poll=3), rec, options())
        await c.start()
        c.wake()
        await wait_for(lambda: rec.done == [b"x"], 10, "delivery after broker errors")
        assert c.stats.broker_errors == 3
        assert c.healthy
        await c.stop()

    run(scenario())


def test_engine_failed_error_publish_does_not_ack() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"poison", {}, 0)
        # fatal, not retries exhausted: with max_retries=0 the redelivery would be past the limit
        # and go to the error topic as poison without running the handler again (policy.admit)
        rec = Recorder(lambda b, m: fatal("no"))
        c = BaseCollector(FlakyAdapter(broker, error=1), rec, options(visibility_timeout_s=0.5))
        await c.start()
        c.wake()
        # first routing fails: the message must come back after its lease, not vanish
        await wait_for(lambda: len(broker.queue("q-errors").ready) == 1, 20, "error copy")
        assert rec.attempts_of(b"poison") == [1, 2]
        assert c.stats.failed_settles == 1
        await c.stop()

    run(scenario())


def test_engine_failed_retry_does_not_ack() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"m", {}, 0)
        rec = Recorder(lambda b, m: retry("later", delay=0) if m.attempt == 1 else None)
        c = BaseCollector(FlakyAdapter(broker, retry=1), rec, options(visibility_timeout_s=0.5))
        await c.start()
        c.wake()
        await wait_for(lambda: len(rec.done) >= 2, 20, "redelivery after failed retry")
        await wait_for(lambda: c.stats.acked == 1, 20, "final ack")
        await c.stop()

    run(scenario())


def test_engine_failed_ack_leaves_message_for_redelivery() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"m", {}, 0)
        rec = Recorder()
        c = BaseCollector(FlakyAdapter(broker, ack=1), rec, options(visibility_timeout_s=0.5))
        await c.start()
        c.wake()
        await wait_for(lambda: len(rec.done) >= 2 and c.stats.acked == 1, 20, "redelivery")
        await c.stop()
        assert broker.backlog("q", None).ready == 0

    run(scenario())


def test_engine_heartbeat_extends_long_handlers() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"long", {}, 0)
        rec = Recorder(lambda b, m: time.sleep(1.5))
        adapter = FlakyAdapter(broker)
        c = BaseCollector(adapter, rec, options(visibility_timeout_s=0.4, concurrency=2))
        await c.start()
        c.wake()
        await wait_for(lambda: len(rec.done) >= 1, 20, "the long handler")
        await asyncio.sleep(0.5)
        await c.stop()
        assert rec.attempts_of(b"long") == [1], "lease lapsed under a live handler"
        assert adapter.extended, "no heartbeat was sent"

    run(scenario())


def test_engine_hung_sync_handler_is_abandoned_and_worker_replaced() -> None:
    release = threading.Event()

    def handler(body: bytes, message: Message) -> None:
        if body == b"hang" and message.attempt == 1:
            release.wait(30)

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"hang", {}, 0)
        broker.put("q", b"next", {}, 0)
        rec = Recorder(handler)
        c = BaseCollector(
            MemoryAdapter("q", broker=broker), rec, options(concurrency=1, handler_timeout_s=0.3)
        )
        await c.start()
        c.wake()
        await wait_for(lambda: b"next" in rec.done, 20, "the next message despite a hung one")
        await wait_for(lambda: 2 in rec.attempts_of(b"hang"), 20, "the timed-out retry")
        release.set()
        await c.stop()

    run(scenario())


def test_engine_controls_from_another_thread() -> None:
    broker = MemoryBroker()
    for i in range(5):
        broker.put("q", str(i).encode(), {}, 0)
    rec = Recorder()
    c = BaseCollector(MemoryAdapter("q", broker=broker), rec, options())
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while len(rec.done) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    c.scale(3)
    c.sleep()
    c.wake()
    c.stop(1.0).result(timeout=20)
    thread.join(20)
    assert not thread.is_alive()
    assert c.state == "stopped" and sorted(rec.done) == [b"0", b"1", b"2", b"3", b"4"]


def test_engine_until_empty_waits_for_pending_retries() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"m", {}, 0)
        rec = Recorder(lambda b, m: retry("again", delay=0.5) if m.attempt < 3 else None)
        c = BaseCollector(MemoryAdapter("q", broker=broker), rec, options())
        await c.serve(until_empty=True)
        assert rec.attempts_of(b"m") == [1, 2, 3]
        assert c.stats.acked == 1

    run(scenario())


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_engine_handler_raising_a_base_exception_is_a_failure(
    kind: str, raised: type[BaseException]
) -> None:
    """A handler's own KeyboardInterrupt or SystemExit (sync on a worker thread, or async) is a
    failed message routed to the error topic, not the end of the worker."""

    def sync_handler(body: bytes) -> None:
        if body == b"bad":
            raise raised()

    async def async_handler(body: bytes) -> None:
        sync_handler(body)

    async def scenario() -> None:
        broker = MemoryBroker()
        for body in (b"bad", b"a", b"b"):
            broker.put("q", body, {}, 0)
        handler = sync_handler if kind == "sync" else async_handler
        c = BaseCollector(MemoryAdapter("q", broker=broker), handler, options(max_retries=0))
        await c.start()
        c.wake()
        await wait_for(lambda: c.stats.acked >= 3, 20, "all three settled")
        assert c.stats.errored["retries_exhausted"] == 1
        assert [m.body for m in broker.lease("q-errors", 10, 30)] == [b"bad"]
        await c.stop()

    run(scenario())


def test_engine_stop_before_start_returns_at_once() -> None:
    c = BaseCollector(MemoryAdapter("q"), lambda body: None, options())
    c.stop().result(timeout=5)
    c.run()  # must not block: it was stopped before it started
    assert c.state == "stopped"


def test_engine_push_adapter_asleep_takes_nothing() -> None:
    from stalk.collectors.memory import MemoryPushAdapter

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"x", {}, 0)
        rec = Recorder()
        c = BaseCollector(MemoryPushAdapter("q", broker=broker), rec, options())
        await c.start()
        await asyncio.sleep(0.3)
        assert rec.bodies() == [] and broker.backlog("q", None).in_flight == 0
        c.wake()
        await wait_for(lambda: rec.done == [b"x"], 10, "delivery after wake")
        await c.stop()

    run(scenario())


def test_engine_message_ttl_routes_expired_unhandled() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"old", {}, 0)
        broker.queue("q").ready[0].enqueued_at -= 120
        broker.put("q", b"new", {}, 0)
        rec = Recorder()
        c = BaseCollector(MemoryAdapter("q", broker=broker), rec, options(message_ttl_s=60))
        await c.serve(until_empty=True)
        assert rec.bodies() == [b"new"]
        assert c.stats.errored["expired"] == 1
        dead = broker.lease("q-errors", 10, 30)
        assert [m.body for m in dead] == [b"old"]
        assert dead[0].attributes["stalk-reason"] == "expired"

    run(scenario())


def test_engine_until_empty_on_push_adapter_started_first() -> None:
    """The ops runner calls start() before serve(until_empty=True): it must still end."""
    from stalk.collectors.memory import MemoryPushAdapter

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"x", {}, 0)
        rec = Recorder()
        c = BaseCollector(MemoryPushAdapter("q", broker=broker), rec, options())
        await c.start()
        await c.serve(until_empty=True)
        assert rec.done == [b"x"] and c.state == "stopped"

    run(scenario())


def test_engine_push_raises_the_careful_limit_before_the_first_fresh_message_runs() -> None:
    """The start limit of 1 is raised while the fresh message that ends it is unsettled: were it
    handled and acked first, the broker could be sending the next one to the consumer that
    raising the limit cancels (AMQP re-consumes), and a quorum queue returns that one counted."""
    from stalk.collectors.memory import MemoryPushAdapter

    events: list[str] = []

    class Watched(MemoryPushAdapter):
        async def set_max_in_flight(self, n: int) -> None:
            events.append(f"limit {n}")
            await asyncio.sleep(0.05)  # a re-consume's round trips
            await super().set_max_in_flight(n)
            events.append("raised")

    def handler(body: bytes) -> None:
        events.append(f"handle {body.decode()}")

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"a", {}, 0)
        broker.put("q", b"b", {}, 0)
        c = BaseCollector(Watched("q", broker=broker), handler, options(concurrency=4))
        await c.serve(until_empty=True)

    run(scenario())
    assert events[:3] == ["limit 4", "raised", "handle a"], events


def test_engine_error_copy_too_large_gives_up_metadata_not_the_body() -> None:
    """A body at the broker's limit leaves no room for the failure metadata: the copy goes with
    less of it (here the reason alone), never redelivered forever for want of room."""
    from stalk.errors import MessageTooLarge

    offered: list[dict[str, str]] = []

    class Tight(MemoryAdapter):
        async def publish_error(self, message: Message, failure: Failure) -> None:
            offered.append(failure.to_attributes())
            if len(offered[-1]) > 1:
                raise MessageTooLarge("no room beside the body")
            await super().publish_error(message, failure)

    def handler(body: bytes) -> None:
        raise ValueError("boom " * 100)

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("q", b"big", {}, 0)
        adapter = Tight("q", error_topic="q-errors", broker=broker)
        c = BaseCollector(adapter, handler, options(max_retries=0))
        await c.serve(until_empty=True)
        dead = broker.lease("q-errors", 10, 30)
        assert [m.body for m in dead] == [b"big"]
        assert dead[0].attributes == {"stalk-reason": "retries_exhausted"}
        assert c.stats.errored["retries_exhausted"] == 1

    run(scenario())
    assert len(offered) == 3 and "stalk-traceback" in offered[0]
    assert "stalk-traceback" not in offered[1] and len(offered[1]["stalk-error"]) <= 200
