"""The seam between the engine and a broker: two small abstract bases.

An adapter knows how to talk to one broker and nothing else: no retry counting, no backoff, no
routing decisions. The engine (:class:`stalk.BaseCollector`) calls these methods from its asyncio
loop. Adapters over blocking SDKs run their calls in a thread (``asyncio.to_thread``) so the loop
never stalls.

Every method below may raise :class:`stalk.errors.BackendError` (or a subclass) when the broker
refuses or is unreachable; the engine logs it, backs off and tries again, and never acks a
message whose retry or error publish raised.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, final, runtime_checkable

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from stalk.errors import ConfigError
from stalk.message import Failure, Message


@dataclass(frozen=True, slots=True)
class AdapterFeatures:
    """What a backend guarantees, so the conformance suite knows what to expect of it.

    Attributes:
        native_delay: the broker holds a retry until it is due (nothing kept in worker memory).
        max_delay_s: longest single delay the broker takes; ``None`` = no limit.
        delay_precision_s: how late a delayed message may arrive beyond its delay.
        ordering: one consumer at concurrency 1 gets messages in publish order (per queue or
            group); retries and redeliveries may reorder.
        persistent: messages survive a broker restart.
        visibility_timeout: an unacked message comes back by itself after a lease expires.
        release_keeps_attempt: a released message comes back with the attempt it had (False
            where the broker counts every delivery it hands out, as SQS and RabbitMQ do).
        backlog: ``backlog()`` returns counts.
        binary_body: any bytes survive the trip; False where the broker takes text only (SQS).
        max_batch: most messages one ``get_messages`` call (or one ack) may carry; the engine's
            lease size unless ``batch_size`` says otherwise.
    """

    native_delay: bool = True
    max_delay_s: float | None = None
    delay_precision_s: float = 1.0
    ordering: bool = False
    persistent: bool = True
    visibility_timeout: bool = True
    release_keeps_attempt: bool = True
    backlog: bool = False
    binary_body: bool = True
    max_batch: int = 10


@dataclass(frozen=True, slots=True)
class Backlog:
    """Counts a broker can tell about a source; ``None`` where it cannot.

    Attributes:
        ready: visible, waiting for a consumer.
        delayed: waiting for their delay (retries and ``send --delay``).
        in_flight: leased by some consumer, not yet acked.
        errors: depth of the error topic.
        oldest_age_s: age of the oldest message waiting.
    """

    ready: int | None = None
    delayed: int | None = None
    in_flight: int | None = None
    errors: int | None = None
    oldest_age_s: float | None = None

    def as_dict(self) -> dict[str, int | float | None]:
        """Return the counts for ``stalk stats --json``."""
        return {
            "ready": self.ready,
            "delayed": self.delayed,
            "in_flight": self.in_flight,
            "errors": self.errors,
            "oldest_age_s": self.oldest_age_s,
        }


class AdapterSettings(BaseSettings):
    """Base of each adapter's settings; subclasses set ``env_prefix="STALK_<BACKEND>_"``.

    Values come from ``--option KEY=VALUE`` first, then the environment, then defaults.
    """

    model_config = SettingsConfigDict(extra="forbid")


def build_settings(
    model: type[AdapterSettings], backend: str, options: Mapping[str, str]
) -> AdapterSettings:
    """Validate ``--option`` pairs (and environment variables) into an adapter's settings.

    A value ``@PATH`` is read from that file (trailing newline removed), so a secret such as
    ``url=@/run/secrets/amqp`` never shows in ``ps``; ``@@text`` stands for a literal ``@text``.

    Raises:
        ConfigError: one line naming the bad key or value and the accepted keys.
    """
    values = {key: read_value(key, value) for key, value in options.items()}
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "?"
        accepted = ", ".join(sorted(model.model_fields)) or "none"
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"backend {backend!r} has no option {key!r}; accepted options: {accepted}"
            ) from None
        raise ConfigError(
            f"backend {backend!r} option {key}={first.get('input')!r}: {first['msg']}"
        ) from None


def read_value(key: str, value: str) -> str:
    """Return an option value, reading ``@PATH`` from the file (``@@x`` is a literal ``@x``).

    Raises:
        ConfigError: the file cannot be read, naming the option and the path.
    """
    if not isinstance(value, str) or not value.startswith("@"):
        return value
    if value.startswith("@@"):
        return value[1:]
    path = value[1:]
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"option {key}=@{path}: cannot read the file ({reason})") from None


class Adapter(abc.ABC):
    """What both delivery styles share: lifecycle, settling messages and publishing.

    Configured in one place: ``__init__(source, *, error_topic=None, settings=None)``, where
    ``settings`` is an instance of ``settings_model`` (``None``: read from the environment and
    defaults). :meth:`from_options` builds it from ``--option`` pairs; adapters do not override
    it. The engine alone calls :meth:`bind`, to apply its own options.

    Class attributes:
        name: the ``--backend`` name.
        features: what the broker guarantees (see :class:`AdapterFeatures`).
        settings_model: the pydantic model of this backend's ``--option`` keys.
    """

    name: ClassVar[str] = "?"
    features: ClassVar[AdapterFeatures] = AdapterFeatures()
    settings_model: ClassVar[type[AdapterSettings]] = AdapterSettings

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: AdapterSettings | None = None,
    ) -> None:
        self.source = source
        self._error_topic = error_topic
        #: Lease a received message gets; the engine sets it from its options in :meth:`bind`
        #: and heartbeats before it lapses.
        self.visibility_timeout_s = 30.0

    @property
    def error_topic(self) -> str | None:
        """Where failed messages go: as given, else :meth:`default_error_topic` of the source."""
        if self._error_topic:
            return self._error_topic
        return self.default_error_topic(self.source) if self.source else None

    @error_topic.setter
    def error_topic(self, value: str | None) -> None:
        self._error_topic = value

    @property
    def source_name(self) -> str:
        """The source, for adapters about to use it.

        Raises:
            ConfigError: none was given.
        """
        if not self.source:
            raise ConfigError(f"backend {self.name!r} needs a source: pass --source NAME")
        return self.source

    @classmethod
    def from_options(
        cls, source: str | None, error_topic: str | None, options: Mapping[str, str]
    ) -> Self:
        """Build the adapter from CLI ``--option`` pairs (and ``STALK_<BACKEND>_*`` variables).

        Raises:
            ConfigError: an unknown key or bad value.
        """
        settings = build_settings(cls.settings_model, cls.name, options)
        return cls(source, error_topic=error_topic, settings=settings)

    @final
    def bind(
        self,
        source: str | None,
        error_topic: str | None,
        visibility_timeout_s: float | None = None,
    ) -> None:
        """Apply the engine's options where they are set: source, error topic, lease length.

        Called by the engine before :meth:`open`; not a configuration path for adapters (the
        retry limit, for one, never reaches an adapter: policy lives in the engine).

        Raises:
            ConfigError: no source at all.
        """
        if source is not None:
            self.source = source
        if error_topic is not None:
            self.error_topic = error_topic
        if visibility_timeout_s is not None:
            self.visibility_timeout_s = visibility_timeout_s
        self.source_name  # noqa: B018 - raises the one-line error now, not at the first poll

    def default_error_topic(self, source: str) -> str:
        """Name the error topic when none was given: ``<source>-errors``."""
        return f"{source}-errors"

    def describe(self) -> str:
        """Return a short, credential-free description for logs and ``/status``."""
        return f"{self.name}:{self.source}"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, and check that the source exists.

        Called once before any other method. May block on the network for the SDK's own connect
        timeout.

        Raises:
            BackendUnavailable: the broker cannot be reached (say where and what to check).
            QueueNotFound: the source does not exist (say how to create it).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent; must not raise for an adapter never opened."""

    @abc.abstractmethod
    async def ack(self, messages: Sequence[Message]) -> None:
        """Delete handled messages, in one broker call where the broker allows a batch.

        An ack the broker refuses (expired receipt, stale lease) is logged, not raised: the
        message will be redelivered, which at-least-once allows. Raise only when the broker is
        unreachable, so the engine can log and keep the message un-acked.
        """

    @abc.abstractmethod
    async def retry_later(self, message: Message, delay_s: float) -> None:
        """Make ``message`` deliverable again after ``delay_s`` seconds with ``attempt + 1``.

        The delay must live in the broker (visibility change, TTL queue, delayed publish), not in
        worker memory, so it survives a crash. Delays over ``features.max_delay_s`` are the
        adapter's to chain or cap. A delay of 0 is also how the engine has a redelivery counted
        where the broker cannot count it (``Message.deliveries_counted`` False).

        Settles the original, as :meth:`publish_error` does: when this returns, the original is
        either the very message made invisible for the delay, or a copy is confirmed and the
        adapter has acked the original. The engine never acks it afterwards.

        Raises:
            BackendError: nothing was changed; the engine leaves the message to redelivery.
        """

    @abc.abstractmethod
    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Move ``message`` to the error topic: body untouched, ``failure`` as metadata.

        Settles the original, as :meth:`retry_later` does: return only once the broker has the
        copy (confirm, 200, commit) and the original is gone from the source (moved in one
        transaction, or acked after the confirmed copy). The engine never acks it afterwards.
        Called by the engine only: an adapter never routes a message itself.

        Raises:
            BackendError: nothing was published and the original is untouched; the engine
                leaves it to redelivery.
        """

    async def extend(self, message: Message, seconds: float) -> None:  # noqa: B027
        """Keep ``message`` leased ``seconds`` more (heartbeat); no-op where leases never lapse."""

    @abc.abstractmethod
    async def release(self, message: Message) -> None:
        """Give an unprocessed message back for immediate redelivery (shutdown, abandonment).

        The attempt count must not go up for a message that was never handled where the broker
        allows it. Idempotent.
        """

    @abc.abstractmethod
    async def publish(
        self,
        body: bytes,
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Publish a new message to the source (producer side: ``stalk send``, tests, redrive).

        Returns:
            the broker's message id.

        Raises:
            MessageTooLarge, QueueFull, BackendError.
        """

    async def backlog(self) -> Backlog | None:
        """Return counts of the source where the broker can tell; ``None`` where it cannot."""
        return None


