"""Google Pub/Sub (google-cloud-pubsub): what both intake modes share.

Source and topics
    ``run --source`` names a subscription (``projects/P/subscriptions/S`` or ``S`` with
    ``--option project=P``); ``publish`` (``stalk send``, tests, redrive) goes to that
    subscription's topic. A source that is no subscription but a topic is a producer: ``send
    --source TOPIC`` works, consuming from it says it needs a subscription. The error topic is
    ``<subscription id>-errors`` in the same project unless ``--error-topic`` names one.

Modes (``--option mode=``)
    ``pull`` (:class:`~stalk.collectors.pubsub.pull.PubSubPullAdapter`, the default): the
    engine polls with unary pull. ``streaming``
    (:class:`~stalk.collectors.pubsub.streaming.PubSubStreamingAdapter`): the client library's
    streaming pull pushes. ``PubSubAdapter(...)`` returns the one the settings ask for. Either
    way, every settle is a unary call of this adapter's own grpc.aio client, awaited, so an ack
    is confirmed before the engine counts it and none is lost when a stream is closed.

Leases
    A pulled message is leased for the subscription's ack deadline; where the engine's
    ``visibility_timeout_s`` differs, the batch is set to it at once (one modack per pull).
    ``extend`` (the heartbeat) is a modack, ``release`` a modack of 0.

Retries and attempts
    With a dead-letter policy on the subscription, Pub/Sub counts every delivery
    (``delivery_attempt``, which the emulator fills only then): ``attempt`` is that count, a
    worker that died holding a message is counted (the engine's poison rule holds), and a retry
    of up to 600 s is a modack of the delay (the message stays leased, in Pub/Sub, for that
    long). Keep ``max_delivery_attempts`` above ``max_retries + 1`` or Pub/Sub dead-letters,
    without metadata, before stalk routes with it. Without the policy, Pub/Sub counts nothing:
    a retry is a copy republished with ``stalk-attempt`` = the next attempt (then the original
    acked), the delay is held as for a long one below, and ``deliveries_counted`` is False (a
    delivery whose worker died is not counted; Pub/Sub says nothing of it).

Long delays
    A delay past modack's 600 s (and ``publish(delay_s=...)``, which Pub/Sub has no native
    form of) is a copy carrying ``stalk-not-before``. Delivered early, it is modacked for what
    remains (at most 600 s a hop). Under a dead-letter policy each hop is a counted delivery, so
    before the count nears ``max_delivery_attempts`` the copy is republished afresh, and once
    due a copy delivered more than once is republished so it counts from 1 again.

Error topic
    The copy has the body untouched and the failure as attributes, kept within the service's
    limits (:func:`stalk.collectors.pubsub.wire.fit_attributes`); the original is acked only
    after the publish returned its message id.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import os
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from google.pubsub_v1 import types

from stalk.collectors.base import Adapter, AdapterFeatures, Backlog
from stalk.collectors.pubsub import wire
from stalk.collectors.pubsub.client import PubSubCalls
from stalk.collectors.pubsub.ordering import KeyGate
from stalk.collectors.pubsub.settings import MAX_ACK_DEADLINE_S, PUBSUB_FEATURES, PubSubSettings
from stalk.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    MessageTooLarge,
    QueueNotFound,
)
from stalk.message import ATTR_ATTEMPT, Failure, Message

logger = logging.getLogger("stalk.collectors.pubsub")

#: A parked copy this close to its due time is delivered rather than hidden again.
DUE_SLACK_S = 0.5
#: Mode name -> the adapter class of that intake; filled by ``pull`` and ``streaming``.
MODES: dict[str, type[PubSubAdapter]] = {}
#: Attribute of ``publish`` that becomes the message's ordering key instead of an attribute.
ATTR_ORDERING_KEY = "stalk-ordering-key"


@dataclass(eq=False, slots=True)
class Lease:
    """One delivery as Pub/Sub gave it: the receipt of a :class:`Message`.

    Attributes:
        ack_id: what ack and modack name.
        data, attributes, ordering_key: the message as published (for republished copies).
        delivery_attempt: Pub/Sub's count (0 without a dead-letter policy).
        publish_time: epoch seconds of the publish.
    """

    ack_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    delivery_attempt: int
    publish_time: float | None


class PubSubAdapter(Adapter):
    """Consume a Pub/Sub subscription; the module docstring says how each operation maps."""

    name: ClassVar[str] = "pubsub"
    features: ClassVar[AdapterFeatures] = PUBSUB_FEATURES
    settings_model = PubSubSettings

    def __new__(
        cls,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: PubSubSettings | None = None,
    ) -> PubSubAdapter:
        """Return the adapter of the settings' mode: pull (polling) or streaming (push).

        The mode classes register in :data:`MODES` when the package is imported (its
        ``__init__`` imports both), so this module imports neither.
        """
        if cls is PubSubAdapter:
            mode = (settings if settings is not None else PubSubSettings()).mode
            chosen: PubSubAdapter = object.__new__(MODES[mode])
            return chosen
        return object.__new__(cls)

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: PubSubSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.settings = settings if settings is not None else PubSubSettings()
        self._calls: PubSubCalls | None = None
        self._project: str | None = None
        #: Paths: the subscription consumed (None for a producer on a topic), its topic.
        self._subscription: str | None = None
        self._topic = ""
        self._error_path: str | None = None
        self._ack_deadline_s = 10
        #: A dead-letter policy makes Pub/Sub count deliveries (``delivery_attempt``).
        self._counted = False
        self._max_attempts = 5
        self._tasks: set[asyncio.Task[None]] = set()
        self._said_no_counts = False
        #: Holds later messages of an ordering key (subscriptions with message ordering).
        self._gate: KeyGate | None = None
        self._gate_task: asyncio.Task[None] | None = None

    def default_error_topic(self, source: str) -> str:
        """Name the error topic ``<subscription id>-errors``, in the source's project."""
        match = wire.PATH_RE.match(source)
        if match:
            return f"projects/{match.group(1)}/topics/{match.group(3)}-errors"
        return f"{source}-errors"

    def describe(self) -> str:
        host = self.settings.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
        where = f"emulator {host}" if host else "pubsub.googleapis.com"
        return f"pubsub:{wire.short(self.source or '?')} ({self.settings.mode}, {where})"

    @property
    def calls(self) -> PubSubCalls:
        """The open clients.

        Raises:
            BackendError: the adapter is not open.
        """
        if self._calls is None:
            raise BackendError("pubsub adapter used before open()")
        return self._calls

    @property
    def subscription(self) -> str:
        """The subscription path this adapter consumes.

        Raises:
            QueueNotFound: the source is a topic (a producer cannot consume).
        """
        if self._subscription is None:
            raise QueueNotFound(
                f"pubsub: {self.source} is a topic; consuming needs a subscription of it "
                f"(gcloud pubsub subscriptions create SUB --topic {wire.short(self._topic)})"
            )
        return self._subscription

    # ----------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Find the source (subscription, else topic) and read its settings.

        Raises:
            ConfigError: a name Pub/Sub would refuse, or an id without a project.
            QueueNotFound: neither a subscription nor a topic of that name exists.
            BackendUnavailable: the endpoint did not answer within ``connect_timeout_s``.
        """
        if self._calls is not None:
            return
        source = self.source_name
        self._calls = calls = PubSubCalls(self.settings)
        try:
            self._project = await self._find_project()
            await self._resolve(calls, source)
        except BaseException:
            await self.close()
            raise

    async def _find_project(self) -> str | None:
        project = self.settings.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if project or self.calls.emulator:
            return project
        try:
            import google.auth

            _, found = await asyncio.to_thread(google.auth.default)
        except Exception as exc:  # no credentials: a full path still works
            logger.debug("no Application Default Credentials project: %s", exc)
            return None
        return str(found) if found else None

    async def _resolve(self, calls: PubSubCalls, source: str) -> None:
        timeout = self.settings.connect_timeout_s
        if wire.PATH_RE.match(source) and "/topics/" in source:
            self._topic = (await calls.get_topic(source, timeout)).name
        else:
            path = wire.path_of(source, "subscriptions", self._project)
            try:
                sub = await calls.get_subscription(path, timeout)
            except QueueNotFound:
                topic = wire.path_of(wire.short(source), "topics", self._project_of(path))
                try:
                    self._topic = (await calls.get_topic(topic, timeout)).name
                except QueueNotFound:
                    raise QueueNotFound(
                        f"pubsub: neither subscription {path} nor topic {topic} exists; create "
                        "them (gcloud pubsub topics create / subscriptions create) or fix the name"
                    ) from None
            else:
                self._take_subscription(sub)
        if self.error_topic:
            error = self.error_topic
            self._error_path = wire.path_of(error, "topics", self._project_of(self._topic))

    def _take_subscription(self, sub: types.Subscription) -> None:
        self._subscription, self._topic = sub.name, sub.topic
        self._ack_deadline_s = sub.ack_deadline_seconds or 10
        if sub.enable_message_ordering:
            self._gate = KeyGate(lambda m: m.receipt.ordering_key)
        policy = sub.dead_letter_policy
        self._counted = bool(policy.dead_letter_topic)
        if self._counted:
            self._max_attempts = policy.max_delivery_attempts or 5
            logger.info(
                "pubsub subscription %s has a dead-letter policy: Pub/Sub moves a message to %s "
                "after %d deliveries, whatever stalk's max_retries; keep it above max_retries + 1",
                sub.name, policy.dead_letter_topic, self._max_attempts,
            )  # fmt: skip

    def _project_of(self, path: str) -> str | None:
        match = wire.PATH_RE.match(path)
        return match.group(1) if match else self._project

    async def close(self) -> None:
        """Wait for settles under way, close the clients. Idempotent."""
        if self._calls is None:
            return
        if self._gate_task is not None:
            self._gate_task.cancel()
        if self._gate is not None:
            await self._give_back_quietly([m.receipt for m in self._gate.drain()])
        calls, self._calls = self._calls, None
        assert calls is not None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.call_timeout_s)
        await calls.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- deliveries
    def _lease_of(self, received: Any) -> Lease:
        """Return the lease of a raw protobuf ``ReceivedMessage`` (see ``PubSubCalls.pull``)."""
        raw = received.message
        published = raw.publish_time
        seconds = published.seconds
        attributes = raw.attributes
        return Lease(
            received.ack_id,
            raw.data,
            dict(attributes) if attributes else {},  # an empty map costs ~1 us to copy
            raw.ordering_key,
            received.delivery_attempt,
            seconds + published.nanos / 1e9 if seconds else None,
        )

    def _message_of(self, lease: Lease, message_id: str) -> Message:
        attrs = lease.attributes
        if not attrs:  # the common case, kept to a few microseconds
            counted = self._counted and lease.delivery_attempt > 0
            return Message(
                id=message_id, body=lease.data, attributes={},
                attempt=lease.delivery_attempt if counted else 1,
                enqueued_at=lease.publish_time, source=self.source or "", receipt=lease,
                deliveries_counted=counted,
            )  # fmt: skip
        carried = wire.carried_attempt(attrs)
        counted = self._counted and lease.delivery_attempt > 0
        enqueued = wire.number(attrs, wire.ATTR_ENQUEUED_AT)
        return Message(
            id=attrs.get(wire.ATTR_ID) or message_id,
            body=lease.data,
            attributes=wire.visible(attrs),
            attempt=carried + lease.delivery_attempt - 1 if counted else carried,
            enqueued_at=enqueued if enqueued is not None else lease.publish_time,
            source=self.source or "",
            receipt=lease,
            deliveries_counted=counted,
        )

    def _parked(self, lease: Lease) -> Coroutine[Any, Any, None] | None:
        """Return what to do with a parked copy that must not reach the handler yet, or None.

        Early: hide it for what remains. Due, but delivered more than once under a dead-letter
        policy (hops counted): republish it so its count starts again at 1.
        """
        if wire.ATTR_NOT_BEFORE not in lease.attributes:
            return None
        due = wire.number(lease.attributes, wire.ATTR_NOT_BEFORE)
        if due is None:
            return None
        remaining = due - time.time()
        if remaining > DUE_SLACK_S:
            near_limit = self._counted and lease.delivery_attempt + 1 >= self._max_attempts
            if near_limit:
                return self._refresh(lease, dict(lease.attributes))
            return self._hide_parked(lease, min(math.ceil(remaining), MAX_ACK_DEADLINE_S))
        if self._counted and lease.delivery_attempt > 1:
            attrs = {k: v for k, v in lease.attributes.items() if k != wire.ATTR_NOT_BEFORE}
            return self._refresh(lease, attrs)
        return None

    async def _hide_parked(self, lease: Lease, seconds: int) -> None:
        try:
            await self._modify([lease], seconds)
        except BackendError as exc:  # it comes back after its lease and is hidden then
            logger.warning("parked pubsub message not hidden again yet (%s)", exc)

    async def _refresh(self, lease: Lease, attributes: dict[str, str]) -> None:
        """Republish a parked copy as a fresh message (count from 1), then ack this one."""
        try:
            await self.calls.publish(self._topic, [self._pubsub_message(lease, attributes)])
        except BackendError as exc:
            logger.warning("parked pubsub message not republished yet (%s)", exc)
            return
        await self._ack_quietly([lease], "ack a republished parked copy")

    @staticmethod
    def _pubsub_message(lease: Lease, attributes: dict[str, str]) -> types.PubsubMessage:
        return types.PubsubMessage(
            data=lease.data, attributes=attributes, ordering_key=lease.ordering_key
        )

    # ----------------------------------------------------------------- ordering keys
    def _admit(self, messages: list[Message]) -> list[Message]:
        """Return what may go to the engine now; later messages of a busy key are held."""
        if self._gate is None:
            return messages
        if self._gate_task is None:
            self._gate_task = asyncio.get_running_loop().create_task(self._tend_held())
        return self._gate.admit(messages)

    @abc.abstractmethod
    def _hand(self, messages: list[Message]) -> None:
        """Give messages the gate let go to the engine (pull: next poll; streaming: now)."""

    def _settled(self, messages: Sequence[Message]) -> None:
        """The engine is done with ``messages`` (acked or routed): open their keys."""
        if self._gate is not None:
            ready = [n for m in messages for n in self._gate.done(m)]
            if ready:
                self._hand(ready)

    async def _tend_held(self) -> None:
        """Keep held messages leased, and open keys whose retried head never came back."""
        while self._calls is not None and self._gate is not None:
            lease_s = min(math.ceil(self.visibility_timeout_s), MAX_ACK_DEADLINE_S)
            await asyncio.sleep(max(0.5, lease_s / 2))
            held = [m.receipt.ack_id for m in self._gate.held()]
            if held and self._calls is not None:
                try:
                    await self.calls.modify(self.subscription, held, lease_s)
                except BackendError as exc:
                    logger.warning("pubsub: heartbeat of %d held message(s) failed (%s)",
                                   len(held), exc)  # fmt: skip
            ready = self._gate.overdue()
            if ready:
                self._hand(ready)

    async def _give_back_quietly(self, leases: Sequence[Lease]) -> None:
        if not leases or self._calls is None:
            return
        try:
            await self._modify(leases, 0)
        except BackendError as exc:  # they come back when their lease ends
            logger.warning("pubsub: could not give back %d message(s) (%s)", len(leases), exc)

    # ----------------------------------------------------------------- settling
    def _forget(self, leases: Sequence[Lease]) -> None:
        """``leases`` are settled: streaming mode frees their local slots; no-op in pull mode."""

    async def _modify(self, leases: Sequence[Lease], seconds: int) -> None:
        self._forget(leases)
        await self.calls.modify(self.subscription, [lease.ack_id for lease in leases], seconds)

    async def ack(self, messages: Sequence[Message]) -> None:
        """Acknowledge in one request per 2,500; a refused batch is retried one by one (a
        stale ack id spoils a whole request on the emulator), each refusal only logged."""
        leases = [m.receipt for m in messages]
        self._forget(leases)
        try:
            await self.calls.acknowledge(self.subscription, [lease.ack_id for lease in leases])
        except BackendUnavailable:
            raise
        except BackendError as exc:
            if len(leases) == 1:
                logger.warning("pubsub ack refused (%s); the message will be redelivered", exc)
            else:
                for lease in leases:
                    await self._ack_quietly([lease], "ack")
        self._settled(messages)

    async def _ack_quietly(self, leases: Sequence[Lease], what: str) -> None:
        """Ack after a copy was published: a failure only means a duplicate later, so it is
        logged, not raised (raising would make the engine route the message twice)."""
        self._forget(leases)
        try:
            await self.calls.acknowledge(self.subscription, [lease.ack_id for lease in leases])
        except BackendError as exc:
            logger.warning("pubsub %s failed (%s); it will be delivered again", what, exc)

    async def extend(self, message: Message, seconds: float) -> None:
        """Modack to ``seconds`` (at most 600); a failure is logged (best-effort heartbeat)."""
        lease: Lease = message.receipt
        try:
            await self.calls.modify(
                self.subscription, [lease.ack_id], min(math.ceil(seconds), MAX_ACK_DEADLINE_S)
            )
        except BackendError as exc:
            logger.warning("pubsub heartbeat of %s failed (%s)", message.id, exc)

    async def release(self, message: Message) -> None:
        """Modack 0: redelivered at once (a counted delivery under a dead-letter policy); held
        messages of its ordering key go back behind it."""
        await self._modify([message.receipt], 0)
        if self._gate is not None:
            await self._give_back_quietly([m.receipt for m in self._gate.released(message)])

    async def retry_later(self, message: Message, delay_s: float) -> None:
        """Modack the delay where Pub/Sub counts and it fits 600 s; else republish a copy
        with the next attempt (and a not-before time past 600 s or when uncounted), then ack.

        Raises:
            BackendError: the modack or the copy's publish failed; the original is untouched.
        """
        lease: Lease = message.receipt
        seconds = max(0, math.ceil(delay_s))
        if self._counted and seconds <= MAX_ACK_DEADLINE_S:
            await self._modify([lease], seconds)
            if self._gate is not None:
                self._gate.retried(message, delay_s)
            return
        attrs = dict(lease.attributes)
        attrs[ATTR_ATTEMPT] = str(message.attempt + 1)
        attrs[wire.ATTR_ID] = message.id
        if message.enqueued_at is not None:
            attrs[wire.ATTR_ENQUEUED_AT] = f"{message.enqueued_at:.6f}"
        if seconds > 0:
            attrs[wire.ATTR_NOT_BEFORE] = f"{time.time() + delay_s:.3f}"
        else:
            attrs.pop(wire.ATTR_NOT_BEFORE, None)
        await self.calls.publish(self._topic, [self._pubsub_message(lease, attrs)])
        await self._ack_quietly([lease], "ack after the retry copy")
        if self._gate is not None:
            self._gate.retried(message, delay_s)

    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Publish the body and the failure's attributes to the error topic, then ack.

        Raises:
            BackendError: the error topic refused the copy (or is missing); nothing acked.
        """
        lease: Lease = message.receipt
        if self._error_path is None:
            raise ConfigError("pubsub: no error topic (pass --error-topic)")
        attrs = wire.fit_attributes(wire.visible(lease.attributes), failure.to_attributes())
        await self.calls.publish(
            self._error_path, [types.PubsubMessage(data=lease.data, attributes=attrs)]
        )
        await self._ack_quietly([lease], "ack after the error copy")
        self._settled([message])

    # ----------------------------------------------------------------- producing, counting
    def _outgoing(
        self, body: bytes, attributes: Mapping[str, str] | None, delay_s: float
    ) -> types.PubsubMessage:
        own = dict(attributes or {})
        key = own.pop(ATTR_ORDERING_KEY, "")
        if delay_s > 0:
            own[wire.ATTR_NOT_BEFORE] = f"{time.time() + delay_s:.3f}"
        if not body and not own and not key:
            # Pub/Sub refuses a message with neither data nor attributes ("Some messages are
            # empty"); the publish time, an attribute the adapter hides, lets b"" round-trip.
            own[wire.ATTR_ENQUEUED_AT] = f"{time.time():.3f}"
        wire.check_attributes(own)
        size = len(body) + len(key) + sum(len(k) + len(v) for k, v in own.items())
        if size > wire.MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"pubsub message of {size} bytes is over the 10 MB limit")
        return types.PubsubMessage(data=body, attributes=own, ordering_key=key)

    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        """Publish to the source's topic; a delay rides as ``stalk-not-before``.

        Raises:
            ConfigError: attributes the service would refuse.
            MessageTooLarge: over 10 MB.
            BackendError: the topic refused it or is unreachable.
        """
        ids = await self.calls.publish(self._topic, [self._outgoing(body, attributes, delay_s)])
        return ids[0]

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """Publish ``bodies`` in requests of up to 1,000; return their ids."""
        messages = [self._outgoing(body, attributes, delay_s) for body in bodies]
        return await self.calls.publish(self._topic, messages)

    async def backlog(self) -> Backlog | None:
        """Pub/Sub's API tells no counts (Cloud Monitoring's ``num_undelivered_messages``
        does): every count is None, said once in the log."""
        if not self._said_no_counts:
            self._said_no_counts = True
            logger.warning(
                "pubsub: the Pub/Sub API has no backlog counts; see Cloud Monitoring's "
                "subscription/num_undelivered_messages and oldest_unacked_message_age"
            )
        return Backlog()
