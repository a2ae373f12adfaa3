"""In-process adapters for tests and docs: a tiny visibility-timeout queue with no dependencies.

``MemoryBroker`` behaves like a small SQS: leases that expire, delays held in the broker, a
delivery count, and error topics that are just other queues. Share one broker between adapters to
let a test read what another published. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stalk.collectors.base import (
    AdapterFeatures,
    AdapterSettings,
    Backlog,
    Deliver,
    PollingAdapter,
    PushAdapter,
)
from stalk.errors import MessageTooLarge
from stalk.message import Failure, Message

#: Largest body the memory broker takes, as SQS does (the engine has its own, configurable limit).
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(eq=False, slots=True)
class _Entry:
    id: str
    body: bytes
    attributes: dict[str, str]
    enqueued_at: float
    deliveries: int = 0
    token: int = 0
    lease_until: float = 0.0


@dataclass(slots=True)
class _Queue:
    ready: deque[_Entry] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Entry]] = field(default_factory=list)
    leased: dict[str, _Entry] = field(default_factory=dict)
    leases: list[tuple[float, int, _Entry]] = field(default_factory=list)


class MemoryBroker:
    """The shared state behind memory adapters: named queues in one process."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count()

    def queue(self, name: str) -> _Queue:
        """Return the queue called ``name``, creating it empty."""
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue()
        return q

    def put(self, name: str, body: bytes, attributes: Mapping[str, str], delay_s: float) -> str:
        """Enqueue a message and return its id."""
        if len(body) > MAX_BODY_BYTES:
            raise MessageTooLarge(f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
        entry = _Entry(str(next(self._ids)), bytes(body), dict(attributes), time.time())
        q = self.queue(name)
        if delay_s > 0:
            heapq.heappush(q.delayed, (time.monotonic() + delay_s, next(self._seq), entry))
        else:
            q.ready.append(entry)
        return entry.id

    def _promote(self, q: _Queue, now: float) -> None:
        while q.delayed and q.delayed[0][0] <= now:
            q.ready.append(heapq.heappop(q.delayed)[2])
        while q.leases and q.leases[0][0] <= now:
            _, _, entry = heapq.heappop(q.leases)
            if q.leased.get(entry.id) is entry and entry.lease_until <= now:
                del q.leased[entry.id]
                q.ready.append(entry)

    def lease(self, name: str, max_messages: int, lease_s: float) -> list[Message]:
        """Lease up to ``max_messages`` visible messages for ``lease_s`` seconds."""
        q = self.queue(name)
        now = time.monotonic()
        self._promote(q, now)
        out: list[Message] = []
        until = now + lease_s
        while q.ready and len(out) < max_messages:
            entry = q.ready.popleft()
            entry.deliveries += 1
            entry.token += 1
            entry.lease_until = until
            q.leased[entry.id] = entry
            heapq.heappush(q.leases, (until, next(self._seq), entry))
            out.append(
                Message(
                    id=entry.id,
                    body=entry.body,
                    attributes=dict(entry.attributes) if entry.attributes else {},
                    attempt=entry.deliveries,
                    enqueued_at=entry.enqueued_at,
                    source=name,
                    receipt=entry.token,
                )
            )
        return out

    def _holder(self, name: str, message: Message) -> _Entry | None:
        """Return the entry if ``message`` still holds its lease (a fence against stale workers)."""
        entry = self.queue(name).leased.get(message.id)
        if entry is None or entry.token != message.receipt:
            return None
        return entry

    def delete(self, name: str, message: Message) -> bool:
        """Delete a leased message; False when the lease was lost."""
        entry = self._holder(name, message)
        if entry is None:
            return False
        del self.queue(name).leased[entry.id]
        return True

    def requeue(self, name: str, message: Message, delay_s: float, count: bool) -> bool:
        """Give a leased message back, visible after ``delay_s``; uncount it when not handled."""
        entry = self._holder(name, message)
        if entry is None:
            return False
        q = self.queue(name)
        del q.leased[entry.id]
        entry.token += 1
        entry.attributes = dict(message.attributes)
        if not count:
            entry.deliveries -= 1
        if delay_s > 0:
            heapq.heappush(q.delayed, (time.monotonic() + delay_s, next(self._seq), entry))
        elif count:
            q.ready.append(entry)
        else:
            q.ready.appendleft(entry)
        return True

    def extend(self, name: str, message: Message, seconds: float) -> None:
        """Push a lease's expiry to ``seconds`` from now."""
        entry = self._holder(name, message)
        if entry is not None:
            entry.lease_until = time.monotonic() + seconds
            heapq.heappush(self.queue(name).leases, (entry.lease_until, next(self._seq), entry))

    def backlog(self, name: str, errors: str | None) -> Backlog:
        """Count ready, delayed and leased messages of ``name``."""
        q = self.queue(name)
        self._promote(q, time.monotonic())
        oldest = min((e.enqueued_at for e in q.ready), default=None)
        err = self.queue(errors) if errors else None
        return Backlog(
            ready=len(q.ready),
            delayed=len(q.delayed),
            in_flight=len(q.leased),
            errors=(len(err.ready) + len(err.delayed) + len(err.leased)) if err else None,
            oldest_age_s=(time.time() - oldest) if oldest is not None else None,
        )


MEMORY_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=None,
    delay_precision_s=0.5,
    ordering=True,
    persistent=False,
    visibility_timeout=True,
    backlog=True,
    max_batch=100,
)


