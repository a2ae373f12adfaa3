"""One owner for background asyncio tasks: spawn, log a failure, cancel, drain.

The engine, the adapters and the operations layer all start small tasks whose failure must not
vanish silently (an un-awaited task's exception is only reported at garbage collection, if at
all) and which shutdown must cancel. This is that idiom, written once. It is vocabulary-level,
beside :mod:`stalk.backoff`, because adapters need it too and must not import the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    """Tasks owned by one component; a task that fails is logged once with its traceback.

    Args:
        logger: where failures are logged (the owner's logger).
        owner: how log lines name the owner, e.g. ``collector`` or ``amqp adapter``.
    """

    def __init__(self, logger: logging.Logger, owner: str) -> None:
        self._logger = logger
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` on the running loop and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._logger.error(
                "internal task %s of the %s failed",
                task.get_name(),
                self._owner,
                exc_info=task.exception(),
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def join(self) -> None:
        """Wait until every task has ended, including ones spawned meanwhile."""
        current = asyncio.current_task()
        while pending := {task for task in self._tasks if task is not current}:
            await asyncio.wait(pending)

    def cancel(self) -> None:
        """Cancel every task but the one calling (a task may cancel its siblings)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def drain(self) -> None:
        """Cancel every task but the caller's and wait until they have ended."""
        self.cancel()
        current = asyncio.current_task()
        pending = [task for task in self._tasks if task is not current]
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
