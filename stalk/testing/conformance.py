"""One set of semantic tests that every adapter must pass (Watermill's ``TestPubSub`` idea).

Each test publishes through the adapter, runs a real :class:`BaseCollector` over it and checks
what the broker did: acks remove, retries come back late with ``attempt + 1``, failures land on the
error topic with the body intact and the metadata, sleep/wake/scale/stop behave, and handler
misbehaviour (raise, hang, wrong type) is routed while the worker keeps running.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from stalk.batching import batch
from stalk.errors import Fatal
from stalk.message import (
    ATTR_ATTEMPTS,
    ATTR_ERROR,
    ATTR_ERROR_TYPE,
    ATTR_ORIGINAL_ID,
    ATTR_REASON,
    ATTR_SOURCE,
    Message,
)
from stalk.result import Result, fatal, retry
from stalk.testing.guarantees import GuaranteeTests, retry_delay_s, retry_patience_s
from stalk.testing.harness import (
    TEST_TIMEOUT_S,
    AdapterHarness,
    Recorder,
    Running,
    assert_gone,
    collector,
    publish_all,
    read_errors,
    wait_for,
)
from stalk.testing.harness import run_scenario as _run
from stalk.testing.leases import LeaseTests

__all__ = ["TEST_TIMEOUT_S", "ConformanceSuite"]


async def _quiet(seconds: float) -> None:
    await asyncio.sleep(seconds)


class ConformanceSuite(LeaseTests, GuaranteeTests):
    """Subclass as ``Test<Backend>Conformance`` and provide a ``harness`` fixture.

    The lease tests (:mod:`stalk.testing.leases`) and the feature-gated ones
    (:mod:`stalk.testing.guarantees`) are mixed in; this class holds the rest.
    """

    @pytest.fixture
    def harness(self) -> AdapterHarness:
        raise NotImplementedError("provide a 'harness' fixture returning your AdapterHarness")

    # ------------------------------------------------------------------ ack
    def test_ack_removes_message(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"one", b"two", b"three"])
            first = Recorder()
            async with Running(collector(harness, source, errors, first, concurrency=2)):
                await wait_for(lambda: len(first.done) >= 3, harness.patience_s, "3 deliveries")
            assert sorted(first.bodies()) == [b"one", b"three", b"two"]
            await assert_gone(harness, source, errors, "acked messages")

        _run(scenario())

    def test_message_carries_id_attempt_source_attributes(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"x"], attributes={"trace": "abc"})
            rec = Recorder()
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
            seen = rec.deliveries[0]
            assert seen.id, "message id is empty"
            assert seen.attempt == 1
            assert seen.attributes.get("trace") == "abc"

        _run(scenario())

    # ------------------------------------------------------------------ retry
    def test_retry_redelivers_after_delay_with_next_attempt(self, harness: AdapterHarness) -> None:
        delay_s = retry_delay_s(harness)  # past the lease: a retry that only lets it lapse fails

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"later"])
            rec = Recorder(lambda b, m: retry("not yet", delay=delay_s) if m.attempt == 1 else None)
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(
                    lambda: len(rec.done) >= 2, retry_patience_s(harness, delay_s), "the retry"
                )
            first, second = rec.deliveries[0], rec.deliveries[1]
            assert (first.attempt, second.attempt) == (1, 2)
            assert second.body == b"later"
            assert second.at - first.at >= delay_s * 0.9, "retry came back before its delay"

        _run(scenario())

    def test_exhausted_retries_land_on_error_topic_intact(self, harness: AdapterHarness) -> None:
        body = bytes(range(256)) if harness.features().binary_body else '{"k": "é"}'.encode()

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [body])
            rec = Recorder(lambda b, m: retry("still broken", delay=0))
            async with Running(collector(harness, source, errors, rec, max_retries=2)):
                await wait_for(lambda: len(rec.done) >= 3, harness.patience_s, "3 attempts")
                dead = await read_errors(harness, errors, 1)
            assert rec.attempts_of(body) == [1, 2, 3]
            assert dead[0].body == body, "error topic copy is not the original body"
            meta = dead[0].attributes
            assert meta[ATTR_REASON] == "retries_exhausted"
            assert meta[ATTR_ATTEMPTS] == "3"
            assert "still broken" in meta[ATTR_ERROR]
            assert meta[ATTR_SOURCE] == source
            assert meta.get(ATTR_ORIGINAL_ID)

        _run(scenario())

    def test_fatal_goes_straight_to_error_topic(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"poison", b"fine"])
            rec = Recorder(
                lambda b, m: fatal(ValueError("cannot parse")) if b == b"poison" else None
            )
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(lambda: len(rec.done) >= 2, harness.patience_s, "2 deliveries")
                dead = await read_errors(harness, errors, 1)
            assert rec.attempts_of(b"poison") == [1]
            assert dead[0].body == b"poison"
            assert dead[0].attributes[ATTR_REASON] == "fatal"
            assert dead[0].attributes[ATTR_ERROR_TYPE] == "ValueError"
            assert dead[0].attributes[ATTR_ATTEMPTS] == "1"

        _run(scenario())

    # ------------------------------------------------------------------ batch handlers
    def test_batch_handler_settles_each_message_on_its_own(self, harness: AdapterHarness) -> None:
        """A batch handler's one bad item goes to the error topic alone, one asks for a retry,
        and the rest are acked: the batch is never retried as a whole for one item."""
        bodies = [f"b{i}".encode() for i in range(12)]
        attempts: dict[bytes, list[int]] = {}
        sizes: list[int] = []

        @batch(max_size=12, max_wait_s=0.3)
        def handler(messages: list[Message]) -> dict[str, Result]:
            sizes.append(len(messages))
            for m in messages:
                attempts.setdefault(m.body, []).append(m.attempt)
            outcomes: dict[str, Result] = {}
            for m in messages:
                if m.body == b"b3":
                    outcomes[m.id] = fatal(ValueError("bad item"))
                elif m.body == b"b5" and m.attempt == 1:
                    outcomes[m.id] = retry("later", delay=0.1)
            return outcomes

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, bodies)
            async with Running(collector(harness, source, errors, handler)):
                await wait_for(
                    lambda: len(attempts) == 12 and attempts.get(b"b5") == [1, 2],
                    retry_patience_s(harness, 0.1),
                    "every message handled and b5 retried once",
                )
                dead = await read_errors(harness, errors, 1)
            assert dead[0].body == b"b3" and dead[0].attributes[ATTR_REASON] == "fatal"
            assert all(attempts[b] == [1] for b in bodies if b != b"b5"), attempts
            await assert_gone(harness, source, errors, "a settled batch")

        _run(scenario())

    # ------------------------------------------------------------------ unflagged errors
    @pytest.mark.parametrize("policy", ["error_topic", "retry", "drop"])
    def test_unflagged_error_policy(self, harness: AdapterHarness, policy: str) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"odd"])
            rec = Recorder(lambda b, m: Result(error="odd input") if m.attempt == 1 else None)
            c = collector(harness, source, errors, rec, unflagged_error=policy)
            async with Running(c):
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
                if policy == "retry":
                    await wait_for(lambda: len(rec.done) >= 2, harness.patience_s, "the retry")
                else:
                    await wait_for(
                        lambda: c.stats.acked >= 1 or c.stats.errored["error"] >= 1,
                        harness.patience_s,
                        "the message settled",
                    )
            if policy == "error_topic":
                dead = await read_errors(harness, errors, 1)
                assert dead[0].attributes[ATTR_REASON] == "error"
                assert rec.attempts_of(b"odd") == [1]
            elif policy == "retry":
                assert rec.attempts_of(b"odd") == [1, 2]
            else:
                assert rec.attempts_of(b"odd") == [1]
                assert c.stats.dropped == 1
            if policy != "retry":
                await assert_gone(harness, source, errors, f"a message settled by {policy}")

        _run(scenario())

    # ------------------------------------------------------------------ handler misbehaviour
    def test_raise_retries_and_fatal_exception_routes(self, harness: AdapterHarness) -> None:
        def handler(body: bytes, message: Any) -> None:
            if body == b"flaky" and message.attempt == 1:
                raise ConnectionError("transient")
            if body == b"doomed":
                raise Fatal("never valid")

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"flaky", b"doomed"])
            rec = Recorder(handler)
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(lambda: len(rec.done) >= 3, harness.patience_s, "3 deliveries")
                dead = await read_errors(harness, errors, 1)
            assert rec.attempts_of(b"flaky") == [1, 2]
            assert dead[0].body == b"doomed"
            assert dead[0].attributes[ATTR_ERROR_TYPE] == "Fatal"

        _run(scenario())

    def test_wrong_return_type_is_fatal_and_worker_keeps_running(
        self, harness: AdapterHarness
    ) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"weird"])
            rec = Recorder(lambda b, m: 42 if b == b"weird" else None)
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
                await publish_all(harness, source, errors, [b"after"])
                await wait_for(lambda: b"after" in rec.done, harness.patience_s, "the next message")
                dead = await read_errors(harness, errors, 1)
            assert dead[0].attributes[ATTR_ERROR_TYPE] == "TypeError"
            assert "returned int" in dead[0].attributes[ATTR_ERROR]

        _run(scenario())

    @pytest.mark.parametrize("style", ["sync", "async"])
    def test_handler_timeout_is_retried(self, harness: AdapterHarness, style: str) -> None:
        rec = Recorder()

        def sync_handler(body: bytes, message: Any) -> None:
            rec.enter(body, message)
            try:
                if message.attempt == 1:
                    time.sleep(3.0)
            finally:
                rec.leave(body)

        async def async_handler(body: bytes, message: Any) -> None:
            rec.enter(body, message)
            try:
                if message.attempt == 1:
                    await asyncio.sleep(3.0)
            finally:
                rec.leave(body)

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"slow"])
            handler = sync_handler if style == "sync" else async_handler
            c = collector(harness, source, errors, handler, handler_timeout_s=0.5)
            async with Running(c):
                await wait_for(
                    lambda: 2 in rec.attempts_of(b"slow"),
                    harness.patience_s,
                    "the retry after a timeout",
                )
                await wait_for(lambda: c.stats.acked >= 1, harness.patience_s, "the ack")
            assert rec.attempts_of(b"slow")[:2] == [1, 2]

        _run(scenario())

    def test_oversize_body_goes_to_error_topic_unhandled(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"x" * 64, b"ok"])
            rec = Recorder()
            async with Running(collector(harness, source, errors, rec, max_message_bytes=16)):
                await wait_for(lambda: b"ok" in rec.done, harness.patience_s, "the small message")
                dead = await read_errors(harness, errors, 1)
            assert b"x" * 64 not in rec.bodies()
            assert dead[0].body == b"x" * 64
            assert dead[0].attributes[ATTR_REASON] == "too_large"

        _run(scenario())

    # ------------------------------------------------------------------ sleep, wake, scale
    def test_sleep_stops_intake_and_wake_resumes(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            rec = Recorder()
            c = collector(harness, source, errors, rec)
            async with Running(c):
                await publish_all(harness, source, errors, [b"awake"])
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
                c.sleep()
                c.sleep()  # idempotent
                await asyncio.sleep(0.5)
                await publish_all(harness, source, errors, [b"asleep"])
                await _quiet(2.0)
                assert b"asleep" not in rec.bodies(), "a sleeping collector took a message"
                c.wake()
                c.wake()
                await wait_for(
                    lambda: b"asleep" in rec.done, harness.patience_s, "delivery after wake"
                )

        _run(scenario())

    def test_scale_up_and_down_changes_observed_concurrency(self, harness: AdapterHarness) -> None:
        rec = Recorder(lambda b, m: time.sleep(0.2))

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [f"m{i}".encode() for i in range(60)])
            c = collector(harness, source, errors, rec, concurrency=1)
            async with Running(c):
                await wait_for(lambda: len(rec.done) >= 3, harness.patience_s, "3 deliveries")
                assert rec.max_active == 1
                c.scale(4)
                await wait_for(lambda: rec.active >= 4, harness.patience_s, "4 handlers at once")
                c.scale(1)
                await wait_for(lambda: rec.active <= 1, harness.patience_s, "back to 1 handler")
                rec.reset_max()
                done = len(rec.done)
                await wait_for(lambda: len(rec.done) >= done + 3, harness.patience_s, "3 more")
                assert rec.max_active == 1, "scale(1) did not bring concurrency back to 1"

        _run(scenario())

    # ------------------------------------------------------------------ shutdown
    def test_stop_with_in_flight_loses_nothing(self, harness: AdapterHarness) -> None:
        bodies = [f"job-{i}".encode() for i in range(10)]

        async def slow(body: bytes) -> None:
            await asyncio.sleep(0.3)
            done.add(body)

        done: set[bytes] = set()

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, bodies)
            c = collector(harness, source, errors, slow, concurrency=3)
            await c.start()
            c.wake()
            await wait_for(lambda: c.in_flight >= 2, harness.patience_s, "messages in flight")
            await c.stop(0.05)  # too short for the handlers: they must be released
            assert c.state == "stopped"
            rec = Recorder(lambda b, m: done.add(b))
            async with Running(collector(harness, source, errors, rec, concurrency=4)):
                await wait_for(
                    lambda: done >= set(bodies),
                    harness.patience_s,
                    "every message handled by the second worker",
                )

        _run(scenario())

    def test_stop_with_grace_finishes_in_flight(self, harness: AdapterHarness) -> None:
        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"a", b"b"])
            rec = Recorder(lambda b, m: time.sleep(0.3))
            c = collector(harness, source, errors, rec, concurrency=2)
            await c.start()
            c.wake()
            await wait_for(lambda: rec.active >= 1, harness.patience_s, "a handler running")
            await c.stop(10.0)
            assert c.stats.released == 0 or c.stats.acked >= 1
            second = Recorder()
            async with Running(collector(harness, source, errors, second)):
                await wait_for(
                    lambda: len(rec.done) + len(second.done) >= 2,
                    harness.patience_s,
                    "both messages handled",
                )
            assert set(rec.done) | set(second.done) == {b"a", b"b"}

        _run(scenario())
