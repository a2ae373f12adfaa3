"""Amazon SQS (boto3): long polling, batched deletes, retries held by the broker.

Mapping. ``get_messages`` is one ReceiveMessage of at most 10 (never more than asked), long
polling for ``min(wait_time_s, wait_s)`` whole seconds, so it never blocks longer than the engine
asked. ``ack`` is DeleteMessageBatch in chunks of 10 sent at once; an entry SQS refuses is logged
and redelivered later. ``retry_later`` is ChangeMessageVisibility: the message keeps its id and
receive count, the delay survives a crash, and nothing waits in worker memory. ``extend`` (the
heartbeat) is queued and sent as ChangeMessageVisibilityBatch for every message extended in the
same engine tick; ``release`` sets visibility 0. Source: a queue name or URL.

Long delays. SQS holds a message invisible for at most 12 hours from its receive, and SendMessage
delays it at most 15 minutes. A longer retry (or ``publish`` delay) is *parked*: a copy carrying
``stalk-not-before`` and ``stalk-attempt`` is sent, then the original deleted; whenever the copy
shows up early it is hidden again for what remains (up to 12 h a hop), and when due it is
re-sent as a fresh message, so its receive count starts at 1 and ``stalk-attempt`` says the rest.
FIFO queues take no per-message delay and a copy would lose its place, so there a retry is
capped at 12 hours (logged).

Attempts are ``ApproximateReceiveCount`` (plus ``stalk-attempt - 1`` on parked copies): the same
counter a queue's native redrive policy uses, so the two agree. How they interact: stalk sends a
message to its error queue (with the failure metadata) on the failing attempt ``max_retries +
1``; SQS moves a message to the policy's dead-letter queue once it has been received
``maxReceiveCount`` times, without metadata. Keep ``maxReceiveCount`` above ``max_retries + 1``
(a few extra absorb shutdown releases and crashes, which also count a receive): stalk then routes
every handler failure itself, and the native DLQ catches only what no worker could settle (a
worker killed mid-message, an error queue that refuses copies). A lower ``maxReceiveCount`` wins
without metadata (stalk logs the policy at start). ``--error-topic`` naming the DLQ puts both
kinds in one place.

Error queue: ``<source>-errors`` (``<name>-errors.fifo`` for FIFO) unless given. The copy is a
SendMessage with the body text exactly as received and the failure as attributes (``_sqs_wire``
has the 10-attribute rule and how non-text bodies travel); the original is deleted only after SQS
accepted the copy. A missing error queue is a warning at start, not an error (``send``,
``stats`` and ``redrive`` need none); failed messages then stay in the source until it exists.
``--option create_queues=true`` creates missing queues, for development.

FIFO (``.fifo``): ``publish`` sets MessageGroupId (attribute ``stalk-group-id``, else the
``group_id`` setting) and MessageDeduplicationId (``stalk-deduplication-id``, else random); error
copies keep the original's group and use its message id for deduplication. Order within a group
is kept through retries as ``_sqs_fifo`` explains.

Threads: boto3 blocks, so every call runs in this adapter's own thread pool, sized with the HTTP
connection pool (``max_connections``): a 20 s long poll or a slow call never holds up deletes of
other messages, and the process-wide default executor (6 threads on 2 cores) stays free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from stalk.collectors.base import (
    Backlog,
    PollingAdapter,
)
from stalk.collectors.sqs import wire as wire
from stalk.collectors.sqs.calls import MAX_BATCH, SQSCalls
from stalk.collectors.sqs.fifo import GroupGate
from stalk.collectors.sqs.settings import SQS_FEATURES, SQSSettings
from stalk.collectors.sqs.settle import SQSSettling
from stalk.errors import BackendError, ConfigError, MessageTooLarge, QueueNotFound
from stalk.message import ATTR_ATTEMPT, Message

logger = logging.getLogger(__name__)


class SQSAdapter(SQSSettling, PollingAdapter):
    """Consume an SQS queue; the module docstring says how each operation maps onto SQS."""

    name = "sqs"
    features = SQS_FEATURES
    settings_model = SQSSettings

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: SQSSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.settings = settings if settings is not None else SQSSettings()
        self._sqs: SQSCalls | None = None
        self._url = ""
        self._name = source or "?"
        self._error_url: str | None = None
        self._fifo = self._error_fifo = False
        # Until the queue's own MaximumMessageSize is read: SQS's default since August 2025.
        self._max_bytes = self._error_max_bytes = 1_048_576
        self._gate: GroupGate | None = None
        self._to_extend: dict[Message, int] = {}
        self._extending: set[Message] = set()
        self._extend_task: asyncio.Task[None] | None = None
        self._skips: dict[str, int] = {}
        self._count_warned = False

    def default_error_topic(self, source: str) -> str:
        """Name the error queue ``<source>-errors``, or ``<name>-errors.fifo`` for a FIFO queue."""
        if source.endswith(".fifo"):
            return f"{source[:-5]}-errors.fifo"
        return f"{source}-errors"

    def describe(self) -> str:
        region = self._sqs.region if self._sqs else self.settings.region
        return f"sqs:{(self.source or '?').rsplit('/', 1)[-1]} ({region or 'default region'})"

    # ----------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        if self._sqs is not None:
            return
        source = self.source
        if not source:
            raise ConfigError("backend 'sqs' needs a source: pass --source QUEUE (name or URL)")
        self._name = source  # as the user gave it: in logs, errors and Message.source
        self._sqs = sqs = SQSCalls(self.settings)
        try:
            await sqs.connect(source)
            self._url, attributes = await sqs.resolve(source, self.settings.create_queues)
            self._fifo = attributes.get("FifoQueue") == "true"
            self._max_bytes = wire.as_int(attributes.get("MaximumMessageSize"), self._max_bytes)
            self._note_redrive(attributes.get("RedrivePolicy"))
            if self._fifo:
                group_of = lambda m: wire.receipt_of(m).group_id  # noqa: E731
                self._gate = GroupGate(group_of, self.visibility_timeout_s)
            if self.error_topic:
                try:
                    await self._resolve_error_queue()
                except QueueNotFound as exc:  # producers (send, stats, redrive) need none
                    logger.warning("%s; until it exists, failed messages stay in %s", exc, source)
        except BaseException:
            await self.close()
            raise

    async def _resolve_error_queue(self) -> str:
        if self._error_url is None:
            topic = self.error_topic or self.default_error_topic(self._name)
            url, attributes = await self.sqs.resolve(topic, self.settings.create_queues)
            self._error_fifo = attributes.get("FifoQueue") == "true"
            self._error_max_bytes = wire.as_int(attributes.get("MaximumMessageSize"), 1_048_576)
            self._error_url = url
        return self._error_url

    def _note_redrive(self, policy: str | None) -> None:
        try:
            parsed = json.loads(policy or "")
        except ValueError:
            return
        logger.info(
            "SQS queue %s has a redrive policy: SQS moves a message to %s once received %s "
            "times, whatever stalk's max_retries; keep maxReceiveCount above max_retries + 1",
            self.source, parsed.get("deadLetterTargetArn"), parsed.get("maxReceiveCount"),
        )  # fmt: skip

    async def close(self) -> None:
        sqs, self._sqs = self._sqs, None
        if sqs is None:
            return
        try:
            if self._gate is not None and sqs.connected:
                held = [(m.id, wire.receipt_of(m).handle, 0) for m in self._gate.drain()]
                await self._quietly(sqs.settle(self._url, self._name, held), "give back held")
            if self._extend_task is not None:
                await asyncio.wait({self._extend_task})
        finally:
            await asyncio.to_thread(sqs.close)

    # ----------------------------------------------------------------- receiving
    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        if self._gate is not None:
            ready = self._gate.take(max_messages)
            if ready:  # they waited behind their group's head: renew their lease first
                for message in ready:
                    self._to_extend[message] = math.ceil(self.visibility_timeout_s)
                self._schedule_extends()
                return ready
        raw = await self.sqs.receive(
            self._url, self._name, min(MAX_BATCH, max_messages),
            max(0, min(self.settings.wait_time_s, int(wait_s))),  # never longer than asked
            math.ceil(self.visibility_timeout_s), self._fifo,
        )  # fmt: skip
        if raw and "ApproximateReceiveCount" not in raw[0].get("Attributes", {}):
            self._warn_no_count()
        messages: list[Message] = []
        for item in raw:
            message = wire.decode(item, self._name, self._skips)
            if wire.ATTR_NOT_BEFORE in message.attributes:
                await self._forward_parked(message)
            else:
                messages.append(message)
        return self._gate.admit(messages) if self._gate is not None else messages

    def _warn_no_count(self) -> None:
        if not self._count_warned:
            self._count_warned = True
            logger.warning("SQS endpoint %s returns no ApproximateReceiveCount: every delivery "
                           "looks like attempt 1, so max_retries cannot stop a failing message; "
                           "upgrade the emulator or use AWS", self.sqs.where())  # fmt: skip

    async def _forward_parked(self, message: Message) -> None:
        """Hide a parked copy again for what remains, or re-send it fresh once it is due."""
        receipt = wire.receipt_of(message)
        try:
            remaining = math.ceil(float(message.attributes[wire.ATTR_NOT_BEFORE]) - time.time())
        except (ValueError, OverflowError):
            remaining = 0
        try:
            if remaining > 0:
                hide = min(remaining, self._visibility_cap(receipt))
                await self.sqs.settle(self._url, self._name, [(message.id, receipt.handle, hide)])
                return
            marks = {ATTR_ATTEMPT: str(message.attempt)} if message.attempt > 1 else {}
            await self.sqs.send(self._url, self._name, receipt.text,
                                wire.copy_attributes(receipt, marks))  # fmt: skip
            await self.sqs.settle(self._url, self._name, [(message.id, receipt.handle, None)])
        except BackendError as exc:  # it shows up again after its lease and is tried again
            logger.warning("parked message %s not forwarded yet (%s)", message.id, exc)

    # ----------------------------------------------------------------- producing, counting
    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        own = dict(attributes or {})
        group = own.pop(wire.ATTR_GROUP_ID, None)
        dedup = own.pop(wire.ATTR_DEDUPLICATION_ID, None)
        text, encoded = wire.encode_body(body)
        marks = {wire.ATTR_BODY_ENCODING: "base64"} if encoded else {}
        extra: dict[str, Any] = {}
        if self._fifo:
            if delay_s > 0:
                raise BackendError(
                    f"FIFO queue {self._name!r} takes no per-message delay; "
                    "set the queue's DelaySeconds instead"
                )
            extra = {
                "MessageGroupId": group or self.settings.group_id,
                "MessageDeduplicationId": dedup or uuid.uuid4().hex,
            }
        elif delay_s > self.max_send_delay_s:
            marks[wire.ATTR_NOT_BEFORE] = f"{time.time() + delay_s:.3f}"
            extra["DelaySeconds"] = self.max_send_delay_s
        elif delay_s > 0:
            extra["DelaySeconds"] = math.ceil(delay_s)
        packed = wire.pack(wire.string_attributes(own), wire.string_attributes(marks))
        size = wire.attributes_size(text, packed)
        if size > self._max_bytes:
            raise MessageTooLarge(
                f"message of {size} bytes (body and attributes) is over SQS "
                f"queue {self._name!r}'s MaximumMessageSize of {self._max_bytes}"
            )
        return await self.sqs.send(self._url, self._name, text, packed, **extra)

    async def backlog(self) -> Backlog | None:
        sqs = self.sqs
        asks = [sqs.counts(self._url, self._name)]
        if self._error_url is not None:
            asks.append(sqs.counts(self._error_url, self.error_topic or "?"))
        got = await asyncio.gather(*asks)
        errors = got[1].get("ApproximateNumberOfMessages") if len(got) > 1 else None
        return Backlog(
            ready=got[0].get("ApproximateNumberOfMessages"),
            delayed=got[0].get("ApproximateNumberOfMessagesDelayed"),
            in_flight=got[0].get("ApproximateNumberOfMessagesNotVisible"),
            errors=errors,
        )
