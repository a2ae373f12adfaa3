"""The ``local`` backend: durable queues in one SQLite file, no server.

What a user gets with no broker at all, and meant for production on one machine: messages survive
``kill -9`` of any process and (with ``durability=full``, the default) power loss; several
processes may consume one queue at once. This module is the asyncio face; the queue operations
are in ``_local_store``, the statements in ``_local_sql``, opening and lock waits in
``_local_file``, the settings in ``_local_settings``.

Every database call of an adapter runs on one dedicated thread that owns the connection, one hop
per batch: a poll leases its whole batch in one transaction, an ack deletes its whole batch in
one transaction, and an ack the engine hands over with its next poll (``ack_and_get_messages``)
shares that poll's transaction and hop. The event loop never blocks on the file.

Options (``--option KEY=VALUE`` or ``STALK_LOCAL_<KEY>``): ``path``, ``durability``, ``topic``,
``max_message_bytes``, ``max_queue_length``, ``message_ttl_s``, ``lock_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from stalk.collectors.base import Backlog, PollingAdapter
from stalk.collectors.local.settings import (
    DEFAULT_PATH,
    LOCAL_FEATURES,
    QUEUE_NAME,
    LocalSettings,
    check_name,
)
from stalk.collectors.local.store import LocalStore
from stalk.collectors.local.thread import DatabaseThread
from stalk.errors import ConfigError, MessageTooLarge
from stalk.message import Failure, Message

__all__ = [
    "DEFAULT_PATH",
    "LOCAL_FEATURES",
    "QUEUE_NAME",
    "LocalAdapter",
    "LocalSettings",
    "check_name",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LocalAdapter(PollingAdapter):
    """Polling adapter over one SQLite WAL file shared by any number of queues and processes.

    Args:
        source: the queue to consume (and publish to, unless ``settings.topic`` is set).
        error_topic: the queue in the same file that failed messages move to.
        settings: file, durability and limits; read from ``STALK_LOCAL_*`` when omitted.
    """

    name = "local"
    features = LOCAL_FEATURES
    settings_model = LocalSettings

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: LocalSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic)
        self.settings: LocalSettings = settings if settings is not None else LocalSettings()
        self.path = Path(self.settings.path).expanduser()
        self._store: LocalStore | None = None
        self._thread: DatabaseThread | None = None

    def describe(self) -> str:
        """Return ``local:<source>@<path>``, for logs."""
        return f"local:{self.source}@{self.path}"

    # ------------------------------------------------------------------ plumbing
    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the database thread: the one hop a batch costs."""
        if self._thread is None:
            raise ConfigError(f"{self.describe()} used before open()")
        return await self._thread.call(fn, *args)

    @property
    def store(self) -> LocalStore:
        """The open store (only to be used on the database thread)."""
        if self._store is None:
            raise ConfigError(f"{self.describe()} used before open()")
        return self._store

    @property
    def _source(self) -> str:
        return self.source_name

    @property
    def _errors(self) -> str:
        return self.error_topic or self.default_error_topic(self._source)

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Open (creating if needed) the file, and subscribe the source to ``topic`` if set.

        Raises:
            ConfigError: a bad queue name, or a path that is not a writable stalk file.
        """
        check_name(self._source, "source")
        check_name(self._errors, "error topic")
        if self.settings.topic is not None:
            check_name(self.settings.topic, "topic")
        if self._thread is not None:
            return
        self._thread = DatabaseThread(f"stalk-local-{self._source}")
        settings = self.settings

        def connect() -> None:
            self._store = LocalStore(
                self.path,
                full_sync=settings.durability == "full",
                lock_timeout_s=settings.lock_timeout_s,
            )
            if settings.topic is not None:
                self._store.subscribe(settings.topic, self._source)

        try:
            await self._call(connect)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and stop the database thread. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        store, self._store = self._store, None
        if store is not None:
            await thread.call(store.close)
        thread.stop()

    # ------------------------------------------------------------------ consuming
    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        """Lease up to ``max_messages`` due messages in one transaction.

        When none is due but one falls due within ``wait_s`` (a retry delay or a lease ending),
        wait for it: delayed messages come back on time, not a whole polling period late.
        Messages published by another process meanwhile wait for the next poll.
        """
        store, source, lease_s = self.store, self._source, self.visibility_timeout_s
        messages = await self._call(store.lease, source, max_messages, lease_s)
        if messages or wait_s <= 0:
            return messages
        due = await self._call(self.store.next_due, self._source)
        pause = due - time.time() if due is not None else wait_s
        if pause >= wait_s:
            return []
        await asyncio.sleep(max(0.0, pause))
        return await self._call(store.lease, source, max_messages, lease_s)

    async def ack(self, messages: Sequence[Message]) -> None:
        """Delete the batch in one transaction; deliveries whose lease lapsed are refused."""
        held = [m for m in messages if m.receipt is not None]
        if held:
            self._refused(len(held), await self._call(self.store.ack, held))

    async def ack_and_get_messages(
        self, acks: Sequence[Message], max_messages: int
    ) -> list[Message]:
        """Delete ``acks`` and lease up to ``max_messages`` due messages, in one transaction and
        one hop (:class:`~stalk.collectors.base.AckAndLease`): a commit and a hop fewer than
        :meth:`ack` then :meth:`get_messages`. Never waits for a message to fall due."""
        held = [m for m in acks if m.receipt is not None]
        deleted, messages = await self._call(
            self.store.ack_and_lease, held, self._source, max_messages, self.visibility_timeout_s
        )
        self._refused(len(held), deleted)
        return messages

    def _refused(self, held: int, deleted: int) -> None:
        if deleted < held:
            logger.warning(
                "%d of %d acks on %s refused: their lease expired and another worker took them",
                held - deleted,
                held,
                self.describe(),
            )

    async def retry_later(self, message: Message, delay_s: float) -> None:
        """Make the message due in ``delay_s`` (``visible_at``); attributes are saved with it."""
        if not await self._call(self.store.requeue, message, delay_s, True):
            logger.warning(
                "retry of %s refused: its lease expired",
                message.id,
                extra={"message_id": message.id, "backend": self.name},
            )

    async def release(self, message: Message) -> None:
        """Make the message due now without counting the delivery. Idempotent."""
        if message.receipt is not None:
            await self._call(self.store.requeue, message, 0.0, False)

    async def extend(self, message: Message, seconds: float) -> None:
        """Push the lease end to ``seconds`` from now if this delivery still holds it."""
        if message.receipt is not None:
            await self._call(self.store.extend, message, seconds)

    async def publish_error(self, message: Message, failure: Failure) -> None:
        """Move the message to the error queue with ``failure`` as attributes, atomically.

        The row itself moves (same id), so there is no moment with two copies or none. If this
        delivery lost its lease meanwhile, a copy goes to the error queue and the row stays with
        whoever holds it now.
        """
        await self._call(self.store.to_error, message, self._errors, failure)

    # ------------------------------------------------------------------ producing
    async def publish(
        self,
        body: bytes,
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Publish one message to the source, or to each subscription of ``topic``.

        Returns only once committed (fsynced with ``durability=full``).

        Raises:
            MessageTooLarge: body over ``max_message_bytes``.
            QueueFull: a queue at ``max_queue_length``.
            QueueNotFound: ``topic`` has no subscription yet.
        """
        return (await self.publish_batch([body], attributes, delay_s))[0]

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """Publish many bodies in one transaction (``stalk send -`` reading stdin lines).

        All or nothing: a body over the limit or a full queue rejects the whole batch.
        """
        limit = self.settings.max_message_bytes
        for body in bodies:
            if len(body) > limit:
                raise MessageTooLarge(
                    f"body of {len(body)} bytes is over the local backend's max_message_bytes="
                    f"{limit} (raise it with --option max_message_bytes=N)"
                )
        if not bodies:
            return []
        topic, store = self.settings.topic, self.store

        def run() -> list[str]:
            queues = store.targets(topic) if topic is not None else [self._source]
            return store.insert(
                queues,
                bodies,
                attributes,
                max(0.0, delay_s),
                self.settings.message_ttl_s,
                self.settings.max_queue_length,
            )

        return await self._call(run)

    # ------------------------------------------------------------------ counts and topics
    async def backlog(self) -> Backlog:
        """Return ready, delayed, in-flight, error depth and oldest age of the source."""
        return await self._call(self.store.backlog, self._source, self._errors)

    async def topic_stats(self, topic: str | None = None) -> dict[str, Backlog]:
        """Return a :class:`Backlog` per subscription of ``topic`` (default: the ``topic`` option).

        Raises:
            ConfigError: no topic given or set.
        """
        name = topic if topic is not None else self.settings.topic
        if name is None:
            raise ConfigError("local backend: topic_stats needs a topic (--option topic=T)")
        store = self.store

        def run() -> dict[str, Backlog]:
            return {
                q: store.backlog(q, self.default_error_topic(q))
                for q in store.subscriptions(check_name(name, "topic"))
            }

        return await self._call(run)

    async def subscribe(self, topic: str, queue: str | None = None) -> None:
        """Subscribe ``queue`` (default: the source) to ``topic``; it gets only later publishes."""
        await self._call(
            self.store.subscribe,
            check_name(topic, "topic"),
            check_name(queue or self._source, "queue"),
        )

    async def unsubscribe(self, topic: str, queue: str | None = None) -> None:
        """Stop copying ``topic`` into ``queue`` (default: the source); its messages stay."""
        await self._call(
            self.store.unsubscribe,
            check_name(topic, "topic"),
            check_name(queue or self._source, "queue"),
        )
