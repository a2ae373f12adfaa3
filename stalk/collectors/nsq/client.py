"""pynsq made safe for stalk: the shared connection class; :mod:`.reader` and :mod:`.writer`.

pynsq (0.9.1) runs on tornado's IOLoop, which in tornado 6 wraps the running asyncio loop, so
every callback runs on the engine's loop without ``nsq.run()``. Its traps, each measured
against nsqd 1.3.0, and what stalk does about them:

* ``max_tries`` (default 5) FINs the message silently past the limit: set to 0, and messages are
  handed over in ``Reader._on_message`` without pynsq's handler wrapper at all, so nothing is
  ever finished or requeued behind stalk's back (the wrapper also REQs with backoff on a raise).
* ``requeue(delay=1.5)`` becomes 90 s x attempts (a float is ignored) and a plain ``requeue()``
  turns reader backoff on (RDY 0 for seconds): stalk only calls
  ``requeue(time_ms=..., backoff=False)``.
* ``close()`` does not stop reconnects (pynsq#196) and the reconnect is a fixed 15 s (10 s
  throttle on top): Reader and Writer here redial after ``reconnect_interval_s`` and never once
  closed. The Writer has no ``close()``: it has one here.
* A clean close logs ``IntegrityError('failed to unpack size')``, a refused connect a traceback:
  here a lost connection is one warning per outage, and nothing while closing.
* The Writer fails every pending callback on any error frame, so a later ``OK`` would be paired
  with the wrong publish: an error closes that connection (pending publishes fail, never
  misreport).
* RDY starts at 1 per connection and ``set_max_in_flight`` only takes effect on the next
  message: :meth:`Reader.apply_rdy` and the connect path send the full RDY at once.
  ``Reader(max_in_flight=0)`` asserts, so sleep is RDY 0 after the start.
* Speed: pynsq reads every frame with two futures and FINs with one syscall per message;
  :class:`Conn` reads in chunks and :meth:`Reader.finish_many` FINs a batch in one write.

The pynsq names used beyond its documented API (``_send_rdy``, ``_connection_max_in_flight``,
``_maybe_update_rdy``, ``_pub``, ``_has_responded``, ``conns``, ``in_flight``) are unchanged
in pynsq 0.9.1, the version this was measured with.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import nsq  # type: ignore[import-untyped]
from nsq import protocol as nsq_protocol
from tornado.ioloop import IOLoop

logger = logging.getLogger(__name__)

#: nsqd's frame size prefix: 4 bytes, big-endian.
_SIZE = struct.Struct(">l")


class Conn(nsq.AsyncConn):  # type: ignore[misc]
    """An AsyncConn that reads frames in chunks and fails a connect quietly.

    pynsq reads every frame with two ``read_bytes`` futures (size, then body), four loop
    callbacks per message; here one read takes whatever the socket has (up to
    ``READ_CHUNK_BYTES``) and every complete frame in it is dispatched in that one callback.
    stalk negotiates no TLS, snappy or deflate, the upgrades that need pynsq's own reads.
    """

    #: Most bytes one read takes from the socket.
    READ_CHUNK_BYTES = 256 * 1024

    def connected(self) -> bool:
        # pynsq's state turns DISCONNECTED only in the close callback, a loop turn after the
        # stream closed: a publish or FIN in between would fail on a dead stream.
        return bool(super().connected() and self.stream is not None and not self.stream.closed())

    def _connect_callback(self, fut: Any) -> None:
        if fut.exception() is not None:  # the stream's close callback reports it
            return
        super()._connect_callback(fut)

    def _start_read(self) -> None:
        if self.stream is None:
            return
        self._pending = bytearray()
        self._read_chunk()

    def _read_chunk(self) -> None:
        try:
            fut = self.stream.read_bytes(self.READ_CHUNK_BYTES, partial=True)
        except OSError:  # StreamClosedError is an OSError (IOError, as pynsq catches)
            self.close()
            self.trigger("error", conn=self, error=nsq_protocol.ConnectionClosedError("closed"))
            return
        IOLoop.current().add_future(fut, self._on_chunk)

    def _on_chunk(self, fut: Any) -> None:
        try:
            data = fut.result()
        except Exception:
            self.close()
            self.trigger("error", conn=self, error=nsq_protocol.ConnectionClosedError("closed"))
            return
        pending = self._pending
        pending += data
        offset, end = 0, len(pending)
        while end - offset >= 4:
            (size,) = _SIZE.unpack_from(pending, offset)
            if end - offset - 4 < size:
                break
            frame = bytes(pending[offset + 4 : offset + 4 + size])
            offset += 4 + size
            try:
                self.trigger("data", conn=self, data=frame)
            except Exception:
                logger.exception("uncaught exception in data event")
            if self.stream is None or self.stream.closed():
                return
        del pending[:offset]
        self._read_chunk()


def quiet_error(owner: Any, conn: Any, error: Any, closing: bool) -> None:
    text = f"{owner.name}: nsqd {conn.id}: {error}"
    if closing or isinstance(
        error, nsq_protocol.IntegrityError | nsq_protocol.ConnectionClosedError
    ):
        logger.debug("%s", text)  # pynsq reports every clean close this way
    else:
        logger.warning("%s", text)
