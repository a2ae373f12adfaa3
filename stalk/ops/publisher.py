"""Publishing from Python: what replaces ``task.delay()`` in a web view.

``Publisher`` (sync: Django, Flask, scripts) and ``AsyncPublisher`` (FastAPI, aiohttp) take the
same backend names and options as ``stalk send`` and ``stalk run``::

    with stalk.Publisher("sqs", source="orders", region="eu-west-1") as orders:
        orders.publish(b'{"order": 1}', attributes={"tenant": "a"})

    async with stalk.AsyncPublisher("amqp", source="orders") as orders:
        await orders.publish_batch([b"1", b"2"], delay_s=30)

Options are the ``--option`` keys of the backend and read the same environment
(``STALK_<BACKEND>_<KEY>``, ``STALK_BACKEND``, ``STALK_SOURCE``); ``key="@/run/secrets/x"``
reads a file. A ``Publisher`` keeps one connection on a private event loop in a thread of its
own, so it is safe to share between threads (one per process: make it at start-up, close it at
exit) and works where an event loop already runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from stalk.collectors import registry
from stalk.collectors.base import Adapter, BatchPublisher
from stalk.errors import ConfigError

T = TypeVar("T")

#: Most seconds a sync publish waits for its confirm before raising TimeoutError.
DEFAULT_TIMEOUT_S = 60.0


def _body(body: bytes | str) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise TypeError(f"a message body is bytes or str, not {type(body).__name__}")


def _check_delay(delay_s: float) -> float:
    if not delay_s >= 0 or delay_s == float("inf"):
        raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
    return float(delay_s)


def build_adapter(backend: str | None, source: str | None, options: Mapping[str, Any]) -> Adapter:
    """Return the adapter ``stalk send --backend B --source S --option k=v`` would use.

    Raises:
        ConfigError: unknown backend or option, or no source.
    """
    name = backend or os.environ.get("STALK_BACKEND") or "local"
    where = source or os.environ.get("STALK_SOURCE")
    if not where:
        raise ConfigError("a Publisher needs source= (or STALK_SOURCE): the queue to publish to")
    values = {
        key: ("true" if value else "false") if isinstance(value, bool) else str(value)
        for key, value in options.items()
        if value is not None
    }
    return registry.get(name).from_options(where, None, values)


class AsyncPublisher:
    """Publish to one source from async code; ``async with`` opens and closes the connection.

    Args:
        backend: ``local``, ``sqs``, ``amqp``, ``nsq``, ... (default ``$STALK_BACKEND`` or
            ``local``), case-insensitive.
        source: the queue or topic (default ``$STALK_SOURCE``).
        **options: the backend's ``--option`` keys, e.g. ``url=``, ``region=``, ``path=``.
    """

    def __init__(self, backend: str | None = None, source: str | None = None, **options: Any):
        self.adapter = build_adapter(backend, source, options)
        self._opened = False
        self._opening: asyncio.Lock | None = None

    async def open(self) -> None:
        """Connect (done by ``async with``; publish opens on first use too)."""
        if self._opened:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # concurrent first publishes open once
            if not self._opened:
                await self.adapter.open()
                self._opened = True

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._opened:
            self._opened = False
            self._opening = None
            await self.adapter.close()

    async def publish(
        self,
        body: bytes | str,
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Publish one message (a ``str`` body is sent as UTF-8); return the broker's id once
        the broker has it (confirm, 200, commit).

        Raises:
            MessageTooLarge, QueueFull, QueueNotFound, BackendError: nothing was published.
        """
        await self.open()
        return await self.adapter.publish(
            _body(body), dict(attributes or {}), _check_delay(delay_s)
        )

    async def publish_batch(
        self,
        bodies: Iterable[bytes | str],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """Publish many messages, in one broker call where the backend has one (all or nothing
        there); return their ids in order."""
        await self.open()
        payload = [_body(b) for b in bodies]
        attrs, delay = dict(attributes or {}), _check_delay(delay_s)
        if not payload:
            return []
        if isinstance(self.adapter, BatchPublisher):
            return await self.adapter.publish_batch(payload, attrs, delay)
        return [await self.adapter.publish(body, attrs, delay) for body in payload]

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Publisher:
    """Publish to one source from sync code; ``with`` opens and closes the connection.

    Same arguments as :class:`AsyncPublisher`, plus ``timeout_s``: the longest a call waits.
    Thread-safe: calls from several threads share the one connection.
    """

    def __init__(
        self,
        backend: str | None = None,
        source: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **options: Any,
    ) -> None:
        self._async = AsyncPublisher(backend, source, **options)
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def adapter(self) -> Adapter:
        """The backend adapter publishes go through."""
        return self._async.adapter

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="stalk-publisher", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(self.timeout_s)

    def open(self) -> None:
        """Connect (done by ``with`` and by the first publish)."""
        self._run(self._async.open())

    def publish(
        self,
        body: bytes | str,
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Publish one message; return its id once the broker has it."""
        return self._run(self._async.publish(body, attributes, delay_s))

    def publish_batch(
        self,
        bodies: Iterable[bytes | str],
        attributes: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> list[str]:
        """Publish many messages (one broker call where the backend has one); return the ids."""
        return self._run(self._async.publish_batch(list(bodies), attributes, delay_s))

    def close(self) -> None:
        """Close the connection and stop the private loop. Idempotent."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._async.close(), loop).result(self.timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.timeout_s)
            loop.close()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
