"""Conformance tests of what an adapter's ``features`` promise, each gated by its field.

As Watermill's universal tests skip what a ``Features`` struct does not promise: ``ordering``
gates the in-order test, ``persistent`` the broker restart (through
:meth:`AdapterHarness.restart`), ``native_delay`` a retry outliving its worker, ``max_delay_s``
the longest delay the broker must hold; ``delay_precision_s`` bounds how late a retry may come.
"""

from __future__ import annotations

import asyncio

import pytest

from stalk.result import retry
from stalk.testing.harness import (
    ABSENCE_MARGIN_S,
    AdapterHarness,
    Recorder,
    Running,
    backlog_of,
    collector,
    publish_all,
    run_scenario,
    wait_for,
)

#: The retry delay asked of a broker that declares no ``max_delay_s``: past SQS's 12 h limit on
#: a visibility change, so an adapter that chains or parks long delays does so here.
UNBOUNDED_DELAY_S = 13 * 3600.0

#: Messages the in-order test publishes.
ORDERED_COUNT = 20


def retry_delay_s(harness: AdapterHarness) -> float:
    """Return a retry delay longer than the suite's lease, so a retry that only let the lease
    lapse (ignoring its delay) comes back too early to pass."""
    if harness.features().visibility_timeout:
        return harness.visibility_timeout_s + ABSENCE_MARGIN_S
    return 1.0


def retry_patience_s(harness: AdapterHarness, delay_s: float) -> float:
    """Return how long a retry of ``delay_s`` may take: the delay, the broker's declared
    ``delay_precision_s``, and the suite's patience for a loaded machine."""
    return delay_s + harness.features().delay_precision_s + harness.patience_s


class GuaranteeTests:
    """Mixed into :class:`stalk.testing.ConformanceSuite`."""

    def test_ordering_one_consumer_gets_publish_order(self, harness: AdapterHarness) -> None:
        if not harness.features().ordering:
            pytest.skip("features.ordering is False: no delivery order is promised")
        bodies = [f"n{i:02d}".encode() for i in range(ORDERED_COUNT)]

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, bodies)
            rec = Recorder()
            async with Running(collector(harness, source, errors, rec, concurrency=1)):
                await wait_for(
                    lambda: len(rec.done) >= len(bodies), harness.patience_s, "every message"
                )
            assert rec.bodies() == bodies, "delivered out of publish order"

        run_scenario(scenario())

    def test_broker_restart_loses_nothing(self, harness: AdapterHarness) -> None:
        """Ready messages and a pending delayed retry survive :meth:`AdapterHarness.restart`."""
        if not harness.features().persistent:
            pytest.skip("features.persistent is False: a restart may lose messages")
        bodies = [f"kept-{i}".encode() for i in range(5)]
        delay_s = retry_delay_s(harness)

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"retried"])
            first = Recorder(lambda b, m: retry("after the restart", delay=delay_s))
            c = collector(harness, source, errors, first)
            async with Running(c):
                await wait_for(lambda: c.stats.retried >= 1, harness.patience_s, "the retry")
            await publish_all(harness, source, errors, bodies)
            await harness.restart()
            second = Recorder()
            async with Running(collector(harness, source, errors, second, concurrency=4)):
                await wait_for(
                    lambda: set(second.done) >= {b"retried", *bodies},
                    retry_patience_s(harness, delay_s),
                    "every message after the restart",
                )
            assert 2 in second.attempts_of(b"retried"), "the retry lost its attempt count"

        run_scenario(scenario())

    def test_retry_outlives_the_worker_that_asked(self, harness: AdapterHarness) -> None:
        """With ``native_delay`` the broker holds a retry: its worker may stop meanwhile."""
        if not harness.features().native_delay:
            pytest.skip("features.native_delay is False: a retry waits in worker memory")
        delay_s = retry_delay_s(harness)

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"held"])
            first = Recorder(lambda b, m: retry("come back later", delay=delay_s))
            c = collector(harness, source, errors, first)
            async with Running(c):
                await wait_for(lambda: c.stats.retried >= 1, harness.patience_s, "the retry")
            asked_at = first.deliveries[0].at
            second = Recorder()
            async with Running(collector(harness, source, errors, second)):
                await wait_for(
                    lambda: b"held" in second.done,
                    retry_patience_s(harness, delay_s),
                    "the retry, from the broker, after its worker stopped",
                )
            back = second.deliveries[0]
            assert back.attempt == 2
            assert back.at - asked_at >= delay_s * 0.9, "the retry came back before its delay"

        run_scenario(scenario())

    def test_longest_declared_delay_is_held(self, harness: AdapterHarness) -> None:
        """A retry as long as ``max_delay_s`` (13 h where unbounded) is taken and kept hidden."""
        max_delay_s = harness.features().max_delay_s
        delay_s = UNBOUNDED_DELAY_S if max_delay_s is None else max_delay_s

        async def scenario() -> None:
            source, errors = harness.new_names()
            await harness.prepare(source, errors)
            await publish_all(harness, source, errors, [b"distant"])
            rec = Recorder(lambda b, m: retry("much later", delay=delay_s))
            c = collector(harness, source, errors, rec)
            async with Running(c):
                await wait_for(lambda: len(rec.done) >= 1, harness.patience_s, "a delivery")
                await wait_for(
                    lambda: c.stats.retried + c.stats.failed_settles >= 1,
                    harness.patience_s,
                    "the retry settled",
                )
                await asyncio.sleep(harness.quiet_s())
            assert c.stats.failed_settles == 0, f"a {delay_s:.0f}s retry was refused"
            assert rec.attempts_of(b"distant") == [1], "a long retry came back at once"
            backlog = await backlog_of(harness, source, errors)
            if backlog is not None:
                assert not backlog.ready, f"a {delay_s:.0f}s retry is visible: {backlog}"
                hidden = [n for n in (backlog.delayed, backlog.in_flight) if n is not None]
                assert not hidden or sum(hidden) >= 1, f"the long retry is gone: {backlog}"

        run_scenario(scenario())
