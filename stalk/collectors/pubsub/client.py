"""The Pub/Sub calls the adapter makes, on grpc.aio clients, each failure as one stalk error.

``SubscriberAsyncClient`` and ``PublisherAsyncClient`` do not read ``PUBSUB_EMULATOR_HOST``
themselves (the sync clients do), so with an emulator both share one insecure channel built
from it; without one they find the service and Application Default Credentials as usual.

Every call passes ``retry=None`` and a timeout: the engine owns retrying (with its backoff and
its health flag), so a call to an emulator that went away fails in one line instead of stalling
in the client's own 60 s retry loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient, types

from stalk.collectors.pubsub.settings import MAX_ACK_IDS, MAX_PUBLISH_BATCH, PubSubSettings
from stalk.errors import BackendError, BackendUnavailable, QueueNotFound

T = TypeVar("T")

#: The raw protobuf request classes: a request built from them and wrapped skips proto-plus's
#: field-by-field copy (~150 us for an ack of 100 ids, measured), and the GAPIC call takes it.
ACK_PB = types.AcknowledgeRequest.pb()
MODIFY_PB = types.ModifyAckDeadlineRequest.pb()
PULL_PB = types.PullRequest.pb()

#: Failures that mean "not reachable now": the engine backs off and calls again.
UNREACHABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.Cancelled,
    gexc.InternalServerError,
    gexc.Unknown,
    ConnectionError,
    TimeoutError,
)


class PubSubCalls:
    """One subscriber and one publisher client; ``call`` turns SDK errors into stalk's."""

    def __init__(self, settings: PubSubSettings) -> None:
        self.settings = settings
        self.emulator = settings.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST") or None
        self._channel: Any = None
        self._closed = False
        if self.emulator:
            import grpc  # type: ignore[import-untyped]
            from google.pubsub_v1.services.publisher.transports import (
                PublisherGrpcAsyncIOTransport,
            )
            from google.pubsub_v1.services.subscriber.transports import (
                SubscriberGrpcAsyncIOTransport,
            )

            options = [
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
            ]
            self._channel = grpc.aio.insecure_channel(self.emulator, options=options)
            self.subscriber = SubscriberAsyncClient(
                transport=SubscriberGrpcAsyncIOTransport(channel=self._channel)
            )
            self.publisher = PublisherAsyncClient(
                transport=PublisherGrpcAsyncIOTransport(channel=self._channel)
            )
        else:
            self.subscriber = SubscriberAsyncClient()
            self.publisher = PublisherAsyncClient()

    def where(self) -> str:
        """Return the endpoint, for error messages."""
        return f"the emulator at {self.emulator}" if self.emulator else "pubsub.googleapis.com"

    async def close(self) -> None:
        """Close the channels. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
        else:
            await self.subscriber.transport.close()  # type: ignore[no-untyped-call]
            await self.publisher.transport.close()  # type: ignore[no-untyped-call]

    async def call(
        self, what: str, name: str, make: Callable[[], Awaitable[T]], timeout_s: float = 0.0
    ) -> T:
        """Await ``make()`` within ``timeout_s`` (default ``call_timeout_s``).

        Raises:
            QueueNotFound: the topic or subscription ``name`` does not exist.
            BackendUnavailable: the endpoint did not answer (down, unreachable, timed out).
            BackendError: anything else the service refused, permission denied included.
        """
        limit = timeout_s or self.settings.call_timeout_s
        try:
            # asyncio.timeout, not wait_for: wait_for's extra task would send the request a
            # loop turn later, behind every handler the last batch woke (measured: pull mode
            # drained ~15% slower on the emulator, its next pull queued behind the batch).
            async with asyncio.timeout(limit + 1.0):
                return await make()
        except gexc.NotFound as exc:
            raise QueueNotFound(
                f"pubsub: {name} not found ({what}); create it (gcloud pubsub "
                f"{'subscriptions' if '/subscriptions/' in name else 'topics'} create) or fix "
                "the name"
            ) from exc
        except (gexc.PermissionDenied, gexc.Unauthenticated, gexc.Forbidden) as exc:
            raise BackendError(
                f"pubsub: permission denied for {what} on {name} ({exc.message}); check the "
                "credentials' roles (roles/pubsub.subscriber, roles/pubsub.publisher)"
            ) from exc
        except UNREACHABLE as exc:
            raise BackendUnavailable(
                f"pubsub: {self.where()} did not answer {what} on {name} within {limit:g}s "
                f"({type(exc).__name__}); is it running? (PUBSUB_EMULATOR_HOST="
                f"{os.environ.get('PUBSUB_EMULATOR_HOST', '')})"
            ) from exc
        except gexc.GoogleAPICallError as exc:
            raise BackendError(f"pubsub: {what} on {name} refused: {exc}") from exc

    # ----------------------------------------------------------------- subscriber
    async def get_subscription(self, path: str, timeout_s: float = 0.0) -> types.Subscription:
        """Return the subscription's settings (topic, ack deadline, dead-letter policy)."""
        sub = self.subscriber
        timeout = timeout_s or self.settings.call_timeout_s
        return await self.call(
            "get subscription",
            path,
            lambda: sub.get_subscription(subscription=path, retry=None, timeout=timeout),
            timeout,
        )

    async def get_topic(self, path: str, timeout_s: float = 0.0) -> types.Topic:
        """Return the topic."""
        pub = self.publisher
        timeout = timeout_s or self.settings.call_timeout_s
        return await self.call(
            "get topic", path, lambda: pub.get_topic(topic=path, retry=None, timeout=timeout),
            timeout,
        )  # fmt: skip

    async def pull(self, path: str, max_messages: int, wait_s: float) -> list[Any]:
        """One unary pull, waiting up to ``wait_s`` (at least 1 s) for a first message; returns
        raw protobuf ``ReceivedMessage`` objects.

        The deadline is at least 1 s because the emulator answers an empty pull about a second
        before its deadline (so a short one returns at once, and none expires in transit with
        messages the service would then hold until their ack deadline); ``return_immediately``
        would do the same but is deprecated. A deadline that passes anyway is an empty pull.
        """
        sub = self.subscriber
        timeout = max(1.0, wait_s)
        request = types.PullRequest.wrap(PULL_PB(subscription=path, max_messages=max_messages))
        try:
            response = await self.call(
                "pull", path, lambda: sub.pull(request=request, retry=None, timeout=timeout),
                timeout,
            )  # fmt: skip
        except BackendUnavailable as exc:
            if isinstance(exc.__cause__, gexc.DeadlineExceeded):
                return []
            raise
        # The raw protobuf, not proto-plus: its wrappers cost ~90 us a message (measured).
        return list(types.PullResponse.pb(response).received_messages)

    async def acknowledge(self, path: str, ack_ids: Sequence[str]) -> None:
        """Ack ``ack_ids`` in requests of at most :data:`MAX_ACK_IDS`, all at once."""
        sub, timeout = self.subscriber, self.settings.call_timeout_s

        def one(chunk: list[str]) -> Awaitable[None]:
            request = types.AcknowledgeRequest.wrap(ACK_PB(subscription=path, ack_ids=chunk))
            return sub.acknowledge(request=request, retry=None, timeout=timeout)

        await _each("acknowledge", self, path, one, _chunks(ack_ids, MAX_ACK_IDS))

    async def modify(self, path: str, ack_ids: Sequence[str], seconds: int) -> None:
        """Set the ack deadline of ``ack_ids`` to ``seconds`` from now (0: redeliver at once)."""
        sub, timeout = self.subscriber, self.settings.call_timeout_s

        def one(chunk: list[str]) -> Awaitable[None]:
            pb = MODIFY_PB(subscription=path, ack_ids=chunk, ack_deadline_seconds=seconds)
            request = types.ModifyAckDeadlineRequest.wrap(pb)
            return sub.modify_ack_deadline(request=request, retry=None, timeout=timeout)

        await _each("modify_ack_deadline", self, path, one, _chunks(ack_ids, MAX_ACK_IDS))

    def streaming_pull(self, subscription: str) -> Any:
        """Open a StreamingPull on the subscriber's channel and return the ``grpc.aio`` call.

        Raw protobuf both ways (as :meth:`pull`): the caller ``write``s requests, ``read``s
        responses and ends the stream with ``done_writing`` (a half-close the server answers by
        ending the stream) rather than ``cancel``, which the emulator does not notice.

        The routing header is set by hand, as the official clients do for this call (generated
        code cannot add it to a streaming call; the service routes the stream by it).
        """
        transport: Any = self.subscriber.transport  # the grpc.aio one (typed as its base)
        channel = transport.grpc_channel
        method = channel.stream_stream(
            "/google.pubsub.v1.Subscriber/StreamingPull",
            request_serializer=types.StreamingPullRequest.pb().SerializeToString,
            response_deserializer=types.StreamingPullResponse.pb().FromString,
        )
        return method(metadata=(("x-goog-request-params", f"subscription={subscription}"),))

    # ----------------------------------------------------------------- publisher
    async def publish(self, topic: str, messages: Sequence[types.PubsubMessage]) -> list[str]:
        """Publish ``messages`` (in requests of at most 1,000); return their ids once the
        service has them all."""
        pub, timeout = self.publisher, self.settings.call_timeout_s

        def one(chunk: list[types.PubsubMessage]) -> Awaitable[types.PublishResponse]:
            return pub.publish(topic=topic, messages=chunk, retry=None, timeout=timeout)

        responses = await asyncio.gather(*(
            self.call("publish", topic, functools.partial(one, chunk))
            for chunk in _chunks(messages, MAX_PUBLISH_BATCH)
        ))  # fmt: skip
        return [i for response in responses for i in response.message_ids]


async def _each(
    what: str,
    calls: PubSubCalls,
    path: str,
    one: Callable[[list[str]], Awaitable[None]],
    chunks: list[list[str]],
) -> None:
    """Make ``one(chunk)`` for every chunk at once; a single chunk (the usual case) without
    the extra task of a gather."""
    if len(chunks) == 1:
        await calls.call(what, path, functools.partial(one, chunks[0]))
        return
    await asyncio.gather(*(calls.call(what, path, functools.partial(one, c)) for c in chunks))


def _chunks(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
