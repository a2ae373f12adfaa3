"""How messages come in: the engine asks a polling adapter, or a push adapter delivers.

The two styles differ in everything about intake (who decides when to fetch, how sleep, scale
and shutdown reach the broker) and in nothing after it, so each is one class here and the
collector holds whichever its adapter needs, with no branch on the delivery style anywhere else.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from stalk.backoff import Backoff
from stalk.collectors.base import Adapter, PollingAdapter, PushAdapter
from stalk.engine.inflight import InFlight
from stalk.engine.stats import CollectorStats
from stalk.message import Message
from stalk.options import CollectorOptions
from stalk.tasks import TaskSet

logger = logging.getLogger("stalk.collector")

#: Longest wait for more free slots before a poll (see ``PollIntake._gather_slots``).
GATHER_S = 0.002
#: First pause before a push adapter's failed start, resume or scale is tried again.
RETRY_FIRST_S = 0.2
#: Pause between the drained checks of ``--until-empty`` on a push source whose broker counts.
DRAINED_TICK_S = 0.1


class Host(Protocol):
    """What intake needs of its collector (the collector is the only implementation)."""

    @property
    def options(self) -> CollectorOptions: ...
    @property
    def stats(self) -> CollectorStats: ...
    @property
    def inflight(self) -> InFlight: ...
    @property
    def tasks(self) -> TaskSet: ...
    @property
    def state(self) -> str: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Most messages held at once: running slots plus the prefetch buffer."""
        ...

    @property
    def running_slots(self) -> int:
        """Messages the handlers can run at once (a batch handler's batch per slot)."""
        ...

    @property
    def lease_size(self) -> int:
        """Most messages one lease asks for."""
        ...

    @property
    def prefetch(self) -> int:
        """Messages held beyond the running slots (0: lease only for free slots)."""
        ...

    @property
    def healthy(self) -> bool: ...
    @property
    def health_reason(self) -> str: ...

    def accept(self, messages: Sequence[Message]) -> None:
        """Take delivered messages in: admit, hand to the handler, or route."""

    async def release(self, message: Message) -> None:
        """Give a message back unprocessed."""

    async def drained(self) -> bool:
        """True when nothing is held, no retry of ours is pending and the broker agrees."""

    def set_health(self, healthy: bool, reason: str) -> None:
        """Record the health /healthz reports."""

    def stop_drained(self) -> None:
        """Begin the shutdown ``--until-empty`` asks for once the source is drained."""


