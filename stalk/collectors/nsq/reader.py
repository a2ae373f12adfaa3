"""The consuming side: pynsq's Reader made safe for stalk (see :mod:`.client` for the traps)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import nsq  # type: ignore[import-untyped]
from nsq import protocol as nsq_protocol

from stalk.collectors.nsq.client import Conn, quiet_error

logger = logging.getLogger(__name__)

#: Called on the loop for each message nsqd pushes, with the connection it came on.
Sink = Callable[[Any, Any], None]

#: How long a goodbye (``CLS``) waits for nsqd's ``CLOSE_WAIT`` before closing anyway.
GOODBYE_TIMEOUT_S = 1.0
#: Heartbeat nsqd sends (ms granularity in IDENTIFY); pynsq's default, kept explicit.
HEARTBEAT_INTERVAL_S = 30


class Reader(nsq.Reader):  # type: ignore[misc]
    """A pynsq Reader that hands each message to ``sink`` and reconnects on stalk's terms."""

    def __init__(
        self,
        topic: str,
        channel: str,
        sink: Sink,
        *,
        nsqd: list[str],
        lookupd: list[str],
        max_in_flight: int,
        msg_timeout_s: float,
        reconnect_interval_s: float,
        lookupd_poll_interval_s: float,
    ) -> None:
        self._closed = False
        self._sink = sink
        self._reconnect_interval_s = reconnect_interval_s
        self._timers: set[object] = set()
        self._down: set[str] = set()
        super().__init__(
            topic=topic,
            channel=channel,
            message_handler=self._unused,
            name=f"stalk {topic}/{channel}",
            nsqd_tcp_addresses=nsqd or None,
            lookupd_http_addresses=lookupd or None,
            max_tries=0,
            max_in_flight=max(1, max_in_flight),  # pynsq asserts > 0; pause is RDY 0 after
            lookupd_poll_interval=max(1, int(lookupd_poll_interval_s)),
            msg_timeout=msg_timeout_s,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
        )

    def _run(self) -> None:
        if not self._closed:  # close() may come before the loop ran the first connect
            super()._run()

    @staticmethod
    def _unused(message: Any) -> None:  # pragma: no cover - _on_message never calls it
        raise AssertionError("stalk's Reader delivers through its sink")

    # ------------------------------------------------------------------ delivery
    def _on_message(self, conn: Any, message: Any, **_: Any) -> None:
        self._maybe_update_rdy(conn)
        message.enable_async()
        try:
            self._sink(conn, message)
        except Exception:
            logger.exception("%s: could not hand over message %s", self.name, message.id)
            if not message.has_responded():
                message.requeue(time_ms=0, backoff=False)

    # ------------------------------------------------------------------ flow control
    def apply_rdy(self, max_in_flight: int) -> None:
        """Set ``max_in_flight`` and send each connection its RDY now (0 = paused)."""
        self.set_max_in_flight(max_in_flight)
        if max_in_flight and max_in_flight >= len(self.conns):
            per_conn = self._connection_max_in_flight()
            for conn in list(self.conns.values()):
                self._send_rdy(conn, per_conn)

    def _on_connection_ready(self, conn: Any, **kwargs: Any) -> None:
        super()._on_connection_ready(conn, **kwargs)
        if conn.id in self._down:
            self._down.discard(conn.id)
            logger.info("%s: nsqd %s is back", self.name, conn.id)
        # pynsq starts a connection at RDY 1 and raises it on the first message: an idle topic
        # would sit at 1 whatever the concurrency. Full RDY at once where it cannot overshoot.
        if self.conns.get(conn.id) is conn and 0 < len(self.conns) <= self.max_in_flight:
            self._send_rdy(conn, self._connection_max_in_flight())

    @staticmethod
    def finish_many(batch: list[tuple[Any, Any]]) -> int:
        """FIN ``(conn, message)`` pairs, one socket write per connection; return how many.

        pynsq's ``finish()`` is one event dispatch and one ``send`` syscall per message (the
        biggest single cost of a drain, measured). This does what it does (mark responded,
        count down the connection's in-flight, send ``FIN <id>``) for a whole batch; the
        backoff bookkeeping its RESUME event feeds is idle, as stalk never uses pynsq backoff.
        """
        frames: dict[Any, list[bytes]] = {}
        for conn, message in batch:
            if message._has_responded or not conn.connected():
                continue
            message._has_responded = True
            conn.in_flight -= 1
            frames.setdefault(conn, []).append(b"FIN " + message.id + b"\n")
        sent = 0
        for conn, parts in frames.items():
            try:
                conn.send(b"".join(parts))
                sent += len(parts)
            except Exception as exc:  # the stream closed under us: nsqd redelivers those
                logger.info("FIN of %d messages on %s failed: %r", len(parts), conn.id, exc)
                conn.close()
        return sent

    # ------------------------------------------------------------------ connections
    def connect_to_nsqd(self, host: str, port: int) -> Any:
        if self._closed:
            return None
        conn = Conn(host, port, **self.conn_kwargs)
        for name, handler in (
            ("identify", self._on_connection_identify),
            ("identify_response", self._on_connection_identify_response),
            ("auth", self._on_connection_auth),
            ("auth_response", self._on_connection_auth_response),
            ("error", self._on_connection_error),
            ("close", self._on_connection_close),
            ("ready", self._on_connection_ready),
            ("message", self._on_message),
            ("heartbeat", self._on_heartbeat),
        ):
            conn.on(name, handler)
        if conn.id in self.conns:
            return None
        last = self.connection_attempts.get(conn.id)
        if last and last > time.time() - self._reconnect_interval_s * 0.9:
            return None
        self.connection_attempts[conn.id] = time.time()
        conn.connect()
        return conn

    def _on_connection_error(self, conn: Any, error: Any, **_: Any) -> None:
        quiet_error(self, conn, error, self._closed)

    def _on_connection_close(self, conn: Any, **_: Any) -> None:
        if self.conns.get(conn.id) is conn:
            del self.conns[conn.id]
        self.total_rdy = max(self.total_rdy - conn.rdy, 0)  # type: ignore[has-type]
        if conn.rdy_timeout:
            self.io_loop.remove_timeout(conn.rdy_timeout)
            conn.rdy_timeout = None
        if self._closed:
            return
        if conn.id not in self._down:  # one warning per outage, not one per redial
            self._down.add(conn.id)
            logger.warning(
                "%s: lost nsqd %s; reconnecting every %.1fs",
                self.name,
                conn.id,
                self._reconnect_interval_s,
            )
        # With lookupd too: pynsq would wait for the next lookupd poll (60 s by default).
        self._later(self._reconnect_interval_s, self.connect_to_nsqd, conn.host, conn.port)

    def _later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = self.io_loop.call_later(delay_s, run)
        self._timers.add(handle)

    def _check_last_recv_timestamps(self) -> None:
        if not self._closed:  # pynsq never stops this periodic callback
            super()._check_last_recv_timestamps()

    async def goodbye(self) -> None:
        """Send ``CLS`` on every connection and wait for nsqd's ``CLOSE_WAIT``.

        nsqd handles a connection's commands in order, so once it answers, every FIN and REQ
        sent before is done: nothing held is left to wait for its msg_timeout.
        """
        waits = [self._cls(conn) for conn in list(self.conns.values()) if conn.connected()]
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), GOODBYE_TIMEOUT_S * 2)

    async def _cls(self, conn: Any) -> None:
        answered = asyncio.get_running_loop().create_future()

        def on_response(data: bytes = b"", **_: Any) -> None:
            if data == b"CLOSE_WAIT" and not answered.done():
                answered.set_result(None)

        conn.on("response", on_response)
        try:
            conn.send(b"CLS\n")
            await asyncio.wait_for(answered, GOODBYE_TIMEOUT_S)
        except (TimeoutError, OSError, nsq_protocol.Error) as exc:
            logger.debug("%s: CLS on %s: %r", self.name, conn.id, exc)
        finally:
            conn.off("response", on_response)

    def close(self) -> None:
        """Close every connection; no reconnect, no lookupd poll, no timer survives this."""
        self._closed = True
        for handle in list(self._timers):
            self.io_loop.remove_timeout(handle)
        self._timers.clear()
        if self.redist_periodic is not None:
            self.redist_periodic.stop()
        if self.query_periodic is not None:
            self.query_periodic.stop()
        for conn in list(self.conns.values()):
            conn.close()
