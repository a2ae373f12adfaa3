"""The engine's prefetch buffer, batch handlers, a handler's own CancelledError and the bound on
hung handler threads, on the memory adapter (no broker)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

import stalk
from stalk import BaseCollector, CollectorOptions, Message, fatal, retry
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.execution import MIN_STUCK_THREADS, batch_results
from stalk.errors import BackendUnavailable, ConfigError
from stalk.message import ATTR_REASON
from stalk.options import MAX_CONCURRENCY
from stalk.result import OK, Result
from stalk.testing.harness import FAST_OPTIONS, wait_for


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def filled(n: int, queue: str = "q") -> MemoryBroker:
    broker = MemoryBroker()
    for i in range(n):
        broker.put(queue, b"m%d" % i, {}, 0)
    return broker


def collector(broker: MemoryBroker, handler: Any, **options: Any) -> BaseCollector:
    return BaseCollector(
        MemoryAdapter("q", broker=broker), handler, CollectorOptions(**{**FAST_OPTIONS, **options})
    )


# ---------------------------------------------------------------- prefetch
def test_prefetch_leases_ahead_and_sleep_gives_the_buffer_back() -> None:
    async def scenario() -> None:
        broker = filled(50)
        gate = threading.Event()
        c = collector(broker, lambda body: gate.wait(10), prefetch=20)
        await c.start()
        c.wake()
        await wait_for(lambda: c.in_flight == 21, 10, "1 running + 20 prefetched")
        assert c.prefetched == 20 and c.capacity == 21
        c.sleep()
        await wait_for(lambda: c.in_flight == 1, 10, "the buffer released on sleep")
        q = broker.queue("q")
        assert len(q.ready) == 49 and len(q.leased) == 1
        assert all(entry.deliveries == 0 for entry in q.ready), "a release counted an attempt"
        gate.set()
        await c.stop(2)

    run(scenario())


def test_prefetch_zero_leases_only_for_free_slots() -> None:
    async def scenario() -> None:
        broker = filled(50)
        gate = threading.Event()
        c = collector(broker, lambda body: gate.wait(10), prefetch=0, concurrency=2)
        await c.start()
        c.wake()
        await wait_for(lambda: c.in_flight == 2, 10, "both slots busy")
        await asyncio.sleep(0.1)
        assert c.in_flight == 2 and len(broker.queue("q").leased) == 2
        gate.set()
        await c.stop(2)

    run(scenario())


def test_buffered_messages_are_heartbeated_while_they_wait() -> None:
    """5 messages of 0.25 s each at concurrency 1 wait up to 1 s in the buffer, past a 0.4 s
    lease: each is still delivered exactly once."""

    async def scenario() -> None:
        broker = filled(5)
        seen: list[tuple[bytes, int]] = []

        def slow(body: bytes, message: Message) -> None:
            threading.Event().wait(0.25)
            seen.append((body, message.attempt))

        c = collector(broker, slow, prefetch=10, visibility_timeout_s=0.4)
        await c.serve(until_empty=True)
        assert sorted(seen) == sorted((b"m%d" % i, 1) for i in range(5))

    run(scenario())


def test_a_buffered_message_whose_lease_lapsed_is_never_handed_to_the_handler() -> None:
    """Fencing: with heartbeats failing, the buffered message's lease lapses while the first
    handler runs; the broker redelivers it (attempt 2) and the stale copy is never handled."""

    class NoHeartbeat(MemoryAdapter):
        async def extend(self, message: Message, seconds: float) -> None:
            raise BackendUnavailable("heartbeat refused")

    async def scenario() -> None:
        broker = filled(2)
        gate = threading.Event()
        seen: list[tuple[bytes, int]] = []

        def handler(body: bytes, message: Message) -> None:
            seen.append((body, message.attempt))
            if body == b"m0":
                gate.wait(10)

        options = CollectorOptions(**{**FAST_OPTIONS, "prefetch": 5, "visibility_timeout_s": 0.3})
        c = BaseCollector(NoHeartbeat("q", broker=broker), handler, options)
        await c.start()
        c.wake()
        await wait_for(lambda: c.in_flight == 2, 10, "m0 running, m1 buffered")
        await asyncio.sleep(0.5)  # past the lease of the buffered m1
        gate.set()
        await wait_for(lambda: (b"m1", 2) in seen, 10, "m1 redelivered by the broker")
        await c.stop(2)
        assert (b"m1", 1) not in seen, "a message was handled after its lease lapsed"

    run(scenario())


def test_scale_is_capped() -> None:
    c = collector(MemoryBroker(), lambda body: None)
    with pytest.raises(ConfigError, match=str(MAX_CONCURRENCY)):
        c.scale(MAX_CONCURRENCY + 1)
    with pytest.raises(ValueError):
        CollectorOptions(concurrency=MAX_CONCURRENCY + 1)


def test_sigttin_at_the_cap_is_ignored_not_an_error_in_a_signal_handler() -> None:
    """Hole 9: SIGTTIN at the cap raised ConfigError inside the loop's signal handler."""
    c = collector(MemoryBroker(), lambda body: None, concurrency=MAX_CONCURRENCY)
    c._step_scale(+1)
    assert c.concurrency == MAX_CONCURRENCY


