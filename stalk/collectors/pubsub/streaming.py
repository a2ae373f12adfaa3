"""``mode=streaming``: the client library's streaming pull pushes (push intake).

Delivery
    ``SubscriberClient.subscribe()`` with ``FlowControl(max_messages=...)``; its callback runs
    on the library's threads and hands each message to the engine's loop with
    ``call_soon_threadsafe`` (measured: no cost). The adapter passes at most ``max_in_flight``
    to the engine; any the library delivers beyond that (after a scale down) wait here, leased
    and extended by the library, until a slot frees.

Settling
    Every settle is a unary call of the adapter's grpc.aio client (see
    :mod:`stalk.collectors.pubsub.adapter`), preceded by ``message.drop()`` so the library's
    lease manager stops extending the message and frees its flow-control slot: without the
    drop a modack-delayed retry was extended again by the library and came back in only 2 of 4
    runs. An ack sent through the library after its stream was cancelled is silently lost;
    unary calls do not depend on the stream, so nothing held is lost on sleep or shutdown.

Flow control, sleep, wake
    ``set_max_in_flight(n)`` above the open stream's limit reopens the stream with ``n`` (the
    service sends at most the limit of the initial request); at or below it only the local
    limit changes, so scaling down cancels nothing. ``pause`` cancels the stream (held messages
    stay ackable; waiting ones are released at once), ``resume`` opens a new one.

Lost streams
    A stream that ends by itself (an emulator restart loses the subscription: ``NotFound``;
    an endpoint gone: ``RetryError``) is logged and reopened every ``reconnect_interval_s``
    until it works again; the worker never hangs on a dead stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from stalk.collectors.base import Deliver, PushAdapter
from stalk.collectors.pubsub.adapter import MODES, Lease, PubSubAdapter
from stalk.collectors.pubsub.settings import MAX_ACK_DEADLINE_S, PubSubSettings
from stalk.errors import BackendError
from stalk.message import Message

logger = logging.getLogger("stalk.collectors.pubsub")

#: Seconds between attempts to reopen a stream that ended by itself.
RECONNECT_INTERVAL_S = 1.0
#: Longest the library keeps extending a message it holds (its default is one hour).
MAX_LEASE_S = 3600


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._future: Any = None
        self._generation = 0
        self._stream_limit = 0
        self._max_in_flight = 1
        self._paused = False
        self._closing = False
        self._held: set[Lease] = set()
        self._waiting: deque[Message] = deque()
        self._reconnect: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ stream
    def _make_client(self) -> Any:
        from google.cloud import pubsub_v1  # type: ignore[import-untyped]

        host = self.calls.emulator
        if not host:
            return pubsub_v1.SubscriberClient()
        import grpc  # type: ignore[import-untyped]
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        channel = grpc.insecure_channel(host)
        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))

    def _open_stream(self) -> None:
        from google.cloud import pubsub_v1

        if self._client is None:
            self._client = self._make_client()
        self._generation += 1
        generation = self._generation
        self._stream_limit = max(self._max_in_flight, self.settings.flow_messages)
        # Each library lease extension is at most the engine's lease (Pub/Sub's floor is 10 s):
        # a worker that dies holding a message loses it for that long, not for the library's
        # default of up to 60 s.
        extension_s = min(max(10, math.ceil(self.visibility_timeout_s)), MAX_ACK_DEADLINE_S)
        flow = pubsub_v1.types.FlowControl(
            max_messages=self._stream_limit,
            max_lease_duration=MAX_LEASE_S,
            max_duration_per_lease_extension=extension_s,
        )
        loop = self._loop
        assert loop is not None

        def callback(raw: Any) -> None:  # a library thread
            try:
                loop.call_soon_threadsafe(self._arrived, raw)
            except RuntimeError:  # the loop is closed: give it back at once
                raw.nack()

        def ended(future: Any) -> None:  # a library thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._stream_ended, generation, future)

        self._future = self._client.subscribe(
            self.subscription, callback, flow_control=flow, await_callbacks_on_shutdown=False
        )
        self._future.add_done_callback(ended)

    async def _close_stream(self) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        self._generation += 1  # its end is ours, not a lost stream
        future.cancel()
        try:
            await asyncio.to_thread(future.result, self.settings.call_timeout_s)
        except (Exception, concurrent.futures.CancelledError) as exc:
            logger.debug("pubsub stream closed: %r", exc)

    def _stream_ended(self, generation: int, future: Any) -> None:
        if generation != self._generation or self._closing or self._paused:
            return
        self._future = None
        try:
            future.result(timeout=0)
        except BaseException as exc:
            reason: object = exc
        else:
            reason = "closed by the server"
        logger.warning("pubsub stream of %s ended (%s); reopening every %gs",
                       self.subscription, reason, RECONNECT_INTERVAL_S)  # fmt: skip
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        while not (self._closing or self._paused) and self._future is None:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            if self._closing or self._paused or self._future is not None:
                return
            try:
                await self.calls.get_subscription(self.subscription)
            except BackendError as exc:
                logger.warning("pubsub stream not reopened yet: %s", exc)
                continue
            self._open_stream()
            logger.info("pubsub stream of %s reopened", self.subscription)

    # ------------------------------------------------------------------ deliveries
    def _arrived(self, raw: Any) -> None:
        published = raw.publish_time
        lease = Lease(
            ack_id=raw.ack_id,
            data=bytes(raw.data),
            attributes=dict(raw.attributes),
            ordering_key=raw.ordering_key or "",
            delivery_attempt=int(raw.delivery_attempt or 0),
            publish_time=published.timestamp() if published else None,
            handle=raw,
        )
        if self._calls is None:
            raw.nack()
            return
        if self._closing:
            self._spawn(self._give_back_quietly([lease]))
            return
        parked = self._parked(lease)
        if parked is not None:
            self._spawn(parked)
            return
        message = self._message_of(lease, raw.message_id)
        if not self._admit([message]):  # held behind its ordering key, heartbeated by us
            raw.drop()
            return
        if self._paused:
            self._spawn(self._give_back_quietly([lease]))
        elif len(self._held) < self._max_in_flight and self._deliver is not None:
            self._held.add(lease)
            self._deliver(message)
        else:
            self._waiting.append(message)

    def _forget(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            if lease.handle is not None:
                lease.handle.drop()
            self._held.discard(lease)
        if self._waiting and self._loop is not None:
            self._loop.call_soon(self._hand_over)  # not from inside the engine's settle

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
        """Open the stream with ``FlowControl(max_messages=max_in_flight)``."""
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._max_in_flight = max(1, max_in_flight)
        self.subscription  # noqa: B018 - a topic source fails here, in one line
        if self._future is None and not self._paused:
            self._open_stream()

    async def pause(self) -> None:
        """Cancel the stream; delivered messages stay ackable, waiting ones go back."""
        self._paused = True
        await self._close_stream()
        await self._give_back_quietly(self._take_waiting())

    async def resume(self) -> None:
        """Open a new stream. Idempotent."""
        self._paused = False
        if self._future is None and self._deliver is not None and not self._closing:
            self._open_stream()

    async def set_max_in_flight(self, n: int) -> None:
        """Raise past the stream's limit: reopen it; otherwise change the local limit only."""
        self._max_in_flight = max(1, n)
        if self._future is not None and self._max_in_flight > self._stream_limit:
            await self._close_stream()
            self._open_stream()
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
        """Cancel the stream, give back what waits, close the clients. Idempotent."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        await self._close_stream()
        if self._calls is not None:
            await self._give_back_quietly(self._take_waiting())
        self._held.clear()
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
        await super().close()


MODES["streaming"] = PubSubStreamingAdapter
