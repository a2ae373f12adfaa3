"""How the conformance suite builds, feeds and reads an adapter under test."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from stalk.collectors.base import Adapter, AdapterFeatures, Backlog
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.collector import BaseCollector
from stalk.message import Message
from stalk.options import CollectorOptions

#: Engine options that keep the suite quick: short polls, short backoff, short grace.
FAST_OPTIONS: dict[str, Any] = {
    "polling_period_s": 0.02,
    "max_polling_period_s": 0.25,
    "retry_interval_s": 0.05,
    "max_retry_delay_s": 0.2,
    "shutdown_grace_s": 5.0,
}

#: Longest any one conformance test may take before it fails instead of hanging CI.
TEST_TIMEOUT_S = 90.0

#: How long past a lapsed lease the suite keeps watching before it believes a message is gone.
ABSENCE_MARGIN_S = 1.0
#: How long the suite watches for absence on a broker without leases (nothing comes back later).
NO_LEASE_QUIET_S = 1.5


def run_scenario(coro: Coroutine[Any, Any, None]) -> None:
    """Run one test's scenario on a fresh loop, failing it after :data:`TEST_TIMEOUT_S`."""
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


class AdapterHarness:
    """Build adapters for the suite; override :meth:`make_adapter`, the rest where needed."""

    #: Seconds the suite waits for something that should happen (a delivery, an error copy).
    patience_s: float = 30.0
    #: Lease the suite's collectors take (``CollectorOptions.visibility_timeout_s``): short, so
    #: an un-acked message comes back within a test and a broken ack, extend or release shows.
    #: Override for a broker with a coarser lease (SQS counts whole seconds).
    visibility_timeout_s: float = 2.0

    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        """Return a new, unopened adapter for ``source`` with ``error_topic``."""
        raise NotImplementedError

    def features(self) -> AdapterFeatures:
        """Return what the adapter guarantees; by default its class's declaration."""
        return type(self.make_adapter("probe", "probe-errors")).features

    def new_names(self) -> tuple[str, str]:
        """Return a fresh source and error topic, unique per test."""
        source = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return source, f"{source}-errors"

    async def prepare(self, source: str, error_topic: str) -> None:
        """Create what the broker needs before a test (queues, subscriptions)."""

    def error_source(self, error_topic: str) -> str:
        """Return the name to consume the error topic from (a subscription for Pub/Sub)."""
        return error_topic

    def options(self, **overrides: Any) -> CollectorOptions:
        """Return engine options for a test: the fast defaults, the short lease, ``overrides``."""
        base = {**FAST_OPTIONS, "visibility_timeout_s": self.visibility_timeout_s}
        return CollectorOptions(**{**base, **overrides})

    def quiet_s(self) -> float:
        """Return how long to watch before believing a message is gone for good.

        Past the lease where the broker has one (an un-acked message would be back by then),
        else a short wait: without leases an unsettled message returns when its consumer closes.
        """
        if self.features().visibility_timeout:
            return self.visibility_timeout_s + ABSENCE_MARGIN_S
        return NO_LEASE_QUIET_S

    async def restart(self) -> None:
        """Restart the broker; what it persisted must still be there afterwards.

        Called with no collector running. The default skips the test that asked: override where
        the harness controls its broker (see ``tests/brokers/amqp.py``).
        """
        pytest.skip(f"{type(self).__name__} cannot restart its broker")