class PollingAdapter(Adapter):
    """An adapter the engine asks for messages (SQS, SQLite, Pub/Sub pull)."""

    @abc.abstractmethod
    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        """Lease up to ``max_messages`` visible messages.

        Blocks at most ``wait_s`` seconds (long poll where the broker has one; returning at once
        is fine too, the engine then sleeps the rest). Returns an empty list when none are
        visible. Each message comes back leased for the visibility timeout, with ``attempt`` set.

        Raises:
            BackendUnavailable: the engine backs off and calls again; never a crash loop.
        """


#: The engine's delivery callback for push adapters; called on the engine's event loop.
Deliver = Callable[[Message], None]


class PushAdapter(Adapter):
    """An adapter whose broker pushes messages (AMQP, NSQ, Pub/Sub streaming pull)."""

    @abc.abstractmethod
    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        """Begin delivery: call ``deliver(message)`` on the engine's loop for each message.

        The broker must not push more than ``max_in_flight`` unsettled messages (prefetch, RDY,
        flow control). Returns once delivery is set up.
        """

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop new deliveries (sleep, drain); messages already delivered stay ackable."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Start deliveries again after :meth:`pause`. Idempotent."""

    @abc.abstractmethod
    async def set_max_in_flight(self, n: int) -> None:
        """Change the broker-side in-flight limit live (``scale(n)``)."""

    #: Set by the engine (:meth:`watch_delivery`): told why delivery is not running though it
    #: should, and ``None`` once it runs again; /healthz fails meanwhile.
    _delivery_watch: Callable[[str | None], None] | None = None

    def watch_delivery(self, report: Callable[[str | None], None]) -> None:
        """Have :meth:`report_delivery` call ``report`` (the engine, before :meth:`start`)."""
        self._delivery_watch = report

    def report_delivery(self, problem: str | None) -> None:
        """Tell the engine why delivery stopped though it should run (a consumer the broker lost
        and the adapter has not registered again yet), or ``None`` once it runs again."""
        if self._delivery_watch is not None:
            self._delivery_watch(problem)


