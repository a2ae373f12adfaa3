"""Where handlers run: long-lived asyncio tasks or long-lived threads, fed from a local buffer.

Measured on these machines, one task plus one thread-pool hop per message caps an engine near
25k msg/s. So both executors keep ``concurrency`` workers alive and hand them messages through a
queue; threads report finished messages through a deque and wake the loop at most once per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from stalk.engine.handler import PreparedHandler, from_exception, to_result
from stalk.errors import HandlerTimeout
from stalk.message import Message
from stalk.result import Result

#: Called on the loop for each message the handler finished: (message, result, seconds).
OnDone = Callable[[Message, Result, float], None]


def timeout_result(handler: PreparedHandler, timeout_s: float) -> Result:
    """Return the retry a handler over its time limit gets."""
    return Result(
        error=HandlerTimeout(f"handler {handler.name} ran over handler_timeout_s={timeout_s}"),
        retry=True,
    )


class Executor:
    """Runs handlers on ``size`` workers; subclasses differ in where the workers live."""

    def __init__(
        self,
        handler: PreparedHandler,
        on_done: OnDone,
        size: int,
        timeout_s: float | None,
        fatal_types: tuple[type[BaseException], ...],
    ) -> None:
        self.handler = handler
        self.on_done = on_done
        self.size = size
        self.timeout_s = timeout_s
        self.fatal_types = fatal_types
        #: message -> monotonic start time, for messages whose handler is running now.
        self.running: dict[Message, float] = {}

    def start(self) -> None:
        """Start ``size`` workers."""
        raise NotImplementedError

    def submit(self, message: Message) -> None:
        """Queue a message for the next free worker."""
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


class AsyncExecutor(Executor):
    """Async handlers as ``size`` long-lived tasks on the engine's loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._alive = 0
        #: message -> the worker task running it, so the watchdog can cancel an overrun.
        self._working: dict[Message, asyncio.Task[None]] = {}
        self._expired: set[Message] = set()

    def start(self) -> None:
        self.resize(self.size)

    def submit(self, message: Message) -> None:
        self._queue.put_nowait(message)

    def resize(self, size: int) -> None:
        diff, self.size = size - self._alive, size
        for _ in range(diff):
            self._alive += 1
            task = asyncio.get_running_loop().create_task(self._work(), name="stalk-worker")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for _ in range(-diff):
            self._alive -= 1
            self._queue.put_nowait(None)

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

    async def _work(self) -> None:
        handler, queue_, running, working = self.handler, self._queue, self.running, self._working
        func, wants_message = handler.func, handler.wants_message
        task = asyncio.current_task()
        assert task is not None
        while True:
            message = await queue_.get()
            if message is None:
                return
            start = time.perf_counter()
            running[message] = time.monotonic()
            working[message] = task
            try:
                call = func(message.body, message) if wants_message else func(message.body)
                result = to_result(await call, handler.name)
            except asyncio.CancelledError:
                if message not in self._expired:
                    raise  # shutdown, not our watchdog
                result = self._timed_out(message, task)
            except BaseException as exc:  # a handler's SystemExit must not kill the worker
                result = from_exception(exc, self.fatal_types)
            del working[message]
            if message in self._expired:  # the handler swallowed the watchdog's cancel
                result = self._timed_out(message, task)
            if running.pop(message, None) is not None:
                self.on_done(message, result, time.perf_counter() - start)

    def _timed_out(self, message: Message, task: asyncio.Task[None]) -> Result:
        self._expired.discard(message)
        task.uncancel()
        assert self.timeout_s is not None
        return timeout_result(self.handler, self.timeout_s)

    def expire(self, now: float) -> None:
        """Cancel handlers over the timeout from the watchdog: no per-message timer to arm."""
        if self.timeout_s is None:
            return
        limit = now - self.timeout_s
        for message, started in list(self.running.items()):
            task = self._working.get(message)
            if started <= limit and task is not None and message not in self._expired:
                self._expired.add(message)
                task.cancel()

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ThreadExecutor(Executor):
    """Sync handlers on ``size`` long-lived daemon threads.

    A thread whose handler overruns the timeout cannot be killed; the watchdog settles its message
    as a retry, starts a replacement thread, and the late thread exits when its handler returns.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._done: deque[tuple[Message, Result, float]] = deque()
        self._wake_pending = False
        self._threads = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self.resize(self.size)

    def submit(self, message: Message) -> None:
        self._queue.put(message)

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
        threading.Thread(target=self._work, name="stalk-handler", daemon=True).start()

    def resize(self, size: int) -> None:
        with self._lock:
            diff = size - self._threads
            self.size = size
        for _ in range(diff):
            self._spawn()
        for _ in range(-diff):
            self._queue.put(None)

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

    def _work(self) -> None:
        handler, queue_, running = self.handler, self._queue, self.running
        func, wants_message = handler.func, handler.wants_message
        while True:
            message = queue_.get()
            if message is None:
                break
            start = time.perf_counter()
            running[message] = time.monotonic()
            try:
                value = func(message.body, message) if wants_message else func(message.body)
                result = to_result(value, handler.name)
            except BaseException as exc:  # a handler's SystemExit must not kill the worker
                result = from_exception(exc, self.fatal_types)
            if running.pop(message, None) is None:
                return  # abandoned by the watchdog, which already started a replacement
            self._done.append((message, result, time.perf_counter() - start))
            if not self._wake_pending:
                self._wake_pending = True
                with contextlib.suppress(RuntimeError):  # loop closed at exit
                    self._loop.call_soon_threadsafe(self._deliver_done)
        with self._lock:
            self._threads -= 1

    def _deliver_done(self) -> None:
        self._wake_pending = False
        done, on_done = self._done, self.on_done
        while done:
            on_done(*done.popleft())

    def expire(self, now: float) -> None:
        if self.timeout_s is None:
            return
        limit = now - self.timeout_s
        for message, started in list(self.running.items()):
            if started <= limit and self.running.pop(message, None) is not None:
                with self._lock:
                    self._threads -= 1  # the late thread exits on its own when it returns
                self._spawn()
                self.on_done(message, timeout_result(self.handler, self.timeout_s), now - started)

    def abandon(self, message: Message) -> bool:
        if self.running.pop(message, None) is None:
            return False
        with self._lock:
            self._threads -= 1
        return True

    async def shutdown(self) -> None:
        with self._lock:
            count, self._threads = self._threads, 0
        for _ in range(count):
            self._queue.put(None)
        self._deliver_done()
