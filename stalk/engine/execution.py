"""Where handlers run: long-lived asyncio tasks or long-lived threads, fed from a local buffer.

Measured on these machines, one task plus one thread-pool hop per message caps an engine near
25k msg/s. So both executors keep ``concurrency`` workers alive and let them take the next
message from a queue themselves: with a prefetched buffer a worker rarely waits, so a message
costs no cross-thread wake-up on the way in. Threads report finished messages through a deque
and wake the loop at most once per burst.

A worker takes one message, or for a batch handler up to ``max_size`` messages (waiting at most
``max_wait_s`` for the batch to fill), and checks each against the fence before it runs: a
buffered message whose lease lapsed (another worker may hold it now) is never handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stalk.engine.handler import PreparedHandler, from_exception, to_result
from stalk.errors import HandlerTimeout
from stalk.message import Message
from stalk.result import OK, Result

#: Called on the loop for each message the handler finished: (message, result, seconds).
OnDone = Callable[[Message, Result, float], None]
#: :data:`OnDone` for a burst of finished messages at once (a thread executor's wake-up).
OnDoneAll = Callable[[list[tuple[Message, Result, float]]], None]
#: Called on the loop for a buffered message whose lease lapsed before a worker took it.
OnLapsed = Callable[[Message], None]
#: True while a held message's lease still holds (the engine's in-flight ledger knows).
Fence = Callable[[Message], bool]

#: Threads whose handler overran ``handler_timeout_s`` and never returned, beyond which no
#: replacement is started (the executor reports itself stuck instead): bounded, never a leak.
STUCK_THREADS_PER_SLOT = 2
MIN_STUCK_THREADS = 8

#: Buffered messages an async worker takes in a row before it lets the loop run once: a handler
#: that never awaits must not starve acks, heartbeats and intake for a whole prefetch buffer.
YIELD_EVERY = 64


def timeout_result(handler: PreparedHandler, timeout_s: float) -> Result:
    """Return the retry a handler over its time limit gets."""
    return Result(
        error=HandlerTimeout(f"handler {handler.name} ran over handler_timeout_s={timeout_s}"),
        retry=True,
    )


def batch_results(value: object, batch: Sequence[Message], handler_name: str) -> list[Result]:
    """Turn a batch handler's return value into one Result per message.

    ``None`` is ok for all; a list (or tuple) gives each message its own outcome, in order; a
    mapping by message id gives outcomes to the messages it names and ok to the rest (as AWS
    Lambda's partial batch response reports only the failures). Anything else, or a list of the
    wrong length, is a fatal ``TypeError`` for the whole batch.
    """
    if value is None:
        return [OK] * len(batch)
    if isinstance(value, Mapping):
        return [to_result(value[m.id], handler_name) if m.id in value else OK for m in batch]
    if isinstance(value, list | tuple) and len(value) == len(batch):
        return [to_result(v, handler_name) for v in value]
    what = (
        f"{type(value).__name__} of {len(value)}"
        if isinstance(value, list | tuple)
        else (type(value).__name__)
    )
    error = TypeError(
        f"batch handler {handler_name} returned {what} for {len(batch)} messages; expected "
        "None, a list of one Result per message, or a mapping of message id to Result"
    )
    return [Result(error=error, fatal=True)] * len(batch)


class Executor:
    """Runs handlers on ``size`` workers; subclasses differ in where the workers live."""

    def __init__(
        self,
        handler: PreparedHandler,
        on_done: OnDone,
        size: int,
        timeout_s: float | None,
        fatal_types: tuple[type[BaseException], ...],
        fence: Fence | None = None,
        on_lapsed: OnLapsed | None = None,
        on_done_all: OnDoneAll | None = None,
    ) -> None:
        self.handler = handler
        self.on_done = on_done
        self.on_done_all = on_done_all
        self.size = size
        self.timeout_s = timeout_s
        self.fatal_types = fatal_types
        self.fence = fence
        self.on_lapsed = on_lapsed
        #: message -> monotonic start time, for messages whose handler is running now.
        self.running: dict[Message, float] = {}
        #: Why this executor cannot take more work (stuck threads), or ``None``.
        self.stuck: str | None = None
        #: Workers asked to exit by a scale-down. Checked before each take, so a shrink acts at
        #: once even with a full prefetch buffer ahead of the wake-up sentinels.
        self._retire = 0
        self._closing = False

    def _should_exit(self) -> bool:
        """Whether a worker about to take work, or woken by a sentinel, should exit now (a
        sentinel whose retirement another worker already took is ignored)."""
        if self._closing:
            return True
        if self._retire > 0:
            self._retire -= 1
            return True
        return False

    def start(self) -> None:
        """Start ``size`` workers."""
        raise NotImplementedError

    def submit(self, messages: Sequence[Message]) -> None:
        """Queue messages for the next free workers, in order."""
        raise NotImplementedError

    @property
    def unstarted(self) -> int:
        """Messages queued (prefetched) that no worker has taken yet."""
        raise NotImplementedError

    def resize(self, size: int) -> None:
        """Grow or shrink the worker count; shrinking takes effect as workers go idle."""
        raise NotImplementedError

    def take_unstarted(self) -> list[Message]:
        """Remove and return the queued messages no worker has started."""
        raise NotImplementedError

    def expire(self, now: float) -> None:
        """Give up on handlers running past the timeout (threads only; tasks time themselves)."""

    def abandon(self, message: Message) -> bool:
        """Stop waiting for a running message's handler; its late result is discarded."""
        return self.running.pop(message, None) is not None

    async def shutdown(self) -> None:
        """Stop the workers; running handlers were already settled or released."""
        raise NotImplementedError

    def _call(self, batch: list[Message]) -> Any:
        """Call the handler on ``batch`` (one message unless it is a batch handler)."""
        handler = self.handler
        if handler.batch is not None:
            return handler.func(batch)
        message = batch[0]
        return (
            handler.func(message.body, message)
            if handler.wants_message
            else handler.func(message.body)
        )

    def _results(self, value: object, batch: list[Message]) -> list[Result]:
        if self.handler.batch is not None:
            return batch_results(value, batch, self.handler.name)
        return [to_result(value, self.handler.name)]

    def _admitted(self, message: Message) -> bool:
        """Check the fence; a lapsed message is reported and skipped (never handled)."""
        fence = self.fence
        return fence is None or fence(message)


class AsyncExecutor(Executor):
    """Async handlers as ``size`` long-lived tasks on the engine's loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._alive = 0
        #: message -> the worker task running it, so the watchdog can cancel an overrun.
        self._working: dict[Message, asyncio.Task[None]] = {}
        self._expired: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.resize(self.size)

    def submit(self, messages: Sequence[Message]) -> None:
        put = self._queue.put_nowait
        for message in messages:
            put(message)

    @property
    def unstarted(self) -> int:
        return self._queue.qsize()

    def resize(self, size: int) -> None:
        diff, self.size = size - self._alive, size
        for _ in range(diff):
            self._alive += 1
            task = asyncio.get_running_loop().create_task(self._work(), name="stalk-worker")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for _ in range(-diff):
            self._alive -= 1
            self._retire += 1
            self._queue.put_nowait(None)  # wakes a waiting worker to see the retirement

    def take_unstarted(self) -> list[Message]:
        taken: list[Message] = []
        kept = 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                kept += 1
            else:
                taken.append(item)
        for _ in range(kept):
            self._queue.put_nowait(None)
        return taken

    async def _next(self) -> list[Message] | None:
        """Take the next unit of work: one admitted message, or a batch; None = exit."""
        queue_, spec = self._queue, self.handler.batch
        while True:
            if (self._retire or self._closing) and self._should_exit():
                return None
            message = await queue_.get()
            if message is None:
                if self._should_exit():
                    return None
                continue
            if self._admitted(message):
                break
            self._lapsed(message)
        batch = [message]
        if spec is None:
            return batch
        deadline = time.monotonic() + spec.max_wait_s
        while len(batch) < spec.max_size:
            if queue_.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await queue_.get()
                except TimeoutError:
                    break
            else:
                item = queue_.get_nowait()
            if item is None:
                queue_.put_nowait(None)  # this worker exits after the batch
                break
            if self._admitted(item):
                batch.append(item)
            else:
                self._lapsed(item)
        return batch

    def _lapsed(self, message: Message) -> None:
        if self.on_lapsed is not None:
            self.on_lapsed(message)

    async def _work(self) -> None:
        running, working, queue_ = self.running, self._working, self._queue
        handler, on_done, monotonic = self.handler, self.on_done, time.monotonic
        func, wants_message, single = handler.func, handler.wants_message, handler.batch is None
        task = asyncio.current_task()
        assert task is not None
        streak = 0
        while True:
            # The hot path: a buffered message is taken without a coroutine or a suspension;
            # every YIELD_EVERY such takes the loop gets a turn (acks, heartbeats, intake).
            message = None
            streak += 1
            if streak >= YIELD_EVERY:
                streak = 0
                await asyncio.sleep(0)
            if single and not (self._retire or self._closing) and not queue_.empty():
                message = queue_.get_nowait()
                if message is not None and not self._admitted(message):
                    self._lapsed(message)
                    continue
            if message is None:
                batch = await self._next()
                if batch is None:
                    return
            else:
                batch = [message]
            began = monotonic()
            for message in batch:
                running[message] = began
                working[message] = task
            try:
                if single:
                    message = batch[0]
                    call = func(message.body, message) if wants_message else func(message.body)
                    results = [to_result(await call, handler.name)]
                else:
                    results = batch_results(await func(batch), batch, handler.name)
            except asyncio.CancelledError as exc:
                if task in self._expired:
                    results = self._timed_out(task, len(batch))
                elif task.cancelling():
                    raise  # stalk's own cancellation (shutdown), not the handler's
                else:  # the handler's own CancelledError: a failure like any exception
                    results = [from_exception(exc, self.fatal_types)] * len(batch)
            except BaseException as exc:  # a handler's SystemExit must not kill the worker
                results = [from_exception(exc, self.fatal_types)] * len(batch)
            if task in self._expired:  # the handler swallowed the watchdog's cancel
                results = self._timed_out(task, len(batch))
            share = (monotonic() - began) / len(batch)
            for message, result in zip(batch, results, strict=True):
                del working[message]
                if running.pop(message, None) is not None:
                    on_done(message, result, share)

    def _timed_out(self, task: asyncio.Task[None], count: int) -> list[Result]:
        self._expired.discard(task)
        task.uncancel()
        assert self.timeout_s is not None
        return [timeout_result(self.handler, self.timeout_s)] * count

    def expire(self, now: float) -> None:
        """Cancel handlers over the timeout from the watchdog: no per-message timer to arm."""
        if self.timeout_s is None:
            return
        limit = now - self.timeout_s
        for message, started in list(self.running.items()):
            task = self._working.get(message)
            if started <= limit and task is not None and task not in self._expired:
                self._expired.add(task)
                task.cancel()

    async def shutdown(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ThreadExecutor(Executor):
    """Sync handlers on ``size`` long-lived daemon threads.

    A thread whose handler overruns the timeout cannot be killed; the watchdog settles its
    messages as retries and starts a replacement thread, and the late thread exits when its
    handler returns. Replacements are bounded: past ``max(2 * size, 8)`` stuck threads none is
    started and :attr:`stuck` says why, so /healthz fails and a supervisor or orchestrator
    restarts the process, instead of threads and memory growing without end.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._done: deque[tuple[Message, Result | None, float]] = deque()
        self._wake_pending = False
        self._threads = 0
        self._stuck_threads = 0
        #: Threads that should exist but were not started because too many are stuck.
        self._owed = 0
        #: message -> the unit of work (one handler call) it belongs to, while it runs; a
        #: handler of one message is not recorded (each message is its own unit).
        self._unit: dict[Message, object] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.resize(self.size)

    def submit(self, messages: Sequence[Message]) -> None:
        put = self._queue.put
        for message in messages:
            put(message)

    @property
    def unstarted(self) -> int:
        return self._queue.qsize()

    @property
    def stuck_limit(self) -> int:
        """Most stuck threads tolerated before replacements stop."""
        return max(STUCK_THREADS_PER_SLOT * self.size, MIN_STUCK_THREADS)

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
        threading.Thread(target=self._work, name="stalk-handler", daemon=True).start()

    def resize(self, size: int) -> None:
        with self._lock:
            diff = size - self._threads - self._owed
            self.size = size
        for _ in range(diff):
            self._spawn()
        for _ in range(-diff):
            with self._lock:
                self._retire += 1
            self._queue.put(None)  # wakes a waiting thread to see the retirement

    def _exit_now(self) -> bool:
        with self._lock:
            return self._should_exit()

    def take_unstarted(self) -> list[Message]:
        taken: list[Message] = []
        sentinels = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                sentinels += 1
            else:
                taken.append(item)
        for _ in range(sentinels):
            self._queue.put(None)
        return taken

    def _next(self) -> list[Message] | None:
        """Take the next unit of work on this thread: one admitted message, or a batch."""
        queue_, spec = self._queue, self.handler.batch
        while True:
            if (self._retire or self._closing) and self._exit_now():
                return None
            message = queue_.get()
            if message is None:
                if self._exit_now():
                    return None
                continue
            if self._admitted(message):
                break
            self._report(message, None, 0.0)
        batch = [message]
        if spec is None:
            return batch
        deadline = time.monotonic() + spec.max_wait_s
        while len(batch) < spec.max_size:
            try:
                item = queue_.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = queue_.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                queue_.put(None)  # this thread exits after the batch
                break
            if self._admitted(item):
                batch.append(item)
            else:
                self._report(item, None, 0.0)
        return batch

    def _work(self) -> None:
        if self.handler.batch is None:
            self._work_single()
            return
        running, units = self.running, self._unit
        while True:
            batch = self._next()
            if batch is None:
                break
            start = time.perf_counter()
            began = time.monotonic()
            unit = object()
            for message in batch:
                units[message] = unit
                running[message] = began
            try:
                results = self._results(self._call(batch), batch)
            except BaseException as exc:  # a handler's SystemExit must not kill the worker
                results = [from_exception(exc, self.fatal_types)] * len(batch)
            share = (time.perf_counter() - start) / len(batch)
            abandoned = False
            finished: list[tuple[Message, Result | None, float]] = []
            for message, result in zip(batch, results, strict=True):
                units.pop(message, None)
                if running.pop(message, None) is None:
                    abandoned = True  # the watchdog settled it and started a replacement
                else:
                    finished.append((message, result, share))
            self._report_all(finished)
            if abandoned:
                self._late_return()
                return
        with self._lock:
            self._threads -= 1

    def _work_single(self) -> None:
        """:meth:`_work` for a handler of one message: the same steps with no batch list, no
        unit record (the message is its own) and one clock, as this runs per message."""
        running, queue_, fence, report = self.running, self._queue, self.fence, self._report
        handler, monotonic = self.handler, time.monotonic
        func, wants_message, name = handler.func, handler.wants_message, handler.name
        while True:
            if (self._retire or self._closing) and self._exit_now():
                break
            message = queue_.get()
            if message is None:
                if self._exit_now():
                    break
                continue
            if fence is not None and not fence(message):
                report(message, None, 0.0)
                continue
            began = running[message] = monotonic()
            try:
                value = func(message.body, message) if wants_message else func(message.body)
                result = OK if value is None else to_result(value, name)
            except BaseException as exc:  # a handler's SystemExit must not kill the worker
                result = from_exception(exc, self.fatal_types)
            seconds = monotonic() - began
            if running.pop(message, None) is None:  # the watchdog settled it: exit, replaced
                self._late_return()
                return
            report(message, result, seconds)
        with self._lock:
            self._threads -= 1

    def _late_return(self) -> None:
        """A stuck thread came back: it exits, and an owed replacement may start now."""
        with self._lock:
            self._stuck_threads -= 1
            start = self._owed > 0 and self._stuck_threads < self.stuck_limit
            if start:
                self._owed -= 1
            if self._stuck_threads < self.stuck_limit:
                self.stuck = None
        if start:
            self._spawn()

    def _report(self, message: Message, result: Result | None, seconds: float) -> None:
        """Hand an outcome (``None``: its lease lapsed unstarted) back to the loop."""
        self._done.append((message, result, seconds))
        if not self._wake_pending:
            self._report_wake()

    def _report_all(self, finished: list[tuple[Message, Result | None, float]]) -> None:
        """:meth:`_report` for a batch handler's messages: one wake-up check for all."""
        if finished:
            self._done.extend(finished)
            self._report_wake()

    def _report_wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # loop closed at exit
                self._loop.call_soon_threadsafe(self._deliver_done)

    def _deliver_done(self) -> None:
        self._wake_pending = False
        done, on_done, on_lapsed = self._done, self.on_done, self.on_lapsed
        finished: list[tuple[Message, Result, float]] = []
        while done:
            item = done.popleft()
            if item[1] is not None:
                finished.append(item)  # type: ignore[arg-type]  # checked: a Result
            elif on_lapsed is not None:
                on_lapsed(item[0])
        if self.on_done_all is not None:
            self.on_done_all(finished)
        else:
            for message, result, seconds in finished:
                on_done(message, result, seconds)

    def expire(self, now: float) -> None:
        if self.timeout_s is None:
            return
        limit = now - self.timeout_s
        replaced: set[int] = set()
        for message, started in list(self.running.items()):
            if started <= limit and self.running.pop(message, None) is not None:
                unit = id(self._unit.get(message, message))  # a single is its own unit
                if unit not in replaced:  # one thread per handler call, batch or not
                    replaced.add(unit)
                    self._replace_stuck_thread()
                self.on_done(message, timeout_result(self.handler, self.timeout_s), now - started)

    def _replace_stuck_thread(self) -> None:
        with self._lock:
            self._threads -= 1  # the late thread exits on its own when it returns
            self._stuck_threads += 1
            replace = self._stuck_threads <= self.stuck_limit
            if not replace:
                self._owed += 1
                self.stuck = (
                    f"{self._stuck_threads} handler threads stuck past handler_timeout_s="
                    f"{self.timeout_s} (limit {self.stuck_limit}); restart this worker"
                )
        if replace:
            self._spawn()

    def abandon(self, message: Message) -> bool:
        if self.running.pop(message, None) is None:
            return False
        unit = self._unit.get(message, message)  # a single message is its own unit
        if not any(self._unit.get(m, m) is unit for m in self.running):  # the call's last one
            with self._lock:
                self._threads -= 1
                self._stuck_threads += 1
        return True

    async def shutdown(self) -> None:
        with self._lock:
            count, self._threads = self._threads, 0
            self._owed = 0
            self._closing = True
        for _ in range(count):
            self._queue.put(None)
        self._deliver_done()
