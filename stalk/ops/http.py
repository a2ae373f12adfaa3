"""The control and health server: a tiny HTTP/1.1 server on the collector's own event loop.

Endpoints::

    GET  /healthz                  200 "ok" when connected and the loop answers, else 503 + reason
    GET  /metrics                  Prometheus text format (see stalk.ops.prometheus)
    GET  /status                   JSON: state, backend, source, concurrency, in_flight, counts
    POST /sleep | /wake            stop / start intake
    POST /scale?concurrency=N      change concurrency live

Why stdlib ``asyncio.start_server`` and not a web framework: five routes, one connection per
request, no new core dependency, and the server shares the loop with the engine, so ``/status``
reads counters without locks and a stalled loop shows as an unanswered probe. It binds
127.0.0.1 unless told otherwise; a POST carrying a browser ``Origin`` header is refused, so a web
page cannot drive a local worker. A port conflict is logged and the collector runs on without the
server (the Go Stalk exited). Nothing served contains credentials: text goes through
:func:`stalk.logs.redact` and adapters describe themselves without secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from stalk.ops.prometheus import MetricsExporter
from stalk.ops.status import Snapshot
from stalk.options import MAX_CONCURRENCY

if TYPE_CHECKING:
    from stalk.engine.collector import BaseCollector

logger = logging.getLogger(__name__)

#: Seconds a client gets to send its request before the connection is dropped.
READ_TIMEOUT_S = 10.0
#: Longest request line or header line accepted, and most header lines.
MAX_LINE_BYTES = 8192
MAX_HEADERS = 64
#: Largest request body read (only ``/scale`` looks at one).
MAX_BODY_BYTES = 65536


class Control(Protocol):
    """What the server drives: one collector, or a supervisor of worker processes."""

    async def status(self) -> dict[str, Any]:
        """Return the ``/status`` document."""
        ...

    async def health(self) -> tuple[bool, str]:
        """Return (healthy, reason)."""
        ...

    async def metrics(self) -> tuple[bytes, str]:
        """Return the exposition body and its content type."""
        ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...

    async def scale(self, concurrency: int) -> None: ...


class CollectorControl:
    """:class:`Control` over one in-process collector.

    Args:
        collector: the collector to drive.
        extras: called for each ``/status`` to add fields (autoscale bounds, recycling).
    """

    def __init__(
        self,
        collector: BaseCollector,
        extras: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.collector = collector
        self.extras = extras
        self.exporter = MetricsExporter(lambda: [Snapshot.of(collector)])

    async def status(self) -> dict[str, Any]:
        status = Snapshot.of(self.collector).as_dict()
        if self.extras is not None:
            status.update(self.extras())
        return status

    async def health(self) -> tuple[bool, str]:
        snap = Snapshot.of(self.collector)
        if snap.state in ("draining", "stopped"):
            return False, snap.state
        if not snap.healthy:
            return False, snap.health_reason
        if not self.collector.intake_alive:
            return False, "intake loop stopped (see the log)"
        return True, "ok" if snap.state == "awake" else f"ok ({snap.state})"

    async def metrics(self) -> tuple[bytes, str]:
        return self.exporter.render()

    async def sleep(self) -> None:
        self.collector.sleep()

    async def wake(self) -> None:
        self.collector.wake()

    async def scale(self, concurrency: int) -> None:
        self.collector.scale(concurrency)


@dataclass(frozen=True, slots=True)
class Request:
    """The parts of a request the routes read."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response; the connection closes after it."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None


REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _json(status: int, doc: object) -> Response:
    return Response(status, (json.dumps(doc) + "\n").encode(), "application/json")


class ControlServer:
    """Serve a :class:`Control` over HTTP on ``host:port`` (port 0 picks a free one).

    Use ``await start()`` then ``await close()``; :attr:`port` is the bound port once started.
    """

    def __init__(self, control: Control, host: str = "127.0.0.1", port: int = 0) -> None:
        self.control = control
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._routes: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
            "/healthz": ("GET", self._healthz),
            "/metrics": ("GET", self._metrics),
            "/status": ("GET", self._status),
            "/sleep": ("POST", self._sleep),
            "/wake": ("POST", self._wake),
            "/scale": ("POST", self._scale),
        }

    async def start(self) -> bool:
        """Listen; on failure (port taken, bad host) log one error line and return False."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_LINE_BYTES
            )
        except OSError as exc:
            logger.error(
                "control server not started: cannot listen on %s:%s (%s); "
                "the collector keeps running without /healthz, /metrics and /status",
                self.host,
                self.port,
                exc.strerror or exc,
            )
            return False
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("control server on http://%s:%d", self.host, self.port)
        return True

    async def close(self) -> None:
        """Stop listening and wait for open connections to finish."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT_S)
            except (ValueError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                request = None
            if request is None:
                response = Response(400, b"bad request\n")
                method = "GET"
            else:
                response, method = await self._dispatch(request), request.method
            writer.write(_encode(response, head_only=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, request: Request) -> Response:
        route = self._routes.get(request.path.rstrip("/") or "/")
        if route is None:
            return Response(404, b"not found; try /healthz, /metrics, /status\n")
        method, handle = route
        allowed = {method, "HEAD"} if method == "GET" else {method}
        if request.method not in allowed:
            return Response(405, f"use {method}\n".encode(), allow=", ".join(sorted(allowed)))
        if request.method == "POST" and "origin" in request.headers:
            return Response(403, b"cross-origin requests are refused\n")
        try:
            return await handle(request)
        except Exception as exc:
            logger.exception("control request %s %s failed", request.method, request.path)
            return _json(500, {"error": type(exc).__name__})

    async def _healthz(self, request: Request) -> Response:
        healthy, reason = await self.control.health()
        return Response(200 if healthy else 503, f"{reason}\n".encode())

    async def _metrics(self, request: Request) -> Response:
        body, content_type = await self.control.metrics()
        return Response(200, body, content_type)

    async def _status(self, request: Request) -> Response:
        return _json(200, await self.control.status())

    async def _sleep(self, request: Request) -> Response:
        await self.control.sleep()
        return _json(200, await self.control.status())

    async def _wake(self, request: Request) -> Response:
        await self.control.wake()
        return _json(200, await self.control.status())

    async def _scale(self, request: Request) -> Response:
        values = request.query.get("concurrency") or parse_qs(request.body.decode("latin-1")).get(
            "concurrency"
        )
        try:
            concurrency = int(values[-1]) if values else 0
        except ValueError:
            concurrency = 0
        # One cap for every way in (options, scale(), /scale, --autoscale, SIGTTIN): the
        # collector's own, so a request it would refuse is a 400 here, not a 500 there.
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            return _json(
                400, {"error": f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}"}
            )
        await self.control.scale(concurrency)
        return _json(200, await self.control.status())


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = (await reader.readline()).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        return None
    length = int(headers.get("content-length", "0") or 0)
    if length < 0 or length > MAX_BODY_BYTES:
        return None
    body = await reader.readexactly(length) if length else b""
    target = urlsplit(parts[1])
    return Request(parts[0].upper(), target.path, parse_qs(target.query), headers, body)


def _encode(response: Response, *, head_only: bool) -> bytes:
    head = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.allow:
        head.append(f"Allow: {response.allow}")
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return data if head_only else data + response.body
