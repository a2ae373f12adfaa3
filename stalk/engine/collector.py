"""The engine: all policy between a broker adapter and the user's handler.

States: ``asleep`` ⇄ ``awake`` → ``draining`` → ``stopped``. A collector built in a library starts
asleep (as the Go Stalk's does); ``wake()`` starts intake. ``run()`` and the CLI wake it at once.
Every public control (``wake``, ``sleep``, ``scale``, ``stop``) is idempotent and may be called
from any thread.

The collector owns states and controls; its neighbours own the rest: :mod:`.intake` (poll or
push), :mod:`.inflight` (what is held), :mod:`.execution` (handlers), :mod:`.policy` (pure
decisions), :mod:`.settle` (broker calls for outcomes), :mod:`stalk.tasks` (background tasks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal

from stalk.collectors.base import AckAndLease, Adapter
from stalk.engine.execution import AsyncExecutor, Executor, ThreadExecutor
from stalk.engine.handler import prepare, resolve_exceptions
from stalk.engine.inflight import InFlight
from stalk.engine.intake import Intake, PollIntake, intake_for
from stalk.engine.policy import Reject, RetryPolicy, admit_all
from stalk.engine.settle import Observer, Settler
from stalk.engine.stats import CollectorStats
from stalk.errors import ConfigError
from stalk.message import Message
from stalk.options import MAX_CONCURRENCY, CollectorOptions
from stalk.tasks import TaskSet

logger = logging.getLogger("stalk.collector")

State = Literal["asleep", "awake", "draining", "stopped"]

#: Longest pause of the housekeeping tick (heartbeats and the thread watchdog).
MAX_TICK_S = 1.0


class BaseCollector:
    """Run ``handler`` over every message of ``adapter``'s source.

    Args:
        adapter: a :class:`PollingAdapter` or :class:`PushAdapter`.
        handler: ``(body) -> Result | None`` or ``(body, message) -> Result | None``, sync or async.
        options: engine options; ``source``/``error_topic`` there override the adapter's.
    """

    def __init__(
        self,
        adapter: Adapter,
        handler: Callable[..., Any],
        options: CollectorOptions | None = None,
    ) -> None:
        self.adapter = adapter
        self.options = options or CollectorOptions()
        self.handler = prepare(handler)
        self.stats = CollectorStats()
        self._fatal_types = resolve_exceptions(self.options.fatal_exceptions)
        opts = self.options
        self._policy = RetryPolicy(
            opts.max_retries,
            opts.retry_interval_s,
            opts.max_retry_delay_s,
            opts.unflagged_error,
            opts.max_message_bytes,
            opts.message_ttl_s,
            opts.max_named_delay_s,
        )
        self.state: State = "asleep"
        self.concurrency = opts.concurrency
        self.healthy = False
        self.health_reason = "not started"
        self.stop_now = False
        self._want_awake = False
        self._until_empty = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: Executor | None = None
        self.tasks = TaskSet(logger, "collector")
        #: Releases of deliveries that arrived while draining (not in the in-flight ledger):
        #: shutdown waits for them before it cancels tasks, as a release may be a broker round
        #: trip (AMQP's confirmed copy) and one cut short is a redelivery that spends an attempt.
        self._releasing: set[asyncio.Task[Any]] = set()
        self.inflight = InFlight()
        self._settler = Settler(self.adapter, self.stats, self._policy, self.tasks, self.inflight)
        self._intake: Intake = intake_for(self, adapter)
        if isinstance(self._intake, PollIntake):
            self._settler.rider = self._intake
            if isinstance(adapter, AckAndLease):
                self._intake.acks_under_way = self._settler.acks_under_way
        self._give_up = asyncio.Event()

    # ----------------------------------------------------------------- public controls
    @property
    def on_outcome(self) -> Observer | None:
        """Optional observer of each outcome, called on the loop as ``(message, action,
        handler_seconds)`` once the policy decided and before settling (outcome logs,
        autoscaling, recycling); messages routed before their handler ran report 0 seconds."""
        return self._settler.on_outcome

    @on_outcome.setter
    def on_outcome(self, observer: Observer | None) -> None:
        self._settler.on_outcome = observer

    @property
    def in_flight(self) -> int:
        """Messages received and not yet settled."""
        return len(self.inflight)

    @property
    def prefetched(self) -> int:
        """Messages held in the local buffer that no handler has started yet."""
        return self._executor.unstarted if self._executor is not None else 0

    @property
    def lease_size(self) -> int:
        """Most messages one lease asks for: ``batch_size``, else the backend's largest."""
        return self.options.batch_size or self.adapter.features.max_batch

    @property
    def prefetch(self) -> int:
        """Messages held beyond the running slots: the ``prefetch`` option, else ``max(2 *
        running slots, lease size)``."""
        if self.options.prefetch is not None:
            return self.options.prefetch
        return max(2 * self.running_slots, self.lease_size)

    @property
    def capacity(self) -> int:
        """Most messages held at once: running slots (a batch handler's batch each) + prefetch."""
        return self.running_slots + self.prefetch

    @property
    def running_slots(self) -> int:
        spec = self.handler.batch
        return self.concurrency * (spec.max_size if spec is not None else 1)

    @property
    def intake_alive(self) -> bool:
        """False if intake ended while it should run (a bug; the log has it): /healthz."""
        return self._intake.alive

    def wake(self) -> None:
        """Start (or resume) taking messages. Idempotent; safe from any thread."""
        self._want_awake = True
        self._call(self._apply_wake)

    def sleep(self) -> None:
        """Stop taking messages; in-flight ones finish and settle. Idempotent; any thread."""
        self._want_awake = False
        self._call(self._apply_sleep)

    def scale(self, concurrency: int) -> None:
        """Change how many handlers run at once, live. Any thread.

        Raises:
            ConfigError: ``concurrency`` below 1 or over ``MAX_CONCURRENCY``.
        """
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ConfigError(
                f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency} "
                "(run more processes for more)"
            )
        self.concurrency = concurrency
        self._call(self._apply_scale)

    def stop(self, grace_s: float | None = None) -> Stopping:
        """Drain and stop: no new intake, in-flight finish within ``grace_s``, the rest released.

        Returns a handle you may ``await`` (on the loop) or ``.result(timeout)`` (another thread);
        ignoring it is fine too.
        """
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        loop = self._loop
        if loop is None or loop.is_closed():
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            self.state = "stopped"
            return Stopping(done)
        if _on_loop(loop):
            return Stopping(asyncio.ensure_future(self._shutdown(grace)))
        return Stopping(asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop))

    def run(self, *, until_empty: bool = False) -> None:
        """Run until stopped (SIGINT/SIGTERM or ``stop()``); blocking, for scripts."""
        asyncio.run(self.serve(until_empty=until_empty, install_signals=True))

    async def serve(self, *, until_empty: bool = False, install_signals: bool = False) -> None:
        """Start, wake and run until stopped; ``until_empty`` stops once the source is drained."""
        self._until_empty = until_empty
        already_started = self._loop is not None
        await self.start()
        if already_started and until_empty:
            self._intake.stop_when_drained()
        if install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        self.wake()
        await self.wait_stopped()

    async def start(self) -> None:
        """Open the adapter and start the workers; intake begins on ``wake()``.

        Raises:
            ConfigError, BackendError: from the adapter, before anything was consumed.
        """
        if self._loop is not None:
            return
        self._stopped = asyncio.Event()
        if self.state == "stopped":  # stop() came before start(): nothing to run
            self._stopped.set()
            return
        opts = self.options
        self.adapter.bind(opts.source, opts.error_topic, opts.visibility_timeout_s)
        await self.adapter.open()
        if self._draining():  # stop() arrived while the broker connection opened
            await self.adapter.close()
            self._stopped.set()
            return
        self._loop = asyncio.get_running_loop()
        self.set_health(True, "ok")
        executor_cls = AsyncExecutor if self.handler.is_async else ThreadExecutor
        lease_s = opts.visibility_timeout_s
        fence = self.inflight.fence(lease_s) if self.adapter.features.visibility_timeout else None
        self._executor = executor_cls(
            self.handler,
            self._settler.on_done,
            self.concurrency,
            opts.handler_timeout_s,
            self._fatal_types,
            fence,
            self._lapsed,
            self._settler.on_done_all,
        )
        self._executor.start()
        self.tasks.spawn(self._housekeeping(), "stalk-housekeeping")
        if self._until_empty:
            self._intake.stop_when_drained()
        await self._intake.start(awake=self._want_awake)
        if self._want_awake:
            self._apply_wake()
        logger.info(
            "collector ready on %s (concurrency %d, %s handler %s)",
            self.adapter.describe(),
            self.concurrency,
            "async" if self.handler.is_async else "sync",
            self.handler.name,
        )

    async def wait_stopped(self) -> None:
        """Return once the collector has stopped."""
        await self._stopped.wait()

    async def __aenter__(self) -> BaseCollector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- what intake calls (Host)
    def accept(self, messages: Sequence[Message]) -> None:
        """Take delivered messages in: each is admitted to the handler or routed by the policy."""
        executor = self._executor
        assert executor is not None
        self._intake.note_arrival(len(messages))
        self.inflight.hold(messages, time.monotonic())
        admitted, others = admit_all(messages, time.time(), self._policy)
        for message, verdict in others:
            if isinstance(verdict, Reject):
                self._settler.reject(message, verdict)
            else:
                self._settler.recount(message)
        executor.submit(admitted)

    async def release(self, message: Message) -> None:
        """Give ``message`` back unprocessed."""
        task = asyncio.current_task()
        if task is not None:
            self._releasing.add(task)
        try:
            await self._settler.release(message)
        finally:
            self._releasing.discard(task)

    def _lapsed(self, message: Message) -> None:
        """A prefetched message's lease lapsed before a handler took it: another worker may hold
        it now, so it is neither handled nor settled here (fencing), only forgotten."""
        logger.warning(
            "message %s waited in the prefetch buffer past its lease; not handled here (the "
            "broker redelivers it). Raise visibility_timeout_s or lower prefetch",
            message.id,
            extra={"message_id": message.id},
        )
        self.stats.released += 1
        self.inflight.settled(message)

    async def _release_prefetched(self) -> None:
        """Give back the buffered messages no handler started (sleep): others may take them."""
        if self._executor is not None:
            for message in self._executor.take_unstarted():
                await self._settler.release(message)

    def set_health(self, healthy: bool, reason: str) -> None:
        """Record what /healthz reports."""
        self.healthy, self.health_reason = healthy, reason

    def stop_drained(self) -> None:
        """The source is drained and ``--until-empty`` asked to stop then."""
        self.tasks.spawn(self._shutdown(self.options.shutdown_grace_s), "stalk-stop")

    async def drained(self) -> bool:
        """True when nothing is in flight, no retry of ours is pending, and the broker agrees."""
        if self.inflight or time.monotonic() < self._settler.retry_due_at:
            return False
        if not self.adapter.features.backlog:
            return True
        try:
            backlog = await self.adapter.backlog()
        except Exception:
            return False
        if backlog is None:
            return True
        return not (backlog.ready or backlog.delayed or backlog.in_flight)

    # ----------------------------------------------------------------- state changes (loop)
    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # applied by start()
        if _on_loop(loop):
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _apply_wake(self) -> None:
        if self.state != "asleep":
            return
        self.state = "awake"
        self._intake.wake()
        logger.info("collector awake on %s", self.adapter.describe())

    def _apply_sleep(self) -> None:
        if self.state != "awake":
            return
        self.state = "asleep"
        self._intake.sleep()
        self.inflight.notify()
        self.tasks.spawn(self._release_prefetched(), "stalk-release-prefetched")
        logger.info("collector asleep on %s", self.adapter.describe())

    def _apply_scale(self) -> None:
        if self._executor is None or self.state in ("draining", "stopped"):
            return
        self._executor.resize(self.concurrency)
        self.inflight.notify()
        self._intake.scale(self.concurrency)
        logger.info("concurrency now %d on %s", self.concurrency, self.adapter.describe())

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        # gunicorn's convention: TTIN/TTOU one slot more/less; USR1 sleeps, USR2 wakes.
        controls: dict[str, Callable[[], None]] = {
            "SIGTTIN": lambda: self._step_scale(+1),
            "SIGTTOU": lambda: self._step_scale(-1),
            "SIGUSR1": self.sleep,
            "SIGUSR2": self.wake,
        }
        for name, control in controls.items():
            number = getattr(signal, name, None)  # absent on Windows
            if number is not None:
                loop.add_signal_handler(number, control)

    def _step_scale(self, delta: int) -> None:
        """SIGTTIN/SIGTTOU: one slot more or less, never past the bounds (a signal handler has
        nobody to raise to)."""
        wanted = self.concurrency + delta
        if self.state in ("draining", "stopped") or not 1 <= wanted <= MAX_CONCURRENCY:
            return
        self.scale(wanted)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self.state == "draining":
            logger.warning("second %s: stopping now, releasing in-flight messages", sig.name)
            self.stop(0)
            return
        logger.info("%s: draining (send again to stop at once)", sig.name)
        self.stop()

    # ----------------------------------------------------------------- heartbeat, watchdog
    async def _housekeeping(self) -> None:
        opts = self.options
        tick = min(MAX_TICK_S, opts.visibility_timeout_s / 4)
        if opts.handler_timeout_s is not None:
            tick = min(tick, max(0.05, opts.handler_timeout_s / 4))
        half = opts.visibility_timeout_s / 2
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._executor is not None:
                self._executor.expire(now)
                self._check_stuck(self._executor.stuck)
            failed: list[str] = []
            last_error: Exception | None = None
            for message in self.inflight.due_for_extension(now, half):
                if message not in self.inflight:
                    continue
                try:
                    await self.adapter.extend(message, opts.visibility_timeout_s)
                except Exception as exc:  # retried next tick; the fence stops a lapsed one
                    failed.append(message.id)
                    last_error = exc
                else:
                    self.inflight.extended(message, now)
            if failed:
                logger.warning(
                    "heartbeat for %d message(s) failed (%s), e.g. %s; retrying",
                    len(failed),
                    last_error,
                    ", ".join(failed[:3]),
                )

    def _check_stuck(self, stuck: str | None) -> None:
        """Too many handler threads hung past the timeout: unhealthy, and no more intake (the
        buffer is released) until they return; a supervisor or liveness probe restarts us."""
        was_stuck = self.health_reason.startswith("stuck:")
        if stuck is not None and not was_stuck:
            logger.error("%s; taking no more messages", stuck)
            self.set_health(False, f"stuck: {stuck}")
            self._apply_sleep()
        elif stuck is None and was_stuck:
            logger.info("stuck handler threads returned; taking messages again")
            self.set_health(True, "ok")
            if self._want_awake:
                self._apply_wake()

    # ----------------------------------------------------------------- shutdown
    def _draining(self) -> bool:
        return self.state in ("draining", "stopped")

    async def _shutdown(self, grace_s: float) -> None:
        if self.state == "stopped":
            return
        if self.state == "draining":
            self.stop_now = True
            self._give_up.set()  # wake the grace wait below, or a second signal waits it out
            self.inflight.notify()
            await self._stopped.wait()
            return
        self.stop_now = False
        self.state = "draining"
        self.inflight.notify()
        executor = self._executor
        assert executor is not None
        await self._intake.stop(grace_s)
        for message in executor.take_unstarted():
            await self._settler.release(message)
        await self.inflight.emptied(time.monotonic() + grace_s, self._give_up)
        for message in list(executor.running):
            if executor.abandon(message):
                logger.warning("handler still running for %s at shutdown; releasing it", message.id)
                await self._settler.release(message)
        for message in executor.take_unstarted():
            await self._settler.release(message)
        await self._settle_pending(grace_s=max(1.0, grace_s))
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=max(1.0, grace_s))
        await executor.shutdown()
        self.tasks.cancel()
        try:
            await self.adapter.close()
        except Exception as exc:
            logger.warning("closing %s failed: %s", self.adapter.describe(), exc)
        self.state = "stopped"
        self.set_health(False, "stopped")
        self._stopped.set()
        logger.info("collector stopped on %s: %s", self.adapter.describe(), self.stats.outcomes())

    async def _settle_pending(self, grace_s: float) -> None:
        """Let acks and routes already under way finish; release whatever still has no outcome."""
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for message in self.inflight:
            await self._settler.release(message)


class Stopping:
    """The handle ``stop()`` returns: awaitable on the loop, ``result()`` from other threads."""

    def __init__(self, future: asyncio.Future[None] | concurrent.futures.Future[None]) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, None, None]:
        future = self.future
        if isinstance(future, concurrent.futures.Future):
            return asyncio.wrap_future(future).__await__()
        return future.__await__()

    def done(self) -> bool:
        """True once the collector has stopped."""
        return self.future.done()

    def result(self, timeout: float | None = None) -> None:
        """Block until stopped (from a thread other than the collector's loop)."""
        if isinstance(self.future, concurrent.futures.Future):
            self.future.result(timeout)
        else:
            self.future.result()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
