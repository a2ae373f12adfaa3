"""Settling: what the engine does with a handled message once the policy has decided.

Acks are batched (one broker call for everything finished in the same loop turn); retries and
error-topic routes each get their own task, and the original is acked only after the retry or the
error copy is safely with the broker. If that fails, the message is left to the broker's
redelivery and the failure is logged: never ack what was not retried or routed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from stalk.collectors.base import Adapter
from stalk.engine.policy import Ack, Action, Drop, RetryLater, RetryPolicy, RouteToError, decide
from stalk.engine.stats import CollectorStats
from stalk.message import ATTR_FIRST_FAILURE_AT, Failure, Message
from stalk.result import Result

logger = logging.getLogger("stalk.engine.collector")

#: Starts a background task owned by the collector (so shutdown can cancel it).
Spawn = Callable[[Coroutine[Any, Any, None], str], object]

#: Observer of each handled message: ``(message, action, handler_seconds)``.
Observer = Callable[[Message, Action, float], None]


class Settler:
    """Turn outcomes into broker calls, and keep the in-flight table the engine reads."""

    def __init__(
        self,
        adapter: Adapter,
        stats: CollectorStats,
        policy: RetryPolicy,
        spawn: Spawn,
        on_freed: Callable[[], None],
    ) -> None:
        self.adapter = adapter
        self.stats = stats
        self.policy = policy
        self.spawn = spawn
        self.on_freed = on_freed
        #: message -> monotonic time of its receipt or last lease extension; unsettled messages.
        self.inflight: dict[Message, float] = {}
        #: Monotonic time by which every retry this collector issued is due again.
        self.retry_due_at = 0.0
        #: Left ``None`` it costs the hot path one attribute check.
        self.on_outcome: Observer | None = None
        self._pending_acks: list[Message] = []
        self._ack_task: asyncio.Task[None] | None = None

    def on_done(self, message: Message, result: Result, seconds: float) -> None:
        """Settle a message whose handler returned ``result`` after ``seconds``; on the loop."""
        self.stats.observe(seconds)
        action = decide(result, message.attempt, self.policy)
        hook = self.on_outcome
        if hook is not None:
            try:
                hook(message, action, seconds)
            except Exception:
                logger.exception("on_outcome observer failed for message %s", message.id)
        if isinstance(action, Ack):
            self.queue_ack(message)
        elif isinstance(action, Drop):
            logger.warning(
                "dropping message %s after error %r (unflagged_error=drop)",
                message.id,
                result.error,
                extra={"message_id": message.id, "attempt": message.attempt},
            )
            self.stats.dropped += 1
            self.queue_ack(message)
        else:
            self.spawn(self.route(message, action, result, seconds), "stalk-route")

    def reject(self, message: Message, reason: str, why: str) -> None:
        """Route a message to the error topic without handling it (too large, expired)."""
        self.spawn(
            self.route(message, RouteToError(reason), Result(ValueError(why), fatal=True)),
            "stalk-route",
        )

    def queue_ack(self, message: Message) -> None:
        """Ack ``message`` with whatever else finishes in this loop turn."""
        self._pending_acks.append(message)
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        try:
            while self._pending_acks:
                batch, self._pending_acks = self._pending_acks, []
                try:
                    await self.adapter.ack(batch)
                    self.stats.acked += len(batch)
                except Exception as exc:
                    self.stats.failed_settles += len(batch)
                    logger.error(
                        "ack of %d messages failed (%s); the broker will redeliver them",
                        len(batch),
                        exc,
                    )
                for message in batch:
                    self.finish(message)
        finally:
            self._ack_task = None

    async def route(
        self,
        message: Message,
        action: RetryLater | RouteToError,
        result: Result,
        seconds: float | None = None,
    ) -> None:
        """Retry later or publish to the error topic; ack only after that succeeded."""
        is_retry = isinstance(action, RetryLater)
        context = {
            "message_id": message.id,
            "attempt": message.attempt,
            "source": message.source,
            "backend": self.adapter.name,
            "outcome": "retry" if is_retry else f"error:{action.reason}",  # type: ignore[union-attr]
            "duration_s": None if seconds is None else round(seconds, 6),
        }
        try:
            if isinstance(action, RetryLater):
                message.attributes.setdefault(ATTR_FIRST_FAILURE_AT, f"{time.time():.6f}")
                await self.adapter.retry_later(message, action.delay_s)
                self.stats.retried += 1
                self.retry_due_at = max(self.retry_due_at, time.monotonic() + action.delay_s)
                logger.info(
                    "retry of %s in %.2fs: %s",
                    message.id,
                    action.delay_s,
                    result.error,
                    extra=context,
                )
                self.finish(message)
                return
            failure = Failure.build(message, action.reason, result.error)
            await self.adapter.publish_error(message, failure)
            self.stats.errored[action.reason] += 1
            logger.warning(
                "message %s to error topic (%s): %s",
                message.id,
                action.reason,
                failure.error,
                extra=context,
            )
        except Exception as exc:  # never ack what was not retried or routed
            self.stats.failed_settles += 1
            logger.error(
                "could not %s message %s (%s); left to broker redelivery",
                "retry" if is_retry else "route",
                message.id,
                exc,
                extra=context,
            )
            if not self.adapter.features.visibility_timeout:
                await self.release(message)
            self.finish(message)
            return
        self.queue_ack(message)

    def finish(self, message: Message) -> None:
        """Stop tracking a settled message and free its slot."""
        if self.inflight.pop(message, None) is not None:
            self.on_freed()

    async def release(self, message: Message) -> None:
        """Give ``message`` back unprocessed; a failure only delays it until its lease lapses."""
        try:
            await self.adapter.release(message)
            self.stats.released += 1
        except Exception as exc:
            logger.warning("release of %s failed (%s); it returns after its lease", message.id, exc)
        self.finish(message)
