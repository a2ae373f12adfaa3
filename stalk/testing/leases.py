"""Conformance tests of leases: what comes back, when, and with which attempt.

Each test here fails for an adapter whose ``ack``, ``extend``, ``release`` or ``publish_error``
does nothing: the harness gives every collector a short lease
(:attr:`AdapterHarness.visibility_timeout_s`) and a test that asserts absence watches past it
(:meth:`AdapterHarness.quiet_s`), so a message that was never settled is back before the test
looks away. ``tests/unit/test_kit_mutants.py`` proves it on mutated memory adapters.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from stalk.collectors.base import Adapter, PollingAdapter, PushAdapter
from stalk.message import ATTR_REASON, Message
from stalk.result import fatal
from stalk.testing.harness import (
    AdapterHarness,
    Recorder,
    Running,
    assert_gone,
    collector,
    publish_all,
    read_errors,
    run_scenario,
    wait_for,
)

#: How many times the lease a handler must outlive in the heartbeat test.
HEARTBEAT_LEASES = 2.5


async def take_without_settling(adapter: Adapter, patience_s: float) -> Message:
    """Receive one message through an open adapter and settle nothing (a worker about to die)."""
    got: list[Message] = []
    if isinstance(adapter, PushAdapter):
        await adapter.start(got.append, 1)
        await wait_for(lambda: bool(got), patience_s, "a pushed delivery")
    else:
        assert isinstance(adapter, PollingAdapter)
        deadline = time.monotonic() + patience_s
        while not got:
            assert time.monotonic() < deadline, f"no delivery within {patience_s:.0f}s"
            got += await adapter.get_messages(1, 1.0)
    return got[0]


class LeaseTests:
    """Mixed into :class:`stalk.testing.ConformanceSuite`."""

    def test_lost_delivery_returns_with_next_attempt(self, harness: AdapterHarness) -> None:
        """A worker that dies holding a message: it comes back, and the delivery counted.

        The count that rises on every delivery is what the engine's poison rule reads; where the
        broker has leases the message returns once its lease lapses, elsewhere when the dead
        worker's connection closes.
        """

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"orphan"])
            doomed = harness.make_adapter(source, errors)
            doomed.visibility_timeout_s = harness.visibility_timeout_s
            await doomed.open()
            try:
                first = await take_without_settling(doomed, harness.patience_s)
            finally:
                await doomed.close()  # no ack, no release: as a killed process leaves it
            assert first.attempt == 1
            rec = Recorder()
            async with Running(collector(harness, source, errors, rec)):
                await wait_for(lambda: b"orphan" in rec.done, harness.patience_s, "the redelivery")
            assert rec.attempts_of(b"orphan")[0] == 2, "a lost delivery was not counted"

        run_scenario(scenario())

    def test_heartbeat_keeps_long_handler_to_one_delivery(self, harness: AdapterHarness) -> None:
        """A handler running past several leases is delivered once: ``extend`` keeps the lease."""
        if not harness.features().visibility_timeout:
            pytest.skip("no lease to lapse: a long handler cannot lose its message")
        hold_s = HEARTBEAT_LEASES * harness.visibility_timeout_s

        async def long_handler(body: bytes, message: Any) -> None:
            rec.enter(body, message)
            try:
                await asyncio.sleep(hold_s)
            finally:
                rec.leave(body)

        rec = Recorder()

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"long"])
            c = collector(harness, source, errors, long_handler, concurrency=2)
            async with Running(c):  # a free slot: a lapsed lease would be taken at once
                await wait_for(lambda: c.stats.acked >= 1, hold_s + harness.patience_s, "the ack")
            assert rec.attempts_of(b"long") == [1], "the lease lapsed under a running handler"

        run_scenario(scenario())

    def test_stop_releases_unstarted_for_redelivery_at_once(self, harness: AdapterHarness) -> None:
        """Messages a stopped collector held unhandled come back at once, not after the lease.

        The first collector leases for far longer than the second waits, so only ``release``
        can bring them back in time; where ``release_keeps_attempt`` the attempt is unchanged.
        """
        lease_s = 4 * harness.patience_s
        bodies = [f"held-{i}".encode() for i in range(6)]
        never = asyncio.Event()

        async def stuck(body: bytes, message: Any) -> None:
            first.enter(body, message)
            try:
                await never.wait()
            finally:
                first.leave(body)

        first = Recorder()

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, bodies)
            c = collector(
                harness, source, errors, stuck, concurrency=3, visibility_timeout_s=lease_s
            )
            await c.start()
            c.wake()
            await wait_for(lambda: first.active >= 3, harness.patience_s, "3 handlers holding")
            await c.stop(0)
            assert c.stats.released >= 3, f"released {c.stats.released} of 3 held messages"
            second = Recorder()
            async with Running(collector(harness, source, errors, second, concurrency=4)):
                await wait_for(
                    lambda: set(second.done) >= set(bodies),
                    harness.patience_s,
                    f"every message back well before the {lease_s:.0f}s lease lapsed",
                )
            if harness.features().release_keeps_attempt:
                counted = {
                    b: second.attempts_of(b)[0] for b in bodies if second.attempts_of(b)[0] != 1
                }
                assert not counted, f"a release counted an attempt: {counted}"

        run_scenario(scenario())

    def test_error_copy_published_and_original_gone(self, harness: AdapterHarness) -> None:
        """After ``publish_error`` the copy is on the error topic and the original is settled."""

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"bad"])
            rec = Recorder(lambda b, m: fatal("unusable"))
            c = collector(harness, source, errors, rec)
            async with Running(c):
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
                await wait_for(
                    lambda: c.stats.errored["fatal"] >= 1, harness.patience_s, "the error route"
                )
            dead = await read_errors(harness, errors, 1)
            assert dead[0].body == b"bad"
            assert dead[0].attributes[ATTR_REASON] == "fatal"
            await assert_gone(harness, source, errors, "the original of an error copy")

        run_scenario(scenario())
