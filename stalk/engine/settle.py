"""Settling: what the engine does with a message once the policy has decided.

Acks are batched (one broker call for everything finished in the same loop turn); retries and
error-topic routes each get their own task. ``retry_later`` and ``publish_error`` settle the
original themselves (the seam's rule), so nothing is acked before its retry or error copy is safely
with the broker. If that fails, the message is left to the broker's redelivery and the failure is
logged: never ack what was not retried or routed.

Every outcome, including messages the policy rejects before the handler (too large, expired,
poison), goes through here, so counts, the outcome log and the autoscaler see all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from stalk.collectors.base import AckAndLease, Adapter, ImmediateAck
from stalk.engine.inflight import InFlight
from stalk.engine.policy import (
    Ack,
    Action,
    Drop,
    Reject,
    RetryLater,
    RetryPolicy,
    RouteToError,
    decide,
)
from stalk.engine.stats import CollectorStats
from stalk.errors import MessageTooLarge
from stalk.message import ATTR_FIRST_FAILURE_AT, TEXT_ERROR_TYPES, Failure, Message
from stalk.result import OK, Result
from stalk.tasks import TaskSet

logger = logging.getLogger("stalk.collector")

#: Observer of each settled outcome: ``(message, action, handler_seconds)``; ``0.0`` seconds for
#: a message rejected before its handler ran.
Observer = Callable[[Message, Action, float], None]


def _describe(error: BaseException | str | None) -> str:
    """``KeyError: 'customer'``: an exception with its type (its text alone may be one word)."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return str(error)


class Rider(Protocol):
    """A poll that may ride on an ack (the poll intake, over an :class:`AckAndLease` adapter)."""

    def want(self, acks: int) -> int:
        """How many messages to lease with ``acks`` about to be acked (0: ack alone); a nonzero
        answer reserves the poll until :meth:`leased`."""
        ...

    def leased(self, messages: Sequence[Message]) -> None:
        """Take what the combined call leased (``[]`` too, and after a failure)."""
        ...


