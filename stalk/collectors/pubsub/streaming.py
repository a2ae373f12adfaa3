"""``mode=streaming``: a StreamingPull on the adapter's own grpc.aio channel pushes (push intake).

Delivery
    One bidirectional ``StreamingPull`` call (:meth:`PubSubCalls.streaming_pull`), read by a task
    on the engine's loop: no library threads, no thread hops. The initial request asks for
    ``max_outstanding_messages`` (at least ``flow_messages``) and a stream ack deadline of the
    engine's lease (Pub/Sub's floor of 10 s, at most 600 s); a lease under 10 s is set on each
    delivered batch with one modack before the engine sees it, as pull mode does. The adapter
    passes at most ``max_in_flight`` to the engine; any the stream delivers beyond that (the
    emulator ignores the outstanding limit; after a scale down) wait here, modacked every half
    lease, until a slot frees. A request carrying the stream ack deadline goes out every 30 s,
    as the client library's heartbeat does, so the service keeps the stream.

Closing a stream
    A stream ends with a half-close (``done_writing``): the server ends it and stops delivering
    to it at once. Measured on the emulator: a *cancelled* StreamingPull (what the client
    library's ``future.cancel()`` sends) stays a delivery target for ~10-20 s, so whatever was
    released or came due in that window went to the dead stream and came back only after the
    ack deadline with a counted attempt; after a half-close the next stream gets it at once.
    Only a server that does not end the stream within ``CLOSE_TIMEOUT_S`` is cancelled.

Settling
    Every settle is a unary call of the adapter's grpc.aio client (see
    :mod:`stalk.collectors.pubsub.adapter`); the stream only delivers. Nothing held depends on
    the stream, so nothing is lost on sleep or shutdown.

Flow control, sleep, wake
    ``set_max_in_flight(n)`` above the open stream's limit opens a new stream with ``n`` (the
    service sends at most the limit of the initial request) and closes the old one; what the old
    one still delivers while closing is handled as usual. At or below it only the local limit
    changes. ``pause`` closes the stream (held messages stay ackable; waiting ones and any that
    arrive while it closes are given back at once), ``resume`` opens a new one.

Lost streams
    A stream that ends by itself (an emulator restart loses the subscription: ``NotFound``; an
    endpoint gone: ``UNAVAILABLE``) is logged, reported to the engine (``/healthz``) and reopened
    every ``RECONNECT_INTERVAL_S`` until it works again; the worker never hangs on a dead stream.
    One that served for a while and ends as the service ends streams routinely (EOF,
    ``UNAVAILABLE``) is reopened at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

from google.pubsub_v1 import types

from stalk.collectors.base import Deliver, PushAdapter
from stalk.collectors.pubsub.adapter import MODES, Lease, PubSubAdapter
from stalk.collectors.pubsub.settings import MAX_ACK_DEADLINE_S, PubSubSettings
from stalk.errors import BackendError
from stalk.message import Message

logger = logging.getLogger("stalk.collectors.pubsub")

#: Seconds between attempts to reopen a stream that ended by itself.
RECONNECT_INTERVAL_S = 1.0
#: Seconds between the requests that keep a quiet stream alive (the client library's period).
KEEPALIVE_S = 30.0
#: Seconds a half-closed stream may take to end before it is cancelled.
CLOSE_TIMEOUT_S = 5.0
#: A stream that served this long and then ended routinely is reopened at once, not logged.
ROUTINE_AFTER_S = 60.0
#: Pub/Sub's shortest stream ack deadline.
MIN_STREAM_DEADLINE_S = 10


class _Stream:
    """One StreamingPull call, its reader and its writer."""

    def __init__(self, call: Any, limit: int) -> None:
        self.call = call
        self.limit = limit
        self.opened = time.monotonic()
        self.closing = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None


class PubSubStreamingAdapter(PubSubAdapter, PushAdapter):
    """Streaming mode; see :mod:`stalk.collectors.pubsub.adapter` for the rest of the mapping."""

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: PubSubSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic, settings=settings)
        self._deliver: Deliver | None = None
        self._stream: _Stream | None = None
        self._client_id = uuid.uuid4().hex  # the same across this worker's streams
        self._max_in_flight = 1
        self._paused = False
        self._closing = False
        self._held: set[Lease] = set()
        self._waiting: deque[Message] = deque()
        self._reconnect: asyncio.Task[None] | None = None
        self._tending: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ stream
    def _lease_s(self) -> int:
        """The engine's lease in whole seconds, at most Pub/Sub's 600."""
        return min(max(1, math.ceil(self.visibility_timeout_s)), MAX_ACK_DEADLINE_S)

    def _deadline_s(self) -> int:
        """The stream ack deadline: the engine's lease, at least Pub/Sub's floor of 10 s."""
        return max(MIN_STREAM_DEADLINE_S, self._lease_s())

    def _open_stream(self) -> None:
        limit = max(self._max_in_flight, self.settings.flow_messages)
        stream = _Stream(self.calls.streaming_pull(self.subscription), limit)
        self._stream = stream
        loop = asyncio.get_running_loop()
        stream.writer = loop.create_task(self._write(stream))
        stream.reader = loop.create_task(self._read(stream))
        if self._tending is None or self._tending.done():
            self._tending = loop.create_task(self._tend_waiting())

    async def _write(self, stream: _Stream) -> None:
        """Send the initial request, keep the stream alive, half-close it when asked."""
        deadline = self._deadline_s()
        first = types.StreamingPullRequest.pb()(
            subscription=self.subscription,
            stream_ack_deadline_seconds=deadline,
            client_id=self._client_id,
            max_outstanding_messages=stream.limit,
        )
        keepalive = types.StreamingPullRequest.pb()(stream_ack_deadline_seconds=deadline)
        try:
            await stream.call.write(first)
            while not stream.closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.closing.wait(), KEEPALIVE_S)
                if not stream.closing.is_set():
                    await stream.call.write(keepalive)
            await stream.call.done_writing()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call ended: the reader says why
            logger.debug("pubsub stream write ended: %r", exc)

    async def _read(self, stream: _Stream) -> None:
        """Hand every message the stream delivers to :meth:`_arrived` until it ends."""
        import grpc  # type: ignore[import-untyped]

        reason: object = "closed by the server"
        try:
            while True:
                response = await stream.call.read()
                if response is grpc.aio.EOF:
                    break
                received = response.received_messages
                if self._lease_s() < self._deadline_s():
                    await self._shorten(received)
                for item in received:
                    try:
                        self._arrived(item)
                    except Exception as exc:  # one bad message never ends the stream
                        logger.error(
                            "pubsub: delivery %s not handed on (%r); it comes back after its "
                            "deadline",
                            item.message.message_id,
                            exc,
                        )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = exc
        stream.closing.set()  # the writer stops too
        self._stream_ended(stream, reason)

    async def _shorten(self, received: Sequence[Any]) -> None:
        """Set a delivered batch to the engine's lease where it is under the stream's 10 s floor
        (one modack, before the engine sees it, as pull mode does), so what a dead worker held
        comes back when the engine's lease says, not 10 s later."""
        if not received or self._calls is None or self._closing or self._paused:
            return
        try:
            ack_ids = [r.ack_id for r in received]
            await self.calls.modify(self.subscription, ack_ids, self._lease_s())
        except BackendError as exc:  # still leased for the stream deadline
            logger.warning("pubsub: could not set the lease of a streamed batch (%s)", exc)

    async def _close_stream(self, stream: _Stream | None) -> None:
        """Half-close ``stream`` and wait for the server to end it (cancel it if it does not)."""
        if stream is None:
            return
        if self._stream is stream:
            self._stream = None
        stream.closing.set()
        assert stream.reader is not None
        try:
            await asyncio.wait_for(asyncio.shield(stream.reader), CLOSE_TIMEOUT_S)
        except TimeoutError:
            logger.debug("pubsub stream did not end within %gs; cancelling it", CLOSE_TIMEOUT_S)
            stream.call.cancel()
            for task in (stream.reader, stream.writer):
                if task is not None:
                    task.cancel()
        except Exception as exc:
            logger.debug("pubsub stream closed: %r", exc)

    def _stream_ended(self, stream: _Stream, reason: object) -> None:
        if stream is not self._stream:
            return  # closed on purpose, or replaced
        self._stream = None  # even while paused: resume() must open a new one
        if self._closing or self._paused:
            return
        served_s = time.monotonic() - stream.opened
        routine = not isinstance(reason, Exception) or _unavailable(reason)
        if routine and served_s >= ROUTINE_AFTER_S:
            logger.info("pubsub stream of %s ended after %.0fs (%s); reopening",
                        self.subscription, served_s, _why(reason))  # fmt: skip
            self._open_stream()
            return
        logger.warning("pubsub stream of %s ended (%s); reopening every %gs",
                       self.subscription, _why(reason), RECONNECT_INTERVAL_S)  # fmt: skip
        self.report_delivery(f"pubsub stream ended ({_why(reason)})")
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        while not (self._closing or self._paused) and self._stream is None:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            if self._closing or self._paused or self._stream is not None:
                return
            try:
                await self.calls.get_subscription(self.subscription)
            except BackendError as exc:
                logger.warning("pubsub stream not reopened yet: %s", exc)
                continue
            if self._closing or self._paused or self._stream is not None:
                return  # paused, closed or resumed while the check was under way
            self._open_stream()
            self.report_delivery(None)
            logger.info("pubsub stream of %s reopened", self.subscription)

    async def _tend_waiting(self) -> None:
        """Keep messages waiting past the local limit leased (the engine's lease each time)."""
        while self._calls is not None and not self._closing:
            lease_s = self._lease_s()
            await asyncio.sleep(max(0.5, lease_s / 2))
            waiting = [m.receipt.ack_id for m in self._waiting]
            if waiting and self._calls is not None:
                await self._extend_waiting(waiting, lease_s)

    async def _extend_waiting(self, waiting: list[str], lease_s: int) -> None:
        problem: BackendError | None = None
        for attempt in range(2):
            try:
                await self.calls.modify(self.subscription, waiting, lease_s)
                return
            except BackendError as exc:
                problem = exc
            # One id handed over and acked meanwhile spoils the whole request on the emulator:
            # once more with only the ids still waiting.
            still = [m.receipt.ack_id for m in self._waiting]
            if attempt or not still or still == waiting or self._calls is None:
                break
            waiting = still
        logger.warning("pubsub: lease of %d waiting message(s) not extended (%s)",
                       len(waiting), problem)  # fmt: skip

    # ------------------------------------------------------------------ deliveries
    def _arrived(self, received: Any) -> None:
        lease = self._lease_of(received)
        if self._calls is None:
            return  # closed: it comes back after its deadline
        if self._closing or self._paused:
            self._spawn(self._give_back_quietly([lease]))
            return
        parked = self._parked(lease)
        if parked is not None:
            self._spawn(parked)
            return
        message = self._message_of(lease, received.message.message_id)
        if not self._admit([message]):  # held behind its ordering key, heartbeated by us
            return
        if len(self._held) < self._max_in_flight and self._deliver is not None:
            self._held.add(lease)
            self._deliver(message)
        else:
            self._waiting.append(message)

    def _forget(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            self._held.discard(lease)
        if self._waiting:
            with contextlib.suppress(RuntimeError):  # no loop: nothing to hand over to
                asyncio.get_running_loop().call_soon(self._hand_over)  # not inside a settle

    def _hand(self, messages: list[Message]) -> None:
        """Deliver what the ordering gate let go, within the local limit."""
        self._waiting.extend(messages)
        self._hand_over()

    def _hand_over(self) -> None:
        """Deliver waiting messages while the local limit has room."""
        while self._waiting and len(self._held) < self._max_in_flight and not self._paused:
            message = self._waiting.popleft()
            self._held.add(message.receipt)
            if self._deliver is not None:
                self._deliver(message)

    def _take_waiting(self) -> list[Lease]:
        waiting = [m.receipt for m in self._waiting]
        self._waiting.clear()
        return waiting

    # ------------------------------------------------------------------ flow control
    async def start(self, deliver: Deliver, max_in_flight: int) -> None:
        """Open the stream, asking for at least ``max_in_flight`` outstanding messages."""
        self._deliver = deliver
        self._max_in_flight = max(1, max_in_flight)
        self.subscription  # noqa: B018 - a topic source fails here, in one line
        if self._stream is None and not self._paused:
            self._open_stream()

    async def pause(self) -> None:
        """Close the stream; delivered messages stay ackable, waiting ones go back."""
        self._paused = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        await self._close_stream(self._stream)
        await self._give_back_quietly(self._take_waiting())

    async def resume(self) -> None:
        """Open a new stream. Idempotent."""
        self._paused = False
        if self._stream is None and self._deliver is not None and not self._closing:
            self._open_stream()  # if it fails at once, _stream_ended reports it and reconnects
            self.report_delivery(None)

    async def set_max_in_flight(self, n: int) -> None:
        """Raise past the stream's limit: open a stream with it, close the old; otherwise
        change the local limit only."""
        self._max_in_flight = max(1, n)
        old = self._stream
        if old is not None and self._max_in_flight > old.limit:
            self._open_stream()
            task = asyncio.get_running_loop().create_task(self._close_stream(old))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)
        self._hand_over()

    # ------------------------------------------------------------------ reading on request
    async def fetch(self, max_messages: int) -> list[Message]:
        """Take up to ``max_messages`` with one unary pull (``stalk peek``, ``redrive``)."""
        received = await self.calls.pull(self.subscription, max_messages, 1.0)
        out: list[Message] = []
        for item in received:
            lease = self._lease_of(item)
            parked = self._parked(lease)
            if parked is not None:
                await parked
            else:
                out.append(self._message_of(lease, item.message.message_id))
        return out

    async def settle_fetched(self, messages: Sequence[Message], *, ack: bool) -> None:
        """Ack fetched messages, or give them back at once (modack 0)."""
        if ack:
            await self.ack(messages)
        else:
            await self._give_back_quietly([m.receipt for m in messages])

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        """Close the stream, give back what waits, close the clients. Idempotent."""
        self._closing = True
        for task in (self._reconnect, self._tending):
            if task is not None:
                task.cancel()
        await self._close_stream(self._stream)
        if self._closers:
            await asyncio.wait(set(self._closers), timeout=CLOSE_TIMEOUT_S + 1.0)
        if self._calls is not None:
            await self._give_back_quietly(self._take_waiting())
        self._held.clear()
        await super().close()


def _unavailable(exc: Exception) -> bool:
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def _why(reason: object) -> str:
    """One line for a stream's end: the gRPC status and its details where there is one."""
    code, details = getattr(reason, "code", None), getattr(reason, "details", None)
    if callable(code) and callable(details):
        return f"{getattr(code(), 'name', code())}: {details()}"
    return repr(reason) if isinstance(reason, Exception) else str(reason)


MODES["streaming"] = PubSubStreamingAdapter
