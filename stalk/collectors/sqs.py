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
silently. Pointing ``--error-topic`` at the DLQ puts both kinds in one place.

Error queue: ``<source>-errors`` (``<name>-errors.fifo`` for FIFO) unless given. The copy is a
SendMessage with the body text exactly as received and the failure as attributes, see
``_sqs_wire`` for the 10-attribute rule; the original is deleted only after SQS accepted the copy.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stalk.collectors import _sqs_wire as wire
from stalk.collectors._sqs_calls import MAX_BATCH, SQSCalls
from stalk.collectors._sqs_fifo import GroupGate
from stalk.collectors.base import (
    AdapterFeatures,
    AdapterSettings,
    Backlog,
    PollingAdapter,
    build_settings,
)
from stalk.errors import BackendError, ConfigError, MessageTooLarge, QueueNotFound
from stalk.message import ATTR_ATTEMPT, ATTR_ERROR, ATTR_FIRST_FAILURE_AT, Failure, Message

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import MessageTypeDef

logger = logging.getLogger(__name__)

#: Messages whose unhandled receives (releases, FIFO hand-backs) this process remembers.
SKIP_MEMORY = 10_000

SQS_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=None,  # parked copies chain past SQS's 12 h (FIFO: capped, see above)
    delay_precision_s=2.0,  # whole seconds, plus a poll
    ordering=False,  # standard queues; FIFO queues keep order per group
    persistent=True,
    native_attempts=True,
    visibility_timeout=True,
    backlog=True,
    binary_body=True,  # non-text bodies travel base64 with a marker attribute
)


class SQSSettings(AdapterSettings):
    """``--option`` keys of the sqs backend (env ``STALK_SQS_<KEY>``); boto3's chain fills gaps."""

    model_config = SettingsConfigDict(env_prefix="STALK_SQS_", extra="forbid")

    #: SQS-compatible endpoint (moto, LocalStack, ElasticMQ); unset = AWS_ENDPOINT_URL or AWS.
    endpoint_url: str | None = None
    #: AWS region; unset = AWS_REGION/AWS_DEFAULT_REGION/profile, else the region in a queue URL.
    region: str | None = None
    #: Longest long poll (WaitTimeSeconds). The engine's polling period bounds each poll too:
    #: raise ``--max-polling-period`` to 20 for the fewest requests on an idle queue.
    wait_time_s: int = Field(default=20, ge=0, le=20)
    #: boto3 profile (``~/.aws/config``); unset = AWS_PROFILE or the default chain.
    profile: str | None = None
    #: SQS calls at once: the adapter's threads and pooled HTTP connections.
    max_connections: int = Field(default=32, ge=2, le=512)
    #: Seconds to wait for a TCP connection before an attempt counts as failed.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    #: Attempts per call (boto3 "standard" retry mode: throttling, 5xx, connection errors).
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: FIFO MessageGroupId for a publish without a ``stalk-group-id`` attribute.
    group_id: str = "stalk"
    #: Create the source and error queue when missing (development, tests); off for production.
    create_queues: bool = False


@dataclass(eq=False, slots=True)
class _Receipt:
    """What the adapter keeps of one receive: enough to settle it and to copy it intact."""

    handle: str
    text: str  # the body exactly as SQS holds it
    own: wire.Attributes  # the producer's attributes with their SQS types
    encoded: bool  # the body is base64 of bytes that were not SQS text
    group_id: str | None
    first_received_at: float | None  # epoch seconds
    received_at: float  # monotonic