class Settler:
    """Turn outcomes into broker calls and release the message's slot in the in-flight table."""

    def __init__(
        self,
        adapter: Adapter,
        stats: CollectorStats,
        policy: RetryPolicy,
        tasks: TaskSet,
        inflight: InFlight,
    ) -> None:
        self.adapter = adapter
        self.stats = stats
        self.policy = policy
        self.tasks = tasks
        self.inflight = inflight
        #: Monotonic time by which every retry this collector issued is due again.
        self.retry_due_at = 0.0
        #: Left ``None`` it costs the hot path one attribute check.
        self.on_outcome: Observer | None = None
        self._pending_acks: list[Message] = []
        self._ack_task: asyncio.Task[None] | None = None
        #: Checked once: an isinstance against a runtime protocol costs microseconds.
        self._ack_nowait = adapter.ack_nowait if isinstance(adapter, ImmediateAck) else None
        #: Set by the poll intake where the adapter acks and leases in one call: the next poll
        #: rides on an ack batch instead of following it.
        self.rider: Rider | None = None
        self._ack_and_lease = adapter if isinstance(adapter, AckAndLease) else None

    def _observe(self, message: Message, action: Action, seconds: float) -> None:
        hook = self.on_outcome
        if hook is not None:
            try:
                hook(message, action, seconds)
            except Exception:
                logger.exception("on_outcome observer failed for message %s", message.id)

    def on_done(self, message: Message, result: Result, seconds: float) -> None:
        """Settle a message whose handler returned ``result`` after ``seconds``; on the loop."""
        self.stats.observe(seconds)
        if result is OK and self.on_outcome is None:  # the common case, with nothing to decide
            self.queue_ack(message)
            return
        action = decide(result, message.attempt, self.policy)
        if self.on_outcome is not None:
            self._observe(message, action, seconds)
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
            self.tasks.spawn(self.route(message, action, result, seconds), "stalk-route")

    def on_done_all(self, done: list[tuple[Message, Result, float]]) -> None:
        """:meth:`on_done` for a burst (a thread executor's wake-up): the ok results nobody
        observes join the ack batch together, without a call each."""
        if self.on_outcome is not None:
            for message, result, seconds in done:
                self.on_done(message, result, seconds)
            return
        acks: list[Message] = []
        durations: list[float] = []
        for message, result, seconds in done:
            if result is OK:
                durations.append(seconds)
                acks.append(message)
            else:
                self.on_done(message, result, seconds)
        self.stats.observe_all(durations)
        if len(acks) == 1:
            self.queue_ack(acks[0])  # alone, it may be acked at once (ImmediateAck)
        elif acks:
            self._pending_acks.extend(acks)
            self._flush_soon()

    def reject(self, message: Message, verdict: Reject) -> None:
        """Route a message to the error topic without handling it (too large, expired, poison)."""
        action = RouteToError(verdict.reason)
        self._observe(message, action, 0.0)
        self.tasks.spawn(
            self.route(message, action, Result(verdict.why, fatal=True)),
            "stalk-route",
        )

    def recount(self, message: Message) -> None:
        """Have the broker count a redelivery it could not count, before the handler runs."""
        self.tasks.spawn(self._recount(message), "stalk-recount")

    async def _recount(self, message: Message) -> None:
        try:
            await self.adapter.retry_later(message, 0.0)
            logger.info(
                "message %s was redelivered uncounted (its worker died holding it); counted as "
                "attempt %d in the broker before it runs again",
                message.id,
                message.attempt + 1,
                extra={"message_id": message.id, "attempt": message.attempt},
            )
        except Exception as exc:  # leave it to the broker, but not in a tight loop
            logger.error("could not count redelivered message %s (%s)", message.id, exc)
            await asyncio.sleep(self.policy.retry_interval_s)
            await self.release(message)
            return
        self.finish(message)

    def acks_under_way(self) -> bool:
        """Whether an ack batch is queued or being sent (its finish wakes slot waiters)."""
        return self._ack_task is not None

    def queue_ack(self, message: Message) -> None:
        """Ack ``message`` with whatever else finishes in this loop turn.

        Alone in flight, nothing can join its batch: an adapter whose ack needs no answer acks it
        at once, saving the loop turn a latency-bound consumer (concurrency 1) would wait for.
        """
        if self._ack_nowait is not None and self._ack_task is None and len(self.inflight) <= 1:
            self._ack_at_once(self._ack_nowait, message)
            return
        self._pending_acks.append(message)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Start the ack batch task unless one is queued or under way (it takes these too)."""
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._flush_acks())

    def _ack_at_once(self, ack_nowait: Callable[[list[Message]], None], message: Message) -> None:
        try:
            ack_nowait([message])
            self.stats.acked += 1
        except Exception as exc:
            self.stats.failed_settles += 1
            logger.error(
                "ack of message %s failed (%s); the broker will redeliver it", message.id, exc
            )
        self.finish(message)

    async def _flush_acks(self) -> None:
        try:
            while self._pending_acks:
                batch, self._pending_acks = self._pending_acks, []
                rider, both = self.rider, self._ack_and_lease
                want = rider.want(len(batch)) if rider is not None and both is not None else 0
                leased: list[Message] = []
                try:
                    try:
                        if want and both is not None:
                            leased = await both.ack_and_get_messages(batch, want)
                        else:
                            await self.adapter.ack(batch)
                        self.stats.acked += len(batch)
                    except Exception as exc:
                        self.stats.failed_settles += len(batch)
                        logger.error(
                            "ack of %d messages failed (%s); the broker will redeliver them",
                            len(batch),
                            exc,
                        )
                    self.inflight.settled_all(batch)
                finally:  # the poll reserved by want() is given back even if cancelled
                    if want and rider is not None:
                        rider.leased(leased)
        finally:
            self._ack_task = None

    async def route(
        self,
        message: Message,
        action: RetryLater | RouteToError,
        result: Result,
        seconds: float | None = None,
    ) -> None:
        """Retry later or publish to the error topic; the adapter settles the original."""
        is_retry = isinstance(action, RetryLater)
        context = {
            "message_id": message.id,
            "attempt": message.attempt,
            "source": message.source,
            "backend": self.adapter.name,
            "outcome": "retry" if is_retry else f"error:{action.reason}",  # type: ignore[union-attr]
            "duration_s": None if seconds is None else round(seconds, 6),
        }
        error = result.error
        raised = isinstance(error, BaseException) and error.__traceback__ is not None
        if error is not None:
            context["error"] = str(error) or repr(error)
            if isinstance(error, BaseException):
                context["error_type"] = type(error).__name__
            elif isinstance(action, RouteToError):
                context["error_type"] = TEXT_ERROR_TYPES.get(action.reason, "Error")
            else:
                context["error_type"] = "Retry"
        # A raised exception is logged once, where its outcome is, with its traceback (the
        # JSON format puts it in field ``traceback``); a returned retry() stays at INFO.
        exc_info = (
            (type(error), error, error.__traceback__)
            if raised and isinstance(error, BaseException)
            else None
        )
        try:
            if isinstance(action, RetryLater):
                message.attributes.setdefault(ATTR_FIRST_FAILURE_AT, f"{time.time():.6f}")
                await self.adapter.retry_later(message, action.delay_s)
                self.stats.retried += 1
                self.retry_due_at = max(self.retry_due_at, time.monotonic() + action.delay_s)
                logger.log(
                    logging.WARNING if raised else logging.INFO,
                    "retry of %s in %.2fs: %s",
                    message.id,
                    action.delay_s,
                    _describe(error),
                    extra=context,
                    exc_info=exc_info,
                )
            else:
                failure = await self._publish_error(
                    message, self._failure(message, action.reason, result)
                )
                self.stats.errored[action.reason] += 1
                self.stats.acked += 1  # the original is gone from the source, as after an ack
                logger.warning(
                    "message %s to error topic (%s): %s",
                    message.id,
                    action.reason,
                    _describe(error) if raised else failure.error,
                    extra=context,
                    exc_info=exc_info,
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

    async def _publish_error(self, message: Message, failure: Failure) -> Failure:
        """Publish the error copy; where the broker refuses it as too large, with less metadata
        (never less body), so a message at the broker's limit is routed, not redelivered
        forever. Return the failure as published."""
        refused: MessageTooLarge | None = None
        for candidate in itertools.chain((failure,), failure.smaller()):
            try:
                await self.adapter.publish_error(message, candidate)
            except MessageTooLarge as exc:
                refused = exc
                continue
            if refused is not None:
                logger.warning(
                    "error copy of message %s kept %s metadata (%s): its %d-byte body left no "
                    "room for more",
                    message.id,
                    {"full": "short", "reason": "only the reason as", "none": "no"}[
                        candidate.detail
                    ],
                    refused,
                    len(message.body),
                )
            return candidate
        assert refused is not None  # the loop returns unless every candidate was refused
        raise refused

    @staticmethod
    def _failure(message: Message, reason: str, result: Result) -> Failure:
        failure = Failure.build(message, reason, result.error)
        if reason == "poison" and message.deliveries_counted:
            # this delivery never ran: the attempts made are the deliveries before it
            failure = dataclasses.replace(failure, attempts=max(0, message.attempt - 1))
        return failure

    def finish(self, message: Message) -> None:
        """Stop tracking a settled message and free its slot."""
        self.inflight.settled(message)

    async def release(self, message: Message) -> None:
        """Give ``message`` back unprocessed; a failure only delays it until its lease lapses."""
        try:
            await self.adapter.release(message)
            self.stats.released += 1
        except Exception as exc:
            logger.warning("release of %s failed (%s); it returns after its lease", message.id, exc)
        self.finish(message)