class _MemoryOps:
    """Settling and publishing shared by the polling and the push memory adapters."""

    broker: MemoryBroker
    source: str | None
    error_topic: str | None

    @property
    def _source(self) -> str:
        assert self.source is not None, "adapter used before bind()/open()"
        return self.source

    def _unsettled(self, message: Message) -> None:
        """Forget ``message`` as delivered-and-unsettled (the push variant counts those)."""

    async def open(self) -> None:
        self.broker.queue(self._source)

    async def ack(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.broker.delete(self._source, message)

    async def retry_later(self, message: Message, delay_s: float) -> None:
        self.broker.requeue(self._source, message, delay_s, count=True)

    async def release(self, message: Message) -> None:
        self.broker.requeue(self._source, message, 0.0, count=False)

    async def extend(self, message: Message, seconds: float) -> None:
        self.broker.extend(self._source, message, seconds)

    async def publish_error(self, message: Message, failure: Failure) -> None:
        topic = self.error_topic or f"{self._source}-errors"
        self.broker.put(topic, message.body, {**message.attributes, **failure.to_attributes()}, 0)
        self.broker.delete(self._source, message)
        self._unsettled(message)

    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        return self.broker.put(self._source, body, attributes or {}, delay_s)

    async def backlog(self) -> Backlog | None:
        return self.broker.backlog(self._source, self.error_topic)


class MemoryAdapter(_MemoryOps, PollingAdapter):
    """Polling adapter over a :class:`MemoryBroker` (a fresh one unless you pass one to share)."""

    name = "memory"
    features = MEMORY_FEATURES

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: AdapterSettings | None = None,
        broker: MemoryBroker | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.broker = broker if broker is not None else MemoryBroker()

    async def close(self) -> None:
        return None

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        return self.broker.lease(self._source, max_messages, self.visibility_timeout_s)


class MemoryPushAdapter(_MemoryOps, PushAdapter):
    """Push adapter over a :class:`MemoryBroker`, to test the engine's push path without a server.

    A background task plays the broker's part: it delivers while fewer than ``max_in_flight``
    delivered messages are unsettled, as AMQP prefetch or NSQ RDY do.
    """

    name = "memory-push"
    features = MEMORY_FEATURES

    #: How often the fake broker looks for new messages when it has nothing to push.
    IDLE_POLL_S = 0.005

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: AdapterSettings | None = None,
        broker: MemoryBroker | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.broker = broker if broker is not None else MemoryBroker()
        self._max_in_flight = 1
        self._held: set[str] = set()
        self._running = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        self._max_in_flight = max_in_flight
        self._running.set()
        self._task = asyncio.create_task(self._pump(deliver), name="memory-push")

    async def _pump(self, deliver: Deliver) -> None:
        while True:
            await self._running.wait()
            room = self._max_in_flight - len(self._held)
            batch = self.broker.lease(self._source, room, self.visibility_timeout_s) if room else []
            for message in batch:
                self._held.add(message.id)
                deliver(message)
            await asyncio.sleep(0 if batch else self.IDLE_POLL_S)

    async def pause(self) -> None:
        self._running.clear()

    async def resume(self) -> None:
        self._running.set()

    async def set_max_in_flight(self, n: int) -> None:
        self._max_in_flight = n

    def _unsettled(self, message: Message) -> None:
        self._held.discard(message.id)

    async def ack(self, messages: Sequence[Message]) -> None:
        await super().ack(messages)
        for message in messages:
            self._unsettled(message)

    async def retry_later(self, message: Message, delay_s: float) -> None:
        await super().retry_later(message, delay_s)
        self._unsettled(message)

    async def release(self, message: Message) -> None:
        await super().release(message)
        self._unsettled(message)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