class Intake(abc.ABC):
    """One delivery style's side of wake, sleep, scale and stop."""

    def __init__(self, host: Host) -> None:
        self.host = host
        #: Monotonic time messages last arrived (push: how long the source has been quiet).
        self.last_intake = time.monotonic()
        self._until_empty = False

    @abc.abstractmethod
    async def start(self, awake: bool) -> None:
        """Begin intake machinery once the adapter is open; ``awake``: deliver at once."""

    @abc.abstractmethod
    def wake(self) -> None:
        """The collector woke: let messages in (on the loop)."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """The collector fell asleep: stop new messages (on the loop)."""

    @abc.abstractmethod
    def scale(self, concurrency: int) -> None:
        """Concurrency changed: tell the broker where it limits delivery (on the loop)."""

    @abc.abstractmethod
    async def stop(self, grace_s: float) -> None:
        """Shutdown began: end intake so nothing new arrives, within about ``grace_s``."""

    def stop_when_drained(self) -> None:
        """Stop the collector once the source is drained (``--until-empty``)."""
        self._until_empty = True

    @property
    def alive(self) -> bool:
        """False if intake died while it should run (a bug; the log has it)."""
        return True

    def note_arrival(self, count: int) -> None:
        """Count ``count`` messages in: the last-intake clock and ``received``."""
        self.last_intake = time.monotonic()
        self.host.stats.received += count


class PollIntake(Intake):
    """Fetch only what fits: free slots (gathered a moment into batches), with backoff when idle.

    Empty polls back off from ``polling_period_s`` doubling to ``max_polling_period_s``, reset on
    the first message; broker errors back off the same way and mark the collector unhealthy, never
    a crash loop and never a silent hang.
    """

    def __init__(self, host: Host, adapter: PollingAdapter) -> None:
        super().__init__(host)
        self.adapter = adapter
        self._task: asyncio.Task[None] | None = None
        #: Set while the collector is awake or draining: the loop waits on it while asleep.
        self._awake = asyncio.Event()
        #: One message at a time, run alone, while what comes back was delivered before (see
        #: :meth:`_lease_alone`).
        self.careful = True
        self._alone = 0
        self._backoff = Backoff(host.options.polling_period_s, host.options.max_polling_period_s)
        #: A poll is under way: this loop's own, or one riding on an ack (:meth:`want`).
        self._polling = False
        #: Set by the collector where the adapter acks and leases in one call: whether an ack
        #: batch is queued or under way, which the next lease should ride on (or follow).
        self.acks_under_way: Callable[[], bool] | None = None

    async def start(self, awake: bool) -> None:
        if awake:
            self._awake.set()
        self._task = self.host.tasks.spawn(self._run(), "stalk-poll")

    def want(self, acks: int) -> int:
        """How many messages the next poll would lease once ``acks`` acks free their slots, if
        it would run right after them (0 otherwise): the settler then acks and leases in one
        call (:class:`~stalk.collectors.base.AckAndLease`). A nonzero answer reserves the poll
        until :meth:`leased`, so this loop does not poll meanwhile."""
        host = self.host
        if self._polling or self.careful or host.state != "awake" or not self._awake.is_set():
            return 0
        capacity, lease_size = host.capacity, host.lease_size
        room = host.inflight.free(capacity) + acks
        if room < max(1, min(lease_size, capacity) // 2):
            return 0  # the loop's own rules (a gathered or full lease) decide this one
        self._polling = True
        return min(room, lease_size)

    def leased(self, messages: Sequence[Message]) -> None:
        """Take in what a poll riding on an ack leased (on the loop), as :meth:`_run` would."""
        self._polling = False
        host = self.host
        if messages:
            self._backoff.reset()
            if host.state == "awake":
                host.accept(messages)
            else:  # shutdown or sleep began while the call was under way
                # Held first, so a shutdown waits for their release instead of cancelling it
                # before it starts (they would stay leased, their delivery counted).
                host.inflight.hold(messages, time.monotonic())
                host.tasks.spawn(self._release(messages), "stalk-release")
        host.inflight.notify()

    async def _release(self, messages: Sequence[Message]) -> None:
        for message in messages:
            await self.host.release(message)

    def wake(self) -> None:
        self._awake.set()

    def sleep(self) -> None:
        self._awake.clear()

    def scale(self, concurrency: int) -> None:
        """Free slots are read at each poll: nothing to tell the broker."""

    @property
    def alive(self) -> bool:
        task = self._task
        return task is None or self.host.state not in ("awake", "asleep") or not task.done()

    async def stop(self, grace_s: float) -> None:
        """Let a poll under way return, so what it leased is released now, not after its lease."""
        self._awake.set()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        limit = grace_s + self.host.options.max_polling_period_s
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            logger.warning("poll still blocked after %.1fs at shutdown; cancelling it", limit)
            task.cancel()

    async def _run(self) -> None:
        host, adapter, inflight = self.host, self.adapter, self.host.inflight
        backoff = self._backoff
        while True:
            await self._awake.wait()
            if host.state != "awake":
                return
            if self._polling:  # a poll riding on an ack is under way
                await inflight.changed()
                continue
            capacity, lease_size = host.capacity, host.lease_size
            room = inflight.free(capacity)
            if self.careful:
                if inflight:  # the one message leased alone is still being handled
                    await inflight.changed()
                    continue
                room = lease_size = 1
            if room <= 0:
                await inflight.changed()
                continue
            if self.acks_under_way is not None and inflight and self.acks_under_way():
                # The lease rides on that ack batch, or follows it: a poll of its own now would
                # send the acks alone too, two transactions where one does, and measured on the
                # local backend the two then kept alternating (a third slower at prefetch 300).
                await inflight.changed()
                continue
            if host.prefetch:
                # The buffer keeps the handlers busy meanwhile: wait for room for a full lease.
                # A partial one would be a transaction or request of its own where the acks
                # about to free that room can carry the next lease (AckAndLease): measured on
                # the local backend at concurrency 64, half leases between ack batches made
                # two broker calls of every other round.
                want = max(1, min(lease_size, host.prefetch))
            else:
                want = max(1, min(lease_size, capacity) // 2)
            if room < want and inflight:
                if host.prefetch:
                    await inflight.changed()
                    continue
                room = await self._gather_slots(room, want)
                if self._polling:  # a poll rode on an ack meanwhile
                    continue
            started = time.monotonic()
            self._polling = True
            try:
                messages = await adapter.get_messages(min(room, lease_size), backoff.current_s)
            except Exception as exc:  # broker down: back off, never crash-loop, never hang silently
                host.stats.broker_errors += 1
                host.set_health(False, f"poll failed: {exc}")
                wait = backoff.next()
                logger.warning(
                    "poll of %s failed (%s); retrying in %.1fs", adapter.describe(), exc, wait
                )
                await self._idle(wait)
                continue
            finally:
                self._polling = False
            if not host.healthy and host.health_reason.startswith("poll failed"):
                logger.info("poll of %s works again", adapter.describe())
                host.set_health(True, "ok")
            if messages:
                backoff.reset()
                if host.state != "awake":  # shutdown or sleep began while the poll was under way
                    for message in messages:
                        await host.release(message)
                    if host.state != "asleep":
                        return
                    continue
                if self.careful:
                    self._lease_alone(messages)
                host.accept(messages)
                continue
            if self._until_empty and await host.drained():
                host.stop_drained()
                return
            await self._idle(backoff.next() - (time.monotonic() - started))

    def _lease_alone(self, messages: Sequence[Message]) -> None:
        """Stay careful while leased messages were delivered before; a fresh one ends it.

        A worker that died on a message (``os._exit``, a segfault, the OOM killer) left every
        message it had leased with that delivery counted, the pill's batch-mates and prefetched
        messages too. Were the next worker to lease them together again, each death would count
        against all of them, and the innocent ones would reach ``max_retries + 1`` deliveries
        and the error topic as ``poison`` with the pill. Leased one at a time and run alone, a
        pill that kills this worker too is counted alone. The cost is paid only after a start,
        only while the source hands back messages delivered before, and for at most as many as
        one worker holds (``capacity``: what a dead worker like this one can have left counted),
        so a backlog of ordinary retries is not worked one by one.
        """
        self._alone += len(messages)
        if all(m.attempt <= 1 for m in messages) or self._alone >= self.host.capacity:
            self.careful = False
            logger.debug("leasing in batches again after %d leased alone", self._alone)

    async def _gather_slots(self, free: int, want: int) -> int:
        """Wait a moment for more slots to free up, so one poll fetches a batch, not one message
        (``prefetch=0`` only: with a buffer there is no hurry).

        Fast handlers free several slots within ``GATHER_S``; slow ones cost at most that delay.
        Measured on the local backend, sync handlers at concurrency 8 otherwise lease one message
        per poll a third of the time.
        """
        host, inflight = self.host, self.host.inflight
        deadline = time.monotonic() + GATHER_S
        while free < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await inflight.changed(remaining)
            free = inflight.free(host.capacity)
        return max(free, inflight.free(host.capacity))

    async def _idle(self, seconds: float) -> None:
        """Wait ``seconds`` unless the collector stops being awake meanwhile."""
        deadline = time.monotonic() + seconds
        while self.host.state == "awake":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await self.host.inflight.changed(remaining)


class PushIntake(Intake):
    """The broker delivers; the engine sets its limit (prefetch, RDY, flow control) to the
    running slots and pauses it for sleep and shutdown.

    The engine's ``prefetch`` is not added here: a push broker buffers on its side already (its
    own prefetch option, e.g. AMQP's ``prefetch``), and a larger broker limit would let a
    broker-counted copy (AMQP classic's recount) reach the handler before the original's ack is
    on the wire, so a worker that dies on it would see it again at the same attempt.
    """

    def __init__(self, host: Host, adapter: PushAdapter) -> None:
        super().__init__(host)
        self.adapter = adapter
        self._started = False
        self._begun = False
        self._watching = False
        #: The broker's limit stays 1 while what it delivers was delivered before (the poll
        #: intake's ``careful``, for the same reason: see ``PollIntake._lease_alone``).
        self.careful = True
        self._alone = 0
        self._start_lock = asyncio.Lock()
        adapter.watch_delivery(self._delivery_problem)

    async def start(self, awake: bool) -> None:
        self._begun = True
        if awake:  # else the first wake() starts delivery: asleep takes nothing
            await self._start_delivery()
        if self._until_empty:
            self._watch()

    async def _start_delivery(self) -> None:
        async with self._start_lock:  # a retried start and a wake must not start twice
            if not self._started:
                limit = 1 if self.careful else self.host.running_slots
                await self.adapter.start(self._deliver, limit)
                self._started = True  # only now: a failed start is retried as a start

    def _delivery_problem(self, problem: str | None) -> None:
        """The adapter's word on delivery (a consumer the broker lost): /healthz follows it."""
        host = self.host
        if problem is not None:
            if host.state == "awake":
                host.set_health(False, f"delivery: {problem}")
        elif not host.healthy and host.health_reason.startswith("delivery:"):
            host.set_health(True, "ok")

    async def _until_done(self, what: str, step: Callable[[], Awaitable[None]],
                          wanted: Callable[[], bool]) -> None:  # fmt: skip
        """Run ``step`` until it succeeds, with backoff, while ``wanted()``: a start, resume or
        scale that a broker blip broke is retried, never dropped with its task."""
        host = self.host
        backoff = Backoff(RETRY_FIRST_S, max(host.options.max_polling_period_s, RETRY_FIRST_S))
        while wanted():
            try:
                await step()
            except Exception as exc:
                host.stats.broker_errors += 1
                wait = backoff.next()
                self._delivery_problem(f"{what} failed: {exc or type(exc).__name__}")
                logger.warning("%s on %s failed (%s); retrying in %.1fs",
                               what, self.adapter.describe(), exc, wait)  # fmt: skip
                await asyncio.sleep(wait)
                continue
            if host.health_reason.startswith(f"delivery: {what} failed"):
                self._delivery_problem(None)
            return

    async def _wake_step(self) -> None:
        if self._started:
            await self.adapter.resume()
        else:
            await self._start_delivery()

    def _deliver(self, message: Message) -> None:
        host = self.host
        if self.careful:
            self._alone += 1
            fresh = message.attempt <= 1 and not message.redelivered
            if fresh or self._alone >= host.capacity:
                self.careful = False
                logger.debug("delivery limit back to %d after %d alone", host.running_slots,
                             self._alone)  # fmt: skip
                host.tasks.spawn(self._raise_limit_then_accept(message), "stalk-careful-end")
                return
        if host.state in ("draining", "stopped"):
            host.tasks.spawn(host.release(message), "stalk-release")
            return
        host.accept((message,))

    async def _raise_limit_then_accept(self, message: Message) -> None:
        """Raise the broker's limit from 1 while ``message``, unsettled, fills it; then run it.

        Raising it may re-consume (AMQP applies a new prefetch to new consumers only). Were the
        message handled and acked first, the broker could be sending the next one to the
        consumer being cancelled, and a quorum queue returns such a delivery counted: a healthy
        message one step nearer ``poison`` on every start (measured: 1 start in 15 with
        ``--max-retries 0``). Held unsettled, it keeps that consumer full, so nothing is on
        its way to it.
        """
        host = self.host
        # Held meanwhile: heartbeated, counted by drained() and waited for by a shutdown.
        host.inflight.hold((message,), time.monotonic())
        await self._until_done(
            "scale",
            lambda: self.adapter.set_max_in_flight(host.running_slots),
            lambda: host.state in ("awake", "asleep"),
        )
        if host.state in ("draining", "stopped"):
            await host.release(message)
            return
        host.accept((message,))

    def wake(self) -> None:
        self.host.tasks.spawn(
            self._until_done("resume", self._wake_step, lambda: self.host.state == "awake"),
            "stalk-resume",
        )

    def sleep(self) -> None:
        self.host.tasks.spawn(self.adapter.pause(), "stalk-pause")

    def scale(self, concurrency: int) -> None:
        if self.careful:  # the limit rises once the first fresh message arrives
            return
        self.host.tasks.spawn(
            self._until_done(
                "scale",
                lambda: self.adapter.set_max_in_flight(self.host.running_slots),
                lambda: self.host.state in ("awake", "asleep"),
            ),
            "stalk-scale",
        )

    async def stop(self, grace_s: float) -> None:
        try:
            await self.adapter.pause()
        except Exception as exc:
            logger.warning("pause on shutdown failed: %s", exc)

    def stop_when_drained(self) -> None:
        super().stop_when_drained()
        if self._begun:  # else start() begins the watch
            self._watch()

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self.host.tasks.spawn(self._watch_idle(), "stalk-until-empty")

    async def _watch_idle(self) -> None:
        """A push source has no empty poll: drained means nothing held and the broker agrees.

        Where the broker counts (``features.backlog``), two drained checks a tick apart with
        nothing delivered in between are enough (a message on its way to us arrives within
        the tick), so an empty queue ends a run in a fraction of a second. Where it cannot,
        the source must also have been quiet for ``max_polling_period_s``.
        """
        host = self.host
        quiet_s = max(host.options.max_polling_period_s, 0.5)
        counts = self.adapter.features.backlog
        tick = DRAINED_TICK_S if counts else quiet_s / 4
        confirmed = False
        while host.state not in ("draining", "stopped"):
            await asyncio.sleep(tick)
            if host.state != "awake":
                confirmed = False
                continue
            idle = time.monotonic() - self.last_intake >= (tick if counts else quiet_s)
            drained = idle and await host.drained()
            if drained and (confirmed or not counts):
                host.stop_drained()
                return
            confirmed = drained


def intake_for(host: Host, adapter: Adapter) -> Intake:
    """Return the intake ``adapter``'s delivery style needs.

    Raises:
        TypeError: an adapter that is neither a PollingAdapter nor a PushAdapter.
    """
    if isinstance(adapter, PollingAdapter):
        return PollIntake(host, adapter)
    if isinstance(adapter, PushAdapter):
        return PushIntake(host, adapter)
    raise TypeError(f"{type(adapter).__name__} is neither a PollingAdapter nor a PushAdapter")
