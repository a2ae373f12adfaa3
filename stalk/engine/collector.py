"""The engine: all policy between a broker adapter and the user's handler.

States: ``asleep`` ⇄ ``awake`` → ``draining`` → ``stopped``. A collector built in a library starts
asleep (as the Go Stalk's does); ``wake()`` starts intake. ``run()`` and the CLI wake it at once.
Every public control (``wake``, ``sleep``, ``scale``, ``stop``) is idempotent and may be called
from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Literal

from stalk.backoff import PollBackoff
from stalk.collectors.base import Adapter, PollingAdapter, PushAdapter
from stalk.engine.execution import AsyncExecutor, Executor, ThreadExecutor
from stalk.engine.handler import prepare, resolve_exceptions
from stalk.engine.policy import RetryPolicy
from stalk.engine.settle import Observer, Settler
from stalk.engine.stats import CollectorStats
from stalk.errors import ConfigError
from stalk.message import Message
from stalk.options import CollectorOptions

logger = logging.getLogger(__name__)

State = Literal["asleep", "awake", "draining", "stopped"]

#: Longest wait for more free slots before a poll (see ``_gather_slots``).
GATHER_S = 0.002

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
        self._policy = RetryPolicy(
            self.options.max_retries,
            self.options.retry_interval_s,
            self.options.max_retry_delay_s,
            self.options.unflagged_error,
        )
        self.state: State = "asleep"
        self.concurrency = self.options.concurrency
        self.healthy = False
        self.health_reason = "not started"
        self._want_awake = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: Executor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._settler = Settler(self.adapter, self.stats, self._policy, self._spawn, self._freed)
        #: message -> monotonic time of its receipt or last lease extension.
        self._inflight = self._settler.inflight
        self._until_empty = False
        self._last_intake = time.monotonic()
        self.stop_now = False
        self._poll_task: asyncio.Task[Any] | None = None
        self._push_started = False

    # ----------------------------------------------------------------- public controls
    @property
    def on_outcome(self) -> Observer | None:
        """Optional observer of each handled message, called on the loop as
        ``(message, action, handler_seconds)`` once the policy decided and before settling
        (outcome logs, autoscaling, recycling)."""
        return self._settler.on_outcome

    @on_outcome.setter
    def on_outcome(self, observer: Observer | None) -> None:
        self._settler.on_outcome = observer

    @property
    def in_flight(self) -> int:
        """Messages received and not yet settled."""
        return len(self._inflight)

    @property
    def intake_alive(self) -> bool:
        """False if the poll loop ended while it should run (a bug; the log has it): /healthz."""
        task = self._poll_task
        return task is None or self.state not in ("awake", "asleep") or not task.done()

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
            ConfigError: ``concurrency`` below 1.
        """
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
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
        if already_started and until_empty and isinstance(self.adapter, PushAdapter):
            self._spawn(self._watch_push_idle(), "stalk-until-empty")
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
        self._awake = asyncio.Event()
        self._slot_free = asyncio.Event()
        opts = self.options
        self.adapter.bind(
            opts.source, opts.error_topic, opts.visibility_timeout_s, opts.max_retries
        )
        await self.adapter.open()
        if self._draining():  # stop() arrived while the broker connection opened
            await self.adapter.close()
            self._stopped.set()
            return
        self._loop = asyncio.get_running_loop()
        self.healthy, self.health_reason = True, "ok"
        executor_cls = AsyncExecutor if self.handler.is_async else ThreadExecutor
        self._executor = executor_cls(
            self.handler,
            self._settler.on_done,
            self.concurrency,
            opts.handler_timeout_s,
            self._fatal_types,
        )
        self._executor.start()
        self._spawn(self._housekeeping(), "stalk-housekeeping")
        if isinstance(self.adapter, PushAdapter):
            if self._want_awake:  # else the first wake() starts delivery: asleep takes nothing
                await self._start_push()
            if self._until_empty:
                self._spawn(self._watch_push_idle(), "stalk-until-empty")
        else:
            self._poll_task = self._spawn(self._poll_loop(), "stalk-poll")
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
        self._awake.set()
        if isinstance(self.adapter, PushAdapter):
            resume = self.adapter.resume() if self._push_started else self._start_push()
            self._spawn(resume, "stalk-resume")
        logger.info("collector awake on %s", self.adapter.describe())

    async def _start_push(self) -> None:
        assert isinstance(self.adapter, PushAdapter)
        if not self._push_started:
            self._push_started = True
            await self.adapter.start(self._accept_one, self.concurrency)

    def _apply_sleep(self) -> None:
        if self.state != "awake":
            return
        self.state = "asleep"
        self._awake.clear()
        if isinstance(self.adapter, PushAdapter):
            self._spawn(self.adapter.pause(), "stalk-pause")
        logger.info("collector asleep on %s", self.adapter.describe())

    def _apply_scale(self) -> None:
        if self._executor is None or self.state in ("draining", "stopped"):
            return
        self._executor.resize(self.concurrency)
        self._slot_free.set()
        if isinstance(self.adapter, PushAdapter):
            self._spawn(self.adapter.set_max_in_flight(self.concurrency), "stalk-scale")
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
        if self.state in ("draining", "stopped") or self.concurrency + delta < 1:
            return
        self.scale(self.concurrency + delta)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self.state == "draining":
            logger.warning("second %s: stopping now, releasing in-flight messages", sig.name)
            self.stop(0)
            return
        logger.info("%s: draining (send again to stop at once)", sig.name)
        self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("internal task %s failed", task.get_name(), exc_info=task.exception())

    # ----------------------------------------------------------------- intake
    async def _poll_loop(self) -> None:
        adapter = self.adapter
        assert isinstance(adapter, PollingAdapter)
        opts = self.options
        backoff = PollBackoff(opts.polling_period_s, opts.max_polling_period_s)
        while True:
            await self._awake.wait()
            if self.state != "awake":
                return
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            if free < min(opts.batch_size, self.concurrency) // 2 and self._inflight:
                free = await self._gather_slots(free)
            started = time.monotonic()
            try:
                messages = await adapter.get_messages(min(free, opts.batch_size), backoff.current_s)
            except Exception as exc:  # broker down: back off, never crash-loop, never hang silently
                self.stats.broker_errors += 1
                self.healthy, self.health_reason = False, f"poll failed: {exc}"
                wait = backoff.next()
                logger.warning(
                    "poll of %s failed (%s); retrying in %.1fs", adapter.describe(), exc, wait
                )
                await self._idle(wait)
                continue
            if not self.healthy:
                logger.info("poll of %s works again", adapter.describe())
            self.healthy, self.health_reason = True, "ok"
            if messages:
                backoff.reset()
                if self._draining():
                    for message in messages:
                        await self._settler.release(message)
                    return
                self._accept(messages)
                continue
            if self._until_empty and await self._drained():
                self._spawn(self._shutdown(opts.shutdown_grace_s), "stalk-stop")
                return
            await self._idle(backoff.next() - (time.monotonic() - started))

    async def _gather_slots(self, free: int) -> int:
        """Wait a moment for more slots to free up, so one poll fetches a batch, not one message.

        Fast handlers free several slots within ``GATHER_S``; slow ones cost at most that delay.
        Measured on the local backend, sync handlers at concurrency 8 otherwise lease one message
        per poll a third of the time.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GATHER_S):
                while free < min(self.options.batch_size, self.concurrency) // 2:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    free = self.concurrency - len(self._inflight)
        return max(free, self.concurrency - len(self._inflight))

    async def _idle(self, seconds: float) -> None:
        if seconds > 0 and self.state == "awake":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped_or_sleep(), seconds)

    async def _stopped_or_sleep(self) -> None:
        while self.state == "awake":
            self._slot_free.clear()
            await self._slot_free.wait()

    async def _drained(self) -> bool:
        """True when nothing is in flight, no retry of ours is pending, and the broker agrees."""
        if self._inflight or time.monotonic() < self._settler.retry_due_at:
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

    async def _watch_push_idle(self) -> None:
        quiet_s = max(self.options.max_polling_period_s, 0.5)
        while self.state not in ("draining", "stopped"):
            await asyncio.sleep(quiet_s / 4)
            idle = time.monotonic() - self._last_intake >= quiet_s
            if self.state == "awake" and idle and await self._drained():
                await self._shutdown(self.options.shutdown_grace_s)
                return

    def _accept_one(self, message: Message) -> None:
        if self.state in ("draining", "stopped"):
            self._spawn(self._settler.release(message), "stalk-release")
            return
        self._accept((message,))

    def _accept(self, messages: Sequence[Message]) -> None:
        assert self._executor is not None
        now = time.monotonic()
        self._last_intake = now
        limit = self.options.max_message_bytes
        ttl_s = self.options.message_ttl_s
        self.stats.received += len(messages)
        for message in messages:
            self._inflight[message] = now
            if len(message.body) > limit:
                self._settler.reject(
                    message,
                    "too_large",
                    f"body of {len(message.body)} bytes is over max_message_bytes={limit}",
                )
            elif ttl_s is not None and _expired(message, ttl_s):
                self._settler.reject(message, "expired", f"older than message_ttl_s={ttl_s}")
            else:
                self._executor.submit(message)

    def _freed(self) -> None:
        self._slot_free.set()

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
            for message, extended_at in list(self._inflight.items()):
                if now - extended_at < half or message not in self._inflight:
                    continue
                self._inflight[message] = now
                try:
                    await self.adapter.extend(message, opts.visibility_timeout_s)
                except Exception as exc:
                    logger.warning("heartbeat for %s failed (%s)", message.id, exc)

    # ----------------------------------------------------------------- shutdown
    def _draining(self) -> bool:
        return self.state in ("draining", "stopped")

    async def _shutdown(self, grace_s: float) -> None:
        if self.state == "stopped":
            return
        if self.state == "draining":
            self.stop_now = True
            self._slot_free.set()  # wake the grace wait below, or a second signal waits it out
            await self._stopped.wait()
            return
        self.stop_now = False
        self.state = "draining"
        self._awake.set()
        self._slot_free.set()
        assert self._executor is not None
        if isinstance(self.adapter, PushAdapter):
            try:
                await self.adapter.pause()
            except Exception as exc:
                logger.warning("pause on shutdown failed: %s", exc)
        await self._wait_poll_done(grace_s)
        for message in self._executor.take_unstarted():
            await self._settler.release(message)
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline and not self.stop_now:
            self._slot_free.clear()
            try:
                await asyncio.wait_for(self._slot_free.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        for message in list(self._executor.running):
            if self._executor.abandon(message):
                logger.warning("handler still running for %s at shutdown; releasing it", message.id)
                await self._settler.release(message)
        for message in self._executor.take_unstarted():
            await self._settler.release(message)
        await self._settle_pending(grace_s=max(1.0, grace_s))
        await self._executor.shutdown()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await self.adapter.close()
        except Exception as exc:
            logger.warning("closing %s failed: %s", self.adapter.describe(), exc)
        self.state = "stopped"
        self.healthy, self.health_reason = False, "stopped"
        self._stopped.set()
        logger.info("collector stopped on %s: %s", self.adapter.describe(), self.stats.as_dict())

    async def _wait_poll_done(self, grace_s: float) -> None:
        """Let a poll under way return, so what it leased is released now, not after its lease."""
        task = self._poll_task
        if task is None or task.done() or task is asyncio.current_task():
            return
        limit = grace_s + self.options.max_polling_period_s
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            logger.warning("poll still blocked after %.1fs at shutdown; cancelling it", limit)

    async def _settle_pending(self, grace_s: float) -> None:
        """Let acks and routes already under way finish; release whatever still has no outcome."""
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for message in list(self._inflight):
            await self._settler.release(message)


def _expired(message: Message, ttl_s: float) -> bool:
    return message.enqueued_at is not None and time.time() - message.enqueued_at > ttl_s


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
