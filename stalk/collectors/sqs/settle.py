"""Settling SQS messages: deletes, visibility retries, parked long delays, heartbeats, error copies.

The half of :class:`stalk.collectors.sqs.SQSAdapter` that ends a delivery, kept in its own file
(as ``memory.py`` keeps ``_MemoryOps``) so each stays short. The module docstring of ``sqs.py``
says why each operation maps onto SQS the way it does.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from stalk.collectors.sqs import wire as wire
from stalk.collectors.sqs.calls import SQSCalls
from stalk.collectors.sqs.fifo import GroupGate
from stalk.errors import BackendError
from stalk.message import ATTR_ATTEMPT, ATTR_FIRST_FAILURE_AT, Failure, Message

if TYPE_CHECKING:
    from stalk.collectors.sqs.settings import SQSSettings

logger = logging.getLogger("stalk.collectors.sqs")

#: Messages whose unhandled receives (releases, FIFO hand-backs) this process remembers.
SKIP_MEMORY = 10_000


class SQSSettling:
    """ack, retry_later, release, extend and publish_error of the SQS adapter."""

    #: SQS's longest visibility timeout (12 h) and SendMessage delay (15 min); tests shrink them.
    max_visibility_s = 43_200
    max_send_delay_s = 900
    #: Kept under the 12 h cap for clock drift and call latency.
    visibility_margin_s = 60

    # Set by the adapter (see SQSAdapter.__init__ and open()).
    settings: SQSSettings
    _sqs: SQSCalls | None
    _url: str
    _name: str
    _fifo: bool
    _error_fifo: bool
    _error_max_bytes: int
    _gate: GroupGate | None
    _to_extend: dict[Message, int]
    _extending: set[Message]
    _extend_task: asyncio.Task[None] | None
    _skips: dict[str, int]

    @property
    def sqs(self) -> SQSCalls:
        """The open connection.

        Raises:
            BackendError: the adapter is not open.
        """
        if self._sqs is None:
            raise BackendError("SQS adapter used before open()")
        return self._sqs

    @abc.abstractmethod
    async def _resolve_error_queue(self) -> str:
        """Return the error queue's URL, resolving it on first use."""

    async def _settling(self, message: Message) -> wire.Receipt:
        """Drop a queued heartbeat of ``message`` and wait out one under way, so it cannot land
        after (and undo) the visibility change being made now."""
        self._to_extend.pop(message, None)
        if message in self._extending and self._extend_task is not None:
            await asyncio.wait({self._extend_task})
        return wire.receipt_of(message)

    async def ack(self, messages: Sequence[Message]) -> None:
        entries = [(m.id, (await self._settling(m)).handle, None) for m in messages]
        try:
            await self.sqs.settle(self._url, self._name, entries)
        finally:
            if self._gate is not None:
                for message in messages:
                    self._gate.done(message)

    async def retry_later(self, message: Message, delay_s: float) -> None:
        receipt = await self._settling(message)
        seconds, cap = max(0, math.ceil(delay_s)), self._visibility_cap(receipt)
        if seconds > cap and not self._fifo:
            await self._park(message, receipt, delay_s, message.attempt + 1)
        else:
            if seconds > cap:
                logger.warning(
                    "FIFO message %s: retry delay %ss capped at %ss (SQS's 12 h)",
                    message.id,
                    seconds,
                    cap,
                    extra={"message_id": message.id},
                )
            try:
                await self._change_visibility(receipt, min(seconds, cap))
            except BackendError as exc:  # SQS counted the 12 h from another start than we did
                if self._fifo or "VisibilityTimeout" not in str(exc):
                    raise
                await self._park(message, receipt, delay_s, message.attempt + 1)
        await self._give_back_held(message)

    async def release(self, message: Message) -> None:
        receipt = await self._settling(message)
        if len(self._skips) >= SKIP_MEMORY:
            self._skips.pop(next(iter(self._skips)))
        self._skips[message.id] = self._skips.get(message.id, 0) + 1
        try:
            await self._change_visibility(receipt, 0)
        except BackendError as exc:
            if not _gone(exc):
                raise
        await self._give_back_held(message)

    async def _change_visibility(self, receipt: wire.Receipt, seconds: int) -> None:
        client = self.sqs.client
        await self.sqs.call(
            "ChangeMessageVisibility",
            self._name,
            lambda: client.change_message_visibility(
                QueueUrl=self._url, ReceiptHandle=receipt.handle, VisibilityTimeout=seconds
            ),
        )

    async def _give_back_held(self, message: Message) -> None:
        """After a FIFO head is retried or released, its held group-mates go back behind it."""
        held = self._gate.abandon(message) if self._gate is not None else []
        if not held:
            return
        for other in held:
            self._skips[other.id] = self._skips.get(other.id, 0) + 1
        entries = [(m.id, (await self._settling(m)).handle, 0) for m in held]
        await self._quietly(self.sqs.settle(self._url, self._name, entries), "give back")

    def _visibility_cap(self, receipt: wire.Receipt) -> int:
        """Longest visibility SQS still allows: 12 h from the receive, less a margin."""
        held_s = time.monotonic() - receipt.received_at
        return max(0, int(self.max_visibility_s - held_s - self.visibility_margin_s))

    async def _park(
        self, message: Message, receipt: wire.Receipt, delay_s: float, attempt: int
    ) -> None:
        """Retry after longer than SQS can hold: send a parked copy, then delete the original."""
        marks = {wire.ATTR_NOT_BEFORE: f"{time.time() + delay_s:.3f}", ATTR_ATTEMPT: str(attempt)}
        first = min(self.max_send_delay_s, math.ceil(delay_s))
        await self.sqs.send(self._url, self._name, receipt.text,
                            wire.copy_attributes(receipt, marks), DelaySeconds=first)  # fmt: skip
        logger.info(
            "message %s parked for %.0fs (past SQS's visibility limit)",
            message.id,
            delay_s,
            extra={"message_id": message.id},
        )
        await self._quietly(
            self.sqs.settle(self._url, self._name, [(message.id, receipt.handle, None)]),
            "delete the parked original",
        )

    async def publish_error(self, message: Message, failure: Failure) -> None:
        error_url = await self._resolve_error_queue()
        receipt = wire.receipt_of(message)
        if message.attempt > 1 and ATTR_FIRST_FAILURE_AT not in message.attributes:
            # SQS cannot carry the first failure's time through a visibility retry; the first
            # receive is the closest record of it.
            first = receipt.first_received_at or failure.first_failure_at
            failure = replace(failure, first_failure_at=min(first, failure.first_failure_at))
        extra: dict[str, Any] = {}
        if self._error_fifo:  # same group as the original; SQS drops a copy sent twice in 5 min
            extra = {"MessageGroupId": receipt.group_id or self.settings.group_id,
                     "MessageDeduplicationId": message.id}  # fmt: skip
        attributes = wire.copy_attributes(receipt, failure.to_attributes(), self._error_max_bytes)
        await self.sqs.send(error_url, self._name, receipt.text, attributes, **extra)
        # The copy is safe: a failed delete only means the original comes back and is routed
        # again (a duplicate on the error queue, which at-least-once allows), so it is not raised.
        await self._quietly(self.ack([message]), "delete the original after its error copy")

    # ----------------------------------------------------------------- heartbeat
    async def extend(self, message: Message, seconds: float) -> None:
        """Queue a visibility extension; every one queued in the same tick goes in one batch.

        Returns before SQS answers: the engine's heartbeat is best effort and its failure only
        logged, which this adapter does itself.
        """
        receipt = wire.receipt_of(message)
        visibility = min(math.ceil(seconds), self._visibility_cap(receipt))
        if visibility <= 0:  # 0 would hand the message to another worker mid-handler
            logger.warning("message %s: SQS allows no lease past 12 h from its receive; it will "
                           "be redelivered while its handler runs", message.id)  # fmt: skip
            return
        self._to_extend[message] = visibility
        for held in self._gate.touch(message) if self._gate is not None else []:
            self._to_extend[held] = visibility
        self._schedule_extends()

    def _schedule_extends(self) -> None:
        if self._extend_task is None or self._extend_task.done():
            self._extend_task = asyncio.get_running_loop().create_task(self._flush_extends())

    async def _flush_extends(self) -> None:
        await asyncio.sleep(0)  # let the engine queue the rest of this tick's heartbeats
        while self._to_extend and self._sqs is not None:
            batch, self._to_extend = self._to_extend, {}
            self._extending = set(batch)
            entries = [(m.id, wire.receipt_of(m).handle, s) for m, s in batch.items()]
            await self._quietly(self.sqs.settle(self._url, self._name, entries), "heartbeat")
            self._extending = set()

    async def _quietly(self, call: Any, what: str) -> None:
        """Await a best-effort call (heartbeat, give-back): its failure is logged, never raised."""
        try:
            await call
        except Exception as exc:  # a background heartbeat must survive anything
            logger.warning("SQS %s failed for %s (%s)", what, self._name, exc)


def _gone(exc: BaseException) -> bool:
    """True when SQS says the message is no longer leased to us (deleted, or visible again)."""
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code")
    return code in wire.GONE_CODES
