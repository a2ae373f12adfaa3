"""NSQ adapter on pynsq: push delivery by RDY, delays and attempts kept in nsqd.

Source and flow control
    ``--source TOPIC --option channel=NAME`` (default ``stalk``). One pynsq Reader per adapter
    (:mod:`stalk.collectors.nsq.client`), ``max_in_flight`` = the engine's concurrency, sent as
    RDY at once on ``set_max_in_flight`` (scale); ``pause`` = RDY 0 (delivered messages stay
    ackable), ``resume`` = RDY back.

Leases and attempts
    IDENTIFY asks ``msg_timeout`` = the engine's ``visibility_timeout_s`` (or ``msg_timeout_s``),
    clamped to nsqd's ``--max-msg-timeout``; an unsettled message comes back by itself after it.
    The engine's heartbeat is ``TOUCH``, which restarts that lease. ``attempt`` = nsqd's
    ``attempts``, which rises on every delivery, including after a dead worker, so the engine's
    poison rule works (``deliveries_counted``). ``redelivered`` stays False: nsqd does not tell
    a delivery after a REQ from one after a lapsed lease; ``attempt`` counts both.

Settling
    ``ack`` = FIN, ``release`` = ``REQ 0``: nsqd counts the redelivery as an attempt (nsqd has no
    way to give a message back uncounted). ``retry_later`` = ``REQ`` with the delay in ms, without
    pynsq's backoff: the delay lives in nsqd and survives a worker crash. nsqd clamps REQ to
    ``--max-req-timeout`` (1 h) silently and refuses a longer DPUB (``E_INVALID``, connection
    closed), so a longer delay is parked: a DPUB copy of at most that long, whose envelope
    carries the due time and the next attempt, is re-parked until due, and the original is FINed
    once nsqd answered ``OK``. ``publish_error`` publishes the enveloped copy to the error topic
    (default ``<topic>-errors``), waits for ``OK``, then FINs the original. A message whose
    connection died is not held any more (nsqd redelivers it): settling it raises or is skipped.

Reading on request (``stalk peek``, ``stalk redrive``)
    :meth:`NSQAdapter.fetch` subscribes the channel with RDY = what it may take and collects
    what nsqd sends in its burst. A channel consumes what it reads, so a peek gives messages back
    with ``REQ 0``, which nsqd counts as an attempt (it has no uncounted give-back); a redrive
    FINs each one after its copy was published.

Shutdown
    ``close`` sends RDY 0, ``REQ 0`` for every message still held, ``CLS``, waits for nsqd's
    ``CLOSE_WAIT`` (so the REQs are done) and closes: nothing waits for its msg_timeout.

Reconnect
    A lost nsqd is redialled every ``reconnect_interval_s``; what it held comes back by its
    lease. An nsqd unreachable at ``open`` is :class:`BackendUnavailable` in one line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from stalk.collectors.base import AdapterFeatures, Backlog, Deliver, PushAdapter
from stalk.collectors.nsq import envelope, http
from stalk.collectors.nsq.publisher import DEFAULT_NSQD, Publisher
from stalk.collectors.nsq.reader import Reader
from stalk.collectors.nsq.settings import NAME_RE, NSQSettings
from stalk.errors import BackendError, ConfigError
from stalk.message import Failure, Message

logger = logging.getLogger(__name__)

#: How long :meth:`NSQAdapter.fetch` waits for the first message of a burst, and for each next.
FETCH_FIRST_WAIT_S = 1.0
FETCH_NEXT_WAIT_S = 0.2

#: A parked copy this close to its due time is delivered rather than parked again.
DUE_SLACK_S = 0.5

NSQ_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=None,  # longer than max-req-timeout is parked in nsqd, not refused
    delay_precision_s=5.5,  # 0.1 s scan; a channel younger than 5 s is not scanned yet
    ordering=False,
    persistent=True,  # on a clean restart; see docs/nsq.md for SIGKILL and --mem-queue-size
    visibility_timeout=True,
    release_keeps_attempt=False,  # a REQ is a delivery: nsqd raises ``attempts`` on the next one
    backlog=True,
    binary_body=True,
)


class Held:
    """A delivered nsq message and the connection it came on: the receipt of a Message."""

    __slots__ = ("conn", "raw")

    def __init__(self, raw: Any, conn: Any) -> None:
        self.raw = raw
        self.conn = conn

    def live(self) -> bool:
        """True while this delivery can still be settled (unsettled, connection up)."""
        return not self.raw.has_responded() and bool(self.conn.connected())


class NSQAdapter(PushAdapter):
    """Consume an NSQ topic on a channel; the module docstring has the scheme."""

    name: ClassVar[str] = "nsq"
    features: ClassVar[AdapterFeatures] = NSQ_FEATURES
    settings_model = NSQSettings

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: NSQSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.settings = settings if settings is not None else NSQSettings()
        self._publisher: Publisher | None = None
        self._reader: Reader | None = None
        self._deliver: Deliver | None = None
        self._max_in_flight = 1
        self._paused = False
        self._held: set[Held] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetched: list[Message] = []
        self._fetch_arrived = asyncio.Event()

    def describe(self) -> str:
        """Return ``nsq:<topic>/<channel> (nsqd ...)``."""
        where = self.settings.nsqd or self.settings.lookupd or DEFAULT_NSQD
        return f"nsq:{self.source}/{self.settings.channel} ({where})"

    @property
    def _topic(self) -> str:
        if not self.source:
            raise ConfigError("backend 'nsq' needs a source: pass --source TOPIC")
        return self.source

    @property
    def _errors(self) -> str:
        return self.error_topic or self.default_error_topic(self._topic)

    def _ready(self) -> Publisher:
        if self._publisher is None:
            raise BackendError(f"{self.describe()} is not open")
        return self._publisher

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Check names, find nsqd, connect the publishing connection.

        Raises:
            ConfigError: a topic name nsqd would refuse, or a lease that lapses between two
                heartbeats (the engine TOUCHes every ``visibility_timeout_s / 2``).
            BackendUnavailable: no nsqd answers within ``connect_timeout_s``.
        """
        if self._publisher is not None:
            return
        for topic in (self._topic, self._errors):
            if not NAME_RE.match(topic):
                raise ConfigError(f"nsq topic {topic!r}: 1-64 of [.a-zA-Z0-9_-] (#ephemeral)")
        lease_s = self.settings.lease_s(self.visibility_timeout_s)
        if lease_s <= self.visibility_timeout_s / 2:
            raise ConfigError(
                f"nsq lease {lease_s:g}s (msg_timeout, at most max_msg_timeout_s="
                f"{self.settings.max_msg_timeout_s:g}) lapses before the heartbeat every "
                f"{self.visibility_timeout_s / 2:g}s: lower visibility_timeout_s or raise "
                "nsqd's --max-msg-timeout and the max_msg_timeout_s option"
            )
        self._publisher = await Publisher.connect(self.settings)

    async def close(self) -> None:
        """Give back what is held (REQ 0), say goodbye, close. Idempotent."""
        reader, self._reader = self._reader, None
        publisher, self._publisher = self._publisher, None
        for task in list(self._tasks):
            task.cancel()
        if reader is not None:
            reader.apply_rdy(0)
            for held in list(self._held):
                self._settle(held, "requeue")
            try:
                await reader.goodbye()
            except (TimeoutError, OSError) as exc:
                logger.debug("%s: goodbye: %r", self.describe(), exc)
            reader.close()
        self._held.clear()
        if publisher is not None:
            publisher.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ flow control
    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        """Subscribe with RDY ``max_in_flight``; each message goes to ``deliver`` on the loop."""
        self._deliver = deliver
        self._max_in_flight = max(1, max_in_flight)
        if self._reader is not None:
            return
        s = self.settings
        self._reader = Reader(
            self._topic,
            s.channel,
            self._on_raw,
            nsqd=s.nsqd_addresses() or ([] if s.lookupd else self._ready().addresses),
            lookupd=s.lookupd_addresses(),
            max_in_flight=self._max_in_flight,
            msg_timeout_s=s.lease_s(self.visibility_timeout_s),
            reconnect_interval_s=s.reconnect_interval_s,
            lookupd_poll_interval_s=s.lookupd_poll_interval_s,
        )
        if self._paused:  # paused before the first start: subscribe, but at RDY 0
            self._reader.apply_rdy(0)

    async def pause(self) -> None:
        """RDY 0 on every connection; held messages stay ackable."""
        self._paused = True
        if self._reader is not None:
            self._reader.apply_rdy(0)

    async def resume(self) -> None:
        """RDY back to ``max_in_flight``. Idempotent."""
        self._paused = False
        if self._reader is not None:
            self._reader.apply_rdy(self._max_in_flight)

    async def set_max_in_flight(self, n: int) -> None:
        """Change RDY live; while paused, only remember it for ``resume``."""
        self._max_in_flight = max(1, n)
        if self._reader is not None and not self._paused:
            self._reader.apply_rdy(self._max_in_flight)

    # ------------------------------------------------------------------ reading on request
    async def fetch(self, max_messages: int) -> list[Message]:
        """Take up to ``max_messages`` ready messages of the channel; ``[]`` when none comes.

        nsqd pushes: RDY is raised by ``max_messages`` over what is already held, what arrives
        is taken, then RDY drops to 0 so nothing more comes (held messages stay ackable). Where
        nsqd's ``/stats`` answers, its ready count (read before RDY rises) says how many to wait
        for, each up to ``connect_timeout_s`` (a fresh subscription on a busy host is slow);
        without it, a burst ends after a short quiet. Late arrivals wait for the next call.
        """
        target, wait, next_wait = max_messages, FETCH_FIRST_WAIT_S, FETCH_NEXT_WAIT_S
        if len(self._fetched) < max_messages:
            counts = await self.backlog()
            if counts is not None:
                target = min(max_messages, len(self._fetched) + (counts.ready or 0))
                wait = next_wait = FETCH_FIRST_WAIT_S + self.settings.connect_timeout_s
        if len(self._fetched) < target:
            if self._reader is None:
                self._paused = False
                await self.start(self._keep_fetched, len(self._held) + max_messages)
            else:
                self._max_in_flight = len(self._held) + max_messages
                self._reader.apply_rdy(self._max_in_flight)
        while len(self._fetched) < target:
            self._fetch_arrived.clear()
            try:
                await asyncio.wait_for(self._fetch_arrived.wait(), wait)
            except TimeoutError:
                break
            wait = next_wait
        taken, self._fetched = self._fetched[:max_messages], self._fetched[max_messages:]
        if self._reader is not None:  # RDY 0: a FIN or REQ of what is held must not pull more
            self._paused = True
            self._reader.apply_rdy(0)
        return taken

    def _keep_fetched(self, message: Message) -> None:
        self._fetched.append(message)
        self._fetch_arrived.set()

    async def settle_fetched(self, messages: Sequence[Message], *, ack: bool) -> None:
        """FIN fetched messages, or ``REQ 0`` them: nsqd counts that as an attempt."""
        if ack:
            self.ack_nowait(messages)
            return
        for message in messages:
            self._settle(message.receipt, "requeue")

    # ------------------------------------------------------------------ deliveries
    def _on_raw(self, conn: Any, raw: Any) -> None:
        body, attrs = envelope.unwrap(raw.body)
        held = Held(raw, conn)
        self._held.add(held)
        due = envelope.number(attrs, envelope.KEY_DUE_AT)
        if due is not None and due - time.time() > DUE_SLACK_S:
            self._spawn(self._repark(held, due))
            return
        first = envelope.number(attrs, envelope.KEY_ATTEMPT)
        enqueued = envelope.number(attrs, envelope.KEY_ENQUEUED_AT)
        message = Message(
            id=attrs.get(envelope.KEY_ID) or raw.id.decode(errors="replace"),
            body=body,
            attributes={k: v for k, v in attrs.items() if k not in envelope.INTERNAL_KEYS},
            attempt=int(first or 1) + raw.attempts - 1,
            enqueued_at=enqueued if enqueued is not None else raw.timestamp / 1e9,
            source=self._topic,
            receipt=held,
            deliveries_counted=True,
        )
        if self._deliver is None:  # cannot happen: the reader exists only after start()
            self._settle(held, "requeue")
            return
        self._deliver(message)

    async def _repark(self, held: Held, due: float) -> None:
        """Park a copy that is not due yet again, as it is (same envelope), then FIN it."""
        try:
            await self._ready().dpub(self._topic, held.raw.body, due - time.time())
            self._settle(held, "finish")
        except BackendError as exc:
            logger.warning("could not park message %s again (%s)", held.raw.id, exc)
            self._settle(held, "requeue", int(self.settings.reconnect_interval_s * 1000))

    # ------------------------------------------------------------------ settling
    def _settle(self, held: Held, how: str, time_ms: int = 0) -> bool:
        """FIN, REQ or TOUCH ``held`` if it is still live; False when it is not."""
        if not held.live():
            self._held.discard(held)
            return False
        if how == "touch":
            held.raw.touch()
            return True
        self._held.discard(held)
        if how == "finish":
            held.raw.finish()
        else:
            held.raw.requeue(time_ms=time_ms, backoff=False)  # backoff is the engine's
        return True

    def _holds(self, message: Message) -> Held:
        held: Held = message.receipt
        if not held.live():
            raise BackendError(f"message {message.id} is no longer held; nsqd redelivers it")
        return held

    async def ack(self, messages: Sequence[Message]) -> None:
        """FIN each, one write per connection (nsqd never answers a FIN)."""
        self.ack_nowait(messages)

    def ack_nowait(self, messages: Sequence[Message]) -> None:
        """FIN each, one write per connection; one already settled or whose connection died
        (nsqd redelivers it) is skipped."""
        batch = []
        for message in messages:
            held: Held = message.receipt
            self._held.discard(held)
            batch.append((held.conn, held.raw))
        done = Reader.finish_many(batch)
        if done < len(batch):
            logger.debug("%d FINs skipped: already settled or connection lost", len(batch) - done)

    async def release(self, message: Message) -> None:
        """REQ 0: redelivered at once; nsqd counts that delivery as an attempt."""
        self._settle(message.receipt, "requeue")

    async def extend(self, message: Message, seconds: float) -> None:
        """TOUCH: nsqd restarts the lease at its full msg_timeout (``seconds`` is not sent)."""
        self._settle(message.receipt, "touch")

    async def retry_later(self, message: Message, delay_s: float) -> None:
        """REQ with the delay; over max-req-timeout, park a copy and FIN the original.

        Raises:
            BackendError: the message is no longer held, or the parked copy was refused.
        """
        held = self._holds(message)
        if delay_s <= self.settings.max_req_timeout_s:
            self._settle(held, "requeue", max(0, round(delay_s * 1000)))
            return
        attrs = {
            **message.attributes,
            envelope.KEY_ATTEMPT: str(message.attempt + 1),
            envelope.KEY_DUE_AT: f"{time.time() + delay_s:.3f}",
            envelope.KEY_ID: message.id,
        }
        if message.enqueued_at is not None:
            attrs[envelope.KEY_ENQUEUED_AT] = f"{message.enqueued_at:.6f}"
        publisher = self._ready()
        await publisher.dpub(self._topic, publisher.payload(message.body, attrs), delay_s)
        self._settle(held, "finish")

    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Publish the enveloped copy to the error topic, wait for OK, then FIN the original.

        Raises:
            BackendError: nothing was published (or not confirmed); the original is untouched.
        """
        held = self._holds(message)
        publisher = self._ready()
        data = publisher.payload(message.body, {**message.attributes, **failure.to_attributes()})
        await publisher.send("pub", self._errors, data)
        self._settle(held, "finish")

    # ------------------------------------------------------------------ publishing
    async def publish(
        self, body: bytes, attributes: Mapping[str, str] | None = None, delay_s: float = 0.0
    ) -> str:
        """PUB (DPUB with a delay) to the source topic, confirmed by nsqd's OK.

        Returns:
            a local id: nsqd does not tell the id it assigns.

        Raises:
            MessageTooLarge: over ``max_message_bytes`` (checked before sending).
            BackendError: nsqd refused it or is unreachable.
        """
        publisher = self._ready()
        await publisher.publish(self._topic, publisher.prepare(body, attributes, delay_s), delay_s)
        return uuid.uuid4().hex

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """MPUB in as few commands as ``max_body_bytes`` allows (DPUB each with a delay)."""
        publisher = self._ready()
        datas = [publisher.prepare(b, attributes, delay_s) for b in bodies]
        await publisher.publish_many(self._topic, datas, delay_s)
        return [uuid.uuid4().hex for _ in datas]

    async def backlog(self) -> Backlog | None:
        """Counts of the channel (depth, deferred, in flight) and the error topic from /stats."""
        address = self.settings.http_address()
        if not address:
            return None
        timeout = self.settings.connect_timeout_s
        chan = await asyncio.to_thread(
            http.stats, address, self._topic, self.settings.channel, timeout
        )
        errors = await asyncio.to_thread(http.topic_depth, address, self._errors, timeout)
        if chan is None:
            return Backlog(ready=0, delayed=0, in_flight=0, errors=errors or 0)
        return Backlog(
            ready=chan.depth, delayed=chan.deferred, in_flight=chan.in_flight, errors=errors or 0
        )