# ---------------------------------------------------------------- batch handlers
def test_batch_results_shapes() -> None:
    batch = [Message(str(i), b"") for i in range(3)]
    assert batch_results(None, batch, "h") == [OK, OK, OK]
    listed = batch_results([None, retry("r"), fatal("f")], batch, "h")
    assert [r.retry for r in listed] == [False, True, False] and listed[2].fatal
    mapped = batch_results({"1": fatal("bad")}, batch, "h")
    assert mapped[0] == OK and mapped[1].fatal and mapped[2] == OK
    for wrong in ([None], "yes", 3):
        results = batch_results(wrong, batch, "h")
        assert all(r.fatal and isinstance(r.error, TypeError) for r in results)


@pytest.mark.parametrize("style", ["sync", "async"])
def test_batch_handler_gets_batches_and_each_message_its_own_outcome(style: str) -> None:
    async def scenario() -> None:
        broker = filled(250)
        sizes: list[int] = []

        def outcomes(messages: list[Message]) -> dict[str, Result]:
            sizes.append(len(messages))
            return {m.id: fatal("bad item") for m in messages if m.body == b"m7"}

        if style == "sync":

            @stalk.batch(max_size=100, max_wait_s=0.05)
            def handler(messages: list[Message]) -> dict[str, Result]:
                return outcomes(messages)

        else:

            @stalk.batch(max_size=100, max_wait_s=0.05)
            async def handler(messages: list[Message]) -> dict[str, Result]:
                return outcomes(messages)

        c = collector(broker, handler)
        assert c.handler.batch is not None
        await c.serve(until_empty=True)
        assert sum(sizes) == 250 and max(sizes) <= 100
        assert max(sizes) > 1, "messages were not batched"
        [dead] = broker.queue("q-errors").ready
        assert dead.body == b"m7" and dead.attributes[ATTR_REASON] == "fatal"
        assert c.stats.acked == 250 and c.stats.errored["fatal"] == 1

    run(scenario())


def test_batch_handler_by_annotation_and_a_raise_retries_the_whole_batch() -> None:
    async def scenario() -> None:
        broker = filled(5)
        calls: list[list[int]] = []

        def handler(messages: list[Message]) -> None:
            calls.append([m.attempt for m in messages])
            if len(calls) == 1:
                raise RuntimeError("database down")

        c = collector(broker, handler)
        assert c.handler.batch is not None
        await c.serve(until_empty=True)
        assert calls[0] == [1] * len(calls[0])
        retried = [a for call in calls[1:] for a in call]
        assert retried.count(2) == len(calls[0]), "every message of the failed batch retried"
        assert c.stats.retried == len(calls[0]) and c.stats.acked == 5

    run(scenario())


# ---------------------------------------------------------------- handler misbehaviour
def test_an_async_handlers_own_cancelled_error_is_a_failure_not_a_hang() -> None:
    async def scenario() -> None:
        broker = filled(1)

        async def handler(body: bytes) -> None:
            raise asyncio.CancelledError("the handler's own")

        c = collector(broker, handler, max_retries=1)
        await c.serve(until_empty=True)
        assert c.stats.retried == 1 and c.stats.errored["retries_exhausted"] == 1
        assert len(broker.queue("q-errors").ready) == 1

    run(scenario())


def test_hung_sync_handlers_grow_threads_only_to_a_bound_then_report_stuck() -> None:
    async def scenario() -> None:
        broker = filled(60)
        forever = threading.Event()
        before = threading.active_count()
        c = collector(
            broker, lambda body: forever.wait(30), handler_timeout_s=0.05, max_retries=100
        )
        await c.start()
        c.wake()
        try:
            await wait_for(lambda: c.health_reason.startswith("stuck:"), 20, "reported stuck")
            assert not c.healthy and c.state == "asleep"
            await asyncio.sleep(0.3)
            extra = threading.active_count() - before
            assert extra <= MIN_STUCK_THREADS + 2, f"{extra} threads for one slot"
        finally:
            forever.set()
        await wait_for(lambda: c.healthy, 20, "healthy again once the threads returned")
        await c.stop(2)

    run(scenario())