def _receipt(message: Message) -> _Receipt:
    if not isinstance(message.receipt, _Receipt):
        raise BackendError(f"message {message.id} was not received by an SQS adapter")
    return message.receipt


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class SQSAdapter(PollingAdapter):
    """Consume an SQS queue; the module docstring says how each operation maps onto SQS."""

    name = "sqs"
    features = SQS_FEATURES
    settings_model = SQSSettings
    #: SQS's longest visibility timeout (12 h) and SendMessage delay (15 min); tests shrink them.
    max_visibility_s = 43_200
    max_send_delay_s = 900
    #: Kept under the 12 h cap for clock drift and call latency.
    visibility_margin_s = 60

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
        self._error_url: str | None = None
        self._fifo = self._error_fifo = False
        self._max_bytes = self._error_max_bytes = 262_144
        self._gate: GroupGate | None = None
        self._to_extend: dict[Message, int] = {}
        self._extending: set[Message] = set()
        self._extend_task: asyncio.Task[None] | None = None
        self._skips: dict[str, int] = {}

    @classmethod
    def from_options(
        cls, source: str | None, error_topic: str | None, options: Mapping[str, str]
    ) -> SQSAdapter:
        settings = build_settings(SQSSettings, cls.name, options)
        assert isinstance(settings, SQSSettings)
        return cls(source, error_topic=error_topic, settings=settings)

    def default_error_topic(self, source: str) -> str:
        """Name the error queue ``<source>-errors``, or ``<name>-errors.fifo`` for a FIFO queue."""
        if source.endswith(".fifo"):
            return f"{source[:-5]}-errors.fifo"
        return f"{source}-errors"

    def describe(self) -> str:
        region = self._sqs.region if self._sqs else self.settings.region
        return f"sqs:{(self.source or '?').rsplit('/', 1)[-1]} ({region or 'default region'})"

    @property
    def sqs(self) -> SQSCalls:
        if self._sqs is None:
            raise BackendError("SQS adapter used before open()")
        return self._sqs

    @property
    def _name(self) -> str:
        return self.source or "?"

    # ----------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        if self._sqs is not None:
            return
        source = self.source
        if not source:
            raise ConfigError("backend 'sqs' needs a source: pass --source QUEUE (name or URL)")
        self._sqs = sqs = SQSCalls(self.settings)
        try:
            await sqs.connect(source)
            self._url, attributes = await sqs.resolve(source, self.settings.create_queues)
            self._fifo = attributes.get("FifoQueue") == "true"
            self._max_bytes = _int(attributes.get("MaximumMessageSize"), self._max_bytes)
            self._note_redrive(attributes.get("RedrivePolicy"))
            if self._fifo:
                self._gate = GroupGate(lambda m: _receipt(m).group_id, self.visibility_timeout_s)
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
            self._error_max_bytes = _int(attributes.get("MaximumMessageSize"), 262_144)
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
            if self._gate is not None and sqs._client is not None:
                held = [(m.id, _receipt(m).handle, 0) for m in self._gate.drain()]
                await self._quietly(sqs.settle(self._url, self._name, held), "give back held")
            if self._extend_task is not None:
                await asyncio.wait({self._extend_task})
        finally:
            await asyncio.to_thread(sqs.close)

    # ----------------------------------------------------------------- receiving
    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        if self._gate is not None:
            ready, _lapsed = self._gate.take(max_messages)
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
        messages = [m for m in [await self._decode(item) for item in raw] if m is not None]
        return self._gate.admit(messages) if self._gate is not None else messages

    async def _decode(self, item: MessageTypeDef) -> Message | None:
        """Turn a received SQS message into a Message; handle parked copies and return None."""
        own = wire.unpack(item.get("MessageAttributes", {}))
        marks = {k: wire.as_text(own.pop(k)) for k in list(own) if k in wire.INTERNAL}
        system = item.get("Attributes", {})
        text, handle, message_id = item.get("Body", ""), item["ReceiptHandle"], item["MessageId"]
        first = _int(system.get("ApproximateFirstReceiveTimestamp"), 0) / 1000 or None
        receipt = _Receipt(
            handle, text, own, marks.get(wire.ATTR_BODY_ENCODING) == "base64",
            system.get("MessageGroupId"), first, time.monotonic(),
        )  # fmt: skip
        carried = max(1, _int(marks.get(ATTR_ATTEMPT), 1))
        if wire.ATTR_NOT_BEFORE in marks:
            await self._forward_parked(message_id, receipt, marks[wire.ATTR_NOT_BEFORE], carried)
            return None
        count = _int(system.get("ApproximateReceiveCount"), 1)
        attempt = max(1, count + carried - 1 - self._skips.pop(message_id, 0))
        sent = _int(system.get("SentTimestamp"), 0) / 1000 or None
        attributes = {k: v for k, v in ((k, wire.as_text(v)) for k, v in own.items()) if v}
        body = wire.decode_body(text, marks.get(wire.ATTR_BODY_ENCODING))
        return Message(message_id, body, attributes, attempt, sent, self._name, receipt)

    async def _forward_parked(
        self, message_id: str, receipt: _Receipt, not_before: str | None, attempt: int
    ) -> None:
        """Hide a parked copy again for what remains, or re-send it fresh once it is due."""
        try:
            remaining = math.ceil(float(not_before or 0) - time.time())
        except (ValueError, OverflowError):
            remaining = 0
        try:
            if remaining > 0:
                hide = min(remaining, self._visibility_cap(receipt))
                await self.sqs.settle(self._url, self._name, [(message_id, receipt.handle, hide)])
                return
            marks = {ATTR_ATTEMPT: str(attempt)} if attempt > 1 else {}
            await self._send_copy(self._url, receipt, marks, self._fifo_args(receipt, None))
            await self.sqs.settle(self._url, self._name, [(message_id, receipt.handle, None)])
        except BackendError as exc:  # it shows up again after its lease and is tried again
            logger.warning("parked message %s not forwarded yet (%s)", message_id, exc)

    # ----------------------------------------------------------------- settling
    async def _settling(self, message: Message) -> _Receipt:
        """Drop a queued heartbeat of ``message`` and wait out one under way, so it cannot land
        after (and undo) the visibility change being made now."""
        self._to_extend.pop(message, None)
        if message in self._extending and self._extend_task is not None:
            await asyncio.wait({self._extend_task})
        return _receipt(message)

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
                logger.warning("FIFO message %s: retry delay %ss capped at %ss (SQS's 12 h)",
                               message.id, seconds, cap, extra={"message_id": message.id})
            await self._change_visibility(message, receipt, min(seconds, cap))
        await self._give_back_held(message)

    async def release(self, message: Message) -> None:
        receipt = await self._settling(message)
        if len(self._skips) >= SKIP_MEMORY:
            self._skips.pop(next(iter(self._skips)))
        self._skips[message.id] = self._skips.get(message.id, 0) + 1
        try:
            await self._change_visibility(message, receipt, 0)
        except BackendError as exc:
            if not _gone(exc):
                raise
        await self._give_back_held(message)

    async def _change_visibility(self, message: Message, receipt: _Receipt, seconds: int) -> None:
        client = self.sqs.client
        await self.sqs.call("ChangeMessageVisibility", self._name, lambda: (
            client.change_message_visibility(
                QueueUrl=self._url, ReceiptHandle=receipt.handle, VisibilityTimeout=seconds)))

    async def _give_back_held(self, message: Message) -> None:
        """After a FIFO head is retried or released, its held group-mates go back behind it."""
        held = self._gate.abandon(message) if self._gate is not None else []
        for other in held:
            self._skips[other.id] = self._skips.get(other.id, 0) + 1
        entries = [(m.id, (await self._settling(m)).handle, 0) for m in held]
        await self._quietly(self.sqs.settle(self._url, self._name, entries), "give back")

    def _visibility_cap(self, receipt: _Receipt) -> int:
        """Longest visibility SQS still allows: 12 h from the receive, less a margin."""
        held_s = time.monotonic() - receipt.received_at
        return max(0, int(self.max_visibility_s - held_s - self.visibility_margin_s))

    async def _park(
        self, message: Message, receipt: _Receipt, delay_s: float, attempt: int
    ) -> None:
        """Retry after longer than SQS can hold: send a parked copy, then delete the original."""
        marks = {wire.ATTR_NOT_BEFORE: f"{time.time() + delay_s:.3f}", ATTR_ATTEMPT: str(attempt)}
        first = min(self.max_send_delay_s, math.ceil(delay_s))
        await self._send_copy(self._url, receipt, marks, {"DelaySeconds": first})
        logger.info("message %s parked for %.0fs (past SQS's visibility limit)", message.id,
                    delay_s, extra={"message_id": message.id})
        await self._quietly(
            self.sqs.settle(self._url, self._name, [(message.id, receipt.handle, None)]),
            "delete the parked original",
        )

    async def _send_copy(
        self, url: str, receipt: _Receipt, marks: dict[str, str], extra: dict[str, Any]
    ) -> str:
        if receipt.encoded:
            marks = {**marks, wire.ATTR_BODY_ENCODING: "base64"}
        attributes = wire.pack(receipt.own, wire.string_attributes(marks))
        return await self.sqs.send(url, self._name, receipt.text, attributes, **extra)

    def _fifo_args(self, receipt: _Receipt, dedup: str | None) -> dict[str, Any]:
        if not self._fifo:
            return {}
        return {"MessageGroupId": receipt.group_id or self.settings.group_id,
                "MessageDeduplicationId": dedup or uuid.uuid4().hex}

    async def publish_error(self, message: Message, failure: Failure) -> None:
        error_url = await self._resolve_error_queue()
        receipt = _receipt(message)
        if message.attempt > 1 and ATTR_FIRST_FAILURE_AT not in message.attributes:
            # SQS cannot carry the first failure's time through a visibility retry; the first
            # receive is the closest record of it.
            first = receipt.first_received_at or failure.first_failure_at
            failure = replace(failure, first_failure_at=min(first, failure.first_failure_at))
        meta = failure.to_attributes()
        over = wire.attributes_size(receipt.text, wire.pack(receipt.own, wire.string_attributes(
            meta))) + 64 - self._error_max_bytes
        if over > 0:  # shorten the error text, never the body
            meta[ATTR_ERROR] = meta[ATTR_ERROR][: max(0, len(meta[ATTR_ERROR]) - over)]
        extra: dict[str, Any] = {}
        if self._error_fifo:
            extra = {"MessageGroupId": receipt.group_id or self.settings.group_id,
                     "MessageDeduplicationId": message.id}
        await self._send_copy(error_url, receipt, meta, extra)

    # ----------------------------------------------------------------- heartbeat
    async def extend(self, message: Message, seconds: float) -> None:
        """Queue a visibility extension; every one queued in the same tick goes in one batch.

        Returns before SQS answers: the engine's heartbeat is best effort and its failure only
        logged, which this adapter does itself.
        """
        receipt = _receipt(message)
        visibility = min(math.ceil(seconds), self._visibility_cap(receipt))
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
            entries = [(m.id, _receipt(m).handle, s) for m, s in batch.items()]
            await self._quietly(self.sqs.settle(self._url, self._name, entries), "heartbeat")
            self._extending = set()

    async def _quietly(self, call: Any, what: str) -> None:
        """Await a best-effort call (heartbeat, give-back): its failure is logged, never raised."""
        try:
            await call
        except Exception as exc:  # a background heartbeat must survive anything
            logger.warning("SQS %s failed for %s (%s)", what, self._name, exc)

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
                raise BackendError(f"FIFO queue {self._name!r} takes no per-message delay; "
                                   "set the queue's DelaySeconds instead")
            extra = {"MessageGroupId": group or self.settings.group_id,
                     "MessageDeduplicationId": dedup or uuid.uuid4().hex}
        elif delay_s > self.max_send_delay_s:
            marks[wire.ATTR_NOT_BEFORE] = f"{time.time() + delay_s:.3f}"
            extra["DelaySeconds"] = self.max_send_delay_s
        elif delay_s > 0:
            extra["DelaySeconds"] = math.ceil(delay_s)
        packed = wire.pack(wire.string_attributes(own), wire.string_attributes(marks))
        size = wire.attributes_size(text, packed)
        if size > self._max_bytes:
            raise MessageTooLarge(f"message of {size} bytes (body and attributes) is over SQS "
                                  f"queue {self._name!r}'s MaximumMessageSize of {self._max_bytes}")
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


def _gone(exc: BaseException) -> bool:
    """True when SQS says the message is no longer leased to us (deleted, or visible again)."""
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code")
    return code in wire.GONE_CODES