@runtime_checkable
class ImmediateAck(Protocol):
    """An adapter whose ack is a write the broker never answers (NSQ's ``FIN``).

    The engine batches acks per loop turn, which costs a loop turn per message when only one is
    in flight (a consumer at concurrency 1 waits for it: RDY 1 means nsqd sends the next message
    only after the ``FIN``). With nothing else in flight to batch with, the engine calls this
    instead of :meth:`Adapter.ack`, at once and on the loop.
    """

    def ack_nowait(self, messages: Sequence[Message]) -> None:
        """Ack ``messages`` without waiting; must not block. Same rules as :meth:`Adapter.ack`."""
        ...


@runtime_checkable
class AckAndLease(Protocol):
    """A polling adapter that acks a batch and leases the next one in one broker call (the
    local backend: one SQLite transaction and one hop to its database thread instead of two).

    The engine hands the acks of a loop turn to this call when it would poll right after them
    anyway; otherwise it calls :meth:`Adapter.ack` and ``get_messages`` as usual.
    """

    async def ack_and_get_messages(
        self, acks: Sequence[Message], max_messages: int
    ) -> list[Message]:
        """Ack ``acks`` (same rules as :meth:`Adapter.ack`), then lease up to ``max_messages``
        visible messages without waiting (as ``get_messages(max_messages, 0)``).

        Raises:
            BackendError: nothing was acked and nothing leased (the acks are redelivered).
        """
        ...