# ---------------------------------------------------------------- immediate acks
class ImmediateAckAdapter(MemoryAdapter):
    """A memory adapter that also offers ``ack_nowait``, counting which path the engine took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_once = 0
        self.batched = 0

    def ack_nowait(self, messages: Sequence[Message]) -> None:
        self.at_once += len(messages)
        for message in messages:
            self.broker.delete(self._source, message)

    async def ack(self, messages: Sequence[Message]) -> None:
        self.batched += len(messages)
        await super().ack(messages)


@pytest.mark.parametrize(("concurrency", "prefetch"), [(1, 0), (8, None)])
def test_an_ack_alone_in_flight_goes_at_once_others_batch(
    concurrency: int, prefetch: int | None
) -> None:
    async def scenario() -> None:
        broker = filled(200)
        adapter = ImmediateAckAdapter("q", broker=broker)
        options = CollectorOptions(
            **{**FAST_OPTIONS, "concurrency": concurrency, "prefetch": prefetch}
        )
        c = BaseCollector(adapter, lambda body: None, options)
        await c.serve(until_empty=True)
        assert c.stats.acked == 200 and adapter.at_once + adapter.batched == 200
        assert not broker.queue("q").ready and not broker.queue("q").leased
        if concurrency == 1:  # one in flight at a time: never a batch to wait for
            assert adapter.at_once == 200
        else:  # a lease of 100 is in flight at once: those acks batch per loop turn
            assert adapter.batched >= 100

    run(scenario())


# ---------------------------------------------------------------- acks riding on the next poll
class AckAndLeaseAdapter(MemoryAdapter):
    """A memory adapter that also offers ``ack_and_get_messages`` (as the local backend does),
    counting the combined calls; ``fail`` makes every combined call raise before it acks."""

    def __init__(self, *args: Any, fail: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail = fail
        self.combined = 0
        self.combined_acks = 0

    async def ack_and_get_messages(
        self, acks: Sequence[Message], max_messages: int
    ) -> list[Message]:
        self.combined += 1
        if self.fail:
            raise BackendUnavailable("ack and lease failed")
        self.combined_acks += len(acks)
        await self.ack(acks)
        return await self.get_messages(max_messages, 0)


@pytest.mark.parametrize("handler", ["sync", "batch"])
def test_acks_ride_on_the_next_poll_and_every_message_is_acked_once(handler: str) -> None:
    async def scenario() -> None:
        broker = filled(1000)
        adapter = AckAndLeaseAdapter("q", broker=broker)
        seen: list[bytes] = []

        @stalk.batch(max_size=50, max_wait_s=0.01)
        def in_batches(messages: list[Message]) -> None:
            seen.extend(m.body for m in messages)

        options = CollectorOptions(**{**FAST_OPTIONS, "concurrency": 8})
        c = BaseCollector(adapter, in_batches if handler == "batch" else seen.append, options)
        await c.serve(until_empty=True)
        assert c.stats.acked == 1000 and len(seen) == 1000 and len(set(seen)) == 1000
        assert adapter.combined > 0 and adapter.combined_acks > 0
        assert not broker.queue("q").ready and not broker.queue("q").leased

    run(scenario())


def test_a_failed_ack_and_lease_acks_nothing_and_the_messages_come_back() -> None:
    async def scenario() -> None:
        broker = filled(300)
        adapter = AckAndLeaseAdapter("q", broker=broker, fail=True)
        seen: list[bytes] = []
        options = CollectorOptions(
            **{**FAST_OPTIONS, "concurrency": 8, "visibility_timeout_s": 0.5}
        )
        c = BaseCollector(adapter, seen.append, options)
        await c.start()
        c.wake()
        await wait_for(lambda: adapter.combined > 0, 10, "a combined call")
        await wait_for(lambda: c.stats.failed_settles > 0, 10, "its acks counted as failed")
        adapter.fail = False  # the broker is back: what was not acked comes back, none lost
        await wait_for(lambda: not broker.queue("q").ready and not broker.queue("q").leased,
                       20, "the queue drained")  # fmt: skip
        await c.stop(2)
        assert set(seen) == {b"m%d" % i for i in range(300)}
        assert len(seen) > 300  # the unacked ones were handled again

    run(scenario())
