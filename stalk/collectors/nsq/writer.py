"""The publishing side: pynsq's Writer with a close and awaitable, confirmed publishes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nsq  # type: ignore[import-untyped]
from nsq import protocol as nsq_protocol

from stalk.collectors.nsq.client import Conn, quiet_error
from stalk.errors import BackendError, BackendUnavailable

logger = logging.getLogger(__name__)


class Writer(nsq.Writer):  # type: ignore[misc]
    """A pynsq Writer with a ``close()``, configurable reconnects and awaitable publishes."""

    def __init__(self, nsqd: list[str], reconnect_interval_s: float) -> None:
        self._closed = False
        self._timers: set[object] = set()
        self._down: set[str] = set()
        super().__init__(
            nsqd, reconnect_interval=reconnect_interval_s, name=f"stalk writer {','.join(nsqd)}"
        )

    def connected(self) -> bool:
        """True while at least one connection is ready to publish on."""
        return any(conn.connected() for conn in self.conns.values())

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until a connection is ready.

        Raises:
            BackendUnavailable: none within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.connected():
            if self._closed or time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"nsq: no connection to nsqd {', '.join(self.nsqd_tcp_addresses)} "
                    f"within {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.02)

    async def send(
        self, command: str, topic: str, payload: Any, delay_ms: int | None = None
    ) -> None:
        """PUB, MPUB or DPUB and return once nsqd answered ``OK``.

        Raises:
            BackendError: nsqd refused it, or the connection failed before the answer (the
                message may then be on nsqd or not: at-least-once callers publish again).
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()

        def done(conn: Any, data: Any) -> None:
            if not answer.done():
                answer.set_result(data)

        sent = self._pub(command, topic, payload, delay_ms, callback=done)
        if isinstance(sent, asyncio.Future):  # a failed send's future: retrieved, not leaked
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
        data = await answer
        if isinstance(data, Exception) or data != b"OK":
            raise BackendError(f"nsq {command.upper()} to topic {topic!r} failed: {data}")

    def connect_to_nsqd(self, host: str, port: int) -> None:
        if self._closed:
            return
        conn = Conn(host, port, **self.conn_kwargs)
        for name, handler in (
            ("identify", self._on_connection_identify),
            ("identify_response", self._on_connection_identify_response),
            ("auth", self._on_connection_auth),
            ("auth_response", self._on_connection_auth_response),
            ("error", self._on_connection_error),
            ("response", self._on_connection_response),
            ("close", self._on_connection_close),
            ("ready", self._on_connection_ready),
            ("heartbeat", self.heartbeat),
        ):
            conn.on(name, handler)
        if conn.id in self.conns:
            return
        conn.callback_queue = []
        conn.connect()

    def _on_connection_error(self, conn: Any, error: Any, **_: Any) -> None:
        quiet_error(self, conn, error, self._closed)
        while conn.callback_queue:
            conn.callback_queue.pop(0)(conn, error)
        if conn.connected():  # later answers would be paired with the wrong publish
            conn.close()

    def _on_connection_close(self, conn: Any, **_: Any) -> None:
        if self.conns.get(conn.id) is conn:
            del self.conns[conn.id]
        while conn.callback_queue:
            conn.callback_queue.pop(0)(conn, nsq_protocol.ConnectionClosedError())
        if self._closed:
            return
        if conn.id not in self._down:
            self._down.add(conn.id)
            logger.warning("%s: lost nsqd %s; reconnecting", self.name, conn.id)

        def reconnect() -> None:
            self._timers.discard(handle)
            self.connect_to_nsqd(conn.host, conn.port)

        handle = self.io_loop.call_later(self.reconnect_interval, reconnect)
        self._timers.add(handle)

    def _on_connection_ready(self, conn: Any, **kwargs: Any) -> None:
        super()._on_connection_ready(conn, **kwargs)
        self._down.discard(conn.id)

    def _check_last_recv_timestamps(self) -> None:
        if not self._closed:
            super()._check_last_recv_timestamps()

    def close(self) -> None:
        """Close every connection and stop reconnecting; pending publishes fail."""
        self._closed = True
        for handle in list(self._timers):
            self.io_loop.remove_timeout(handle)
        self._timers.clear()
        for conn in list(self.conns.values()):
            conn.close()