@runtime_checkable
class BatchPublisher(Protocol):
    """An adapter that publishes many bodies in one broker call (``stalk send`` with several)."""

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """Publish ``bodies`` together (all or nothing where the broker allows); return ids."""
        ...


@runtime_checkable
class TopicAdmin(Protocol):
    """An adapter whose sources can subscribe to topics (fan-out), with counts per subscription."""

    async def topic_stats(self, topic: str | None = None) -> Mapping[str, Backlog]:
        """Return a :class:`Backlog` per subscription of ``topic``."""
        ...

    async def subscribe(self, topic: str, queue: str | None = None) -> None:
        """Subscribe ``queue`` (default: the source) to ``topic``."""
        ...


@runtime_checkable
class Fetcher(Protocol):
    """A push adapter that can also take messages on request, one call per batch (AMQP's
    ``basic.get``): how ``stalk peek`` and ``stalk redrive`` read a queue nobody consumes.

    What :meth:`fetch` returns is held until :meth:`settle_fetched` acks (``ack=True``) or
    requeues it (``ack=False``), or until the adapter closes (requeued).
    """

    async def fetch(self, max_messages: int) -> list[Message]:
        """Take up to ``max_messages`` ready messages of the source; ``[]`` when none."""
        ...

    async def settle_fetched(self, messages: Sequence[Message], *, ack: bool) -> None:
        """Ack fetched messages, or give them back in place (attempts unchanged)."""
        ...


def attributes_of(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """Return a broker's metadata mapping as ``str -> str``, skipping what is not text-like.

    Outside producers send headers of other types (ints, bytes, nested tables); a consumer must
    not crash on them, as the Go Stalk did on a missing attribute.
    """
    if not raw:
        return {}
    out: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            try:
                out[str(key)] = value.decode()
            except UnicodeDecodeError:
                continue
        elif isinstance(value, str | int | float | bool):
            out[str(key)] = str(value)
    return out