class MemoryHarness(AdapterHarness):
    """The memory adapter on one shared in-process broker."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()

    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        return MemoryAdapter(source, error_topic=error_topic, broker=self.broker)


@dataclass
class Delivery:
    """What the recording handler saw of one delivery."""

    body: bytes
    attempt: int
    id: str
    attributes: dict[str, str]
    source: str
    at: float


class Recorder:
    """A handler wrapper that records every delivery and how many ran at once; thread-safe."""

    def __init__(self, decide: Callable[[bytes, Message], Any] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.done: list[bytes] = []
        self.active = 0
        self.max_active = 0
        self._decide = decide
        self._lock = threading.Lock()

    def enter(self, body: bytes, message: Message) -> None:
        with self._lock:
            self.deliveries.append(
                Delivery(
                    body,
                    message.attempt,
                    message.id,
                    dict(message.attributes),
                    message.source,
                    time.monotonic(),
                )
            )
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def leave(self, body: bytes) -> None:
        with self._lock:
            self.active -= 1
            self.done.append(body)

    def reset_max(self) -> None:
        with self._lock:
            self.max_active = self.active

    def __call__(self, body: bytes, message: Message) -> Any:
        self.enter(body, message)
        try:
            return self._decide(body, message) if self._decide else None
        finally:
            self.leave(body)

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [d.body for d in self.deliveries]

    def attempts_of(self, body: bytes) -> list[int]:
        with self._lock:
            return [d.attempt for d in self.deliveries if d.body == body]


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def publish_all(
    harness: AdapterHarness,
    source: str,
    error_topic: str,
    bodies: list[bytes],
    attributes: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> list[str]:
    """Publish ``bodies`` through a fresh adapter and close it."""
    adapter = harness.make_adapter(source, error_topic)
    await adapter.open()
    try:
        return [await adapter.publish(b, attributes, delay_s) for b in bodies]
    finally:
        await adapter.close()


class Running:
    """A collector started and woken in the background of a test."""

    def __init__(self, collector: BaseCollector) -> None:
        self.collector = collector
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await self.collector.start()
        self.collector.wake()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.collector.state != "stopped":
            await self.collector.stop(2.0)


def collector(
    harness: AdapterHarness,
    source: str,
    error_topic: str,
    handler: Callable[..., Any],
    **options: Any,
) -> BaseCollector:
    """Build a collector over a fresh adapter with the suite's fast options."""
    return BaseCollector(
        harness.make_adapter(source, error_topic), handler, harness.options(**options)
    )


async def backlog_of(harness: AdapterHarness, source: str, error_topic: str) -> Backlog | None:
    """Return ``backlog()`` of ``source`` through a fresh adapter (``None`` where undeclared)."""
    if not harness.features().backlog:
        return None
    adapter = harness.make_adapter(source, error_topic)
    await adapter.open()
    try:
        return await adapter.backlog()
    finally:
        await adapter.close()


async def assert_gone(harness: AdapterHarness, source: str, error_topic: str, what: str) -> None:
    """Fail if anything of ``source`` is delivered within :meth:`AdapterHarness.quiet_s`.

    Where the adapter declares ``backlog``, its counts must say the source is empty as well.
    """
    rec = Recorder()
    async with Running(collector(harness, source, error_topic, rec, concurrency=4)):
        await asyncio.sleep(harness.quiet_s())
    assert rec.bodies() == [], f"{what}: {rec.bodies()!r} came back"
    backlog = await backlog_of(harness, source, error_topic)
    if backlog is not None:
        left = {
            k: v for k, v in backlog.as_dict().items() if k in ("ready", "delayed", "in_flight")
        }
        assert not any(left.values()), f"{what}: backlog() still counts {left}"


async def read_errors(harness: AdapterHarness, error_topic: str, count: int) -> list[Delivery]:
    """Consume ``count`` messages from the error topic and return what they carried."""
    recorder = Recorder()
    source = harness.error_source(error_topic)
    probe = harness.make_adapter(source, "unused")
    # No body limit: whatever is on the error topic is read back, a too_large copy included.
    c = collector(
        harness,
        source,
        probe.default_error_topic(source),
        recorder,
        concurrency=4,
        max_message_bytes=2**31,
    )
    async with Running(c):
        await wait_for(
            lambda: len(recorder.done) >= count,
            harness.patience_s,
            f"{count} message(s) on error topic {error_topic}",
        )
        await asyncio.sleep(0.1)
    return recorder.deliveries
