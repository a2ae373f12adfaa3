"""stalk's nsq adapter beside a raw pynsq Reader (and a raw ansq connection), same nsqd, same run.

Usage: ``python -m benchmarks.nsq [--messages N] [--max-in-flight 1,10,100] [--repeat R]
[--nsqd HOST:PORT --nsqd-http HOST:PORT]``. Without ``--nsqd`` it starts its own nsqd on free
loopback ports with a temp data dir (binary from PATH or scripts/start-nsqd.sh's cache) and
stops it at the end. ansq is optional (``pip install ansq``) and skipped when missing.

Each round fills a fresh topic (its channel created first) with ``N`` 100-byte messages by
MPUB, then times a cold drain, connection set-up included, until every message is FINed:

- ``raw pynsq``: ``nsq.Reader(max_in_flight=M, max_tries=0)`` with a synchronous handler that
  returns True (pynsq FINs it). The floor any pynsq consumer works on.
- ``stalk nsq``: :class:`stalk.BaseCollector` over :class:`NSQAdapter` with a no-op async
  handler and ``concurrency = M``; stops the clock once the engine has acked all ``N``.
- ``raw ansq``: one ansq connection, ``SUB`` + ``RDY M``, ``async for`` + ``await fin()``; for
  context (asyncio-native, another client library).

Contenders alternate within each round; each figure is the median of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nsq  # type: ignore[import-untyped]

from benchmarks import drain_seconds
from stalk import BaseCollector, CollectorOptions
from stalk.collectors.nsq import NSQAdapter, NSQSettings, http

BODY = b"x" * 100
CHANNEL = "stalk"

Drain = Callable[[str, str, int, int], Awaitable[float]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def own_nsqd() -> Iterator[tuple[str, str]]:
    """Start nsqd on free loopback ports with a temp data dir; yield (tcp, http)."""
    cache = Path(os.environ.get("STALK_NSQ_BUILD", Path.home() / ".cache" / "stalk-nsq"))
    binary = shutil.which("nsqd") or str(cache / "bin" / "nsqd")
    if not Path(binary).exists():
        raise SystemExit("no nsqd: run scripts/start-nsqd.sh")
    tcp, web = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    data = tempfile.mkdtemp(prefix="stalk-bench-nsqd-")
    proc = subprocess.Popen(
        [binary, f"--tcp-address={tcp}", f"--http-address={web}",
         "--broadcast-address=127.0.0.1", f"--data-path={data}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{web}/ping", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("nsqd did not start") from None
                time.sleep(0.05)
        yield tcp, web
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


async def fill(tcp: str, web: str, topic: str, n: int) -> None:
    """Create topic and channel, then MPUB ``n`` messages through the adapter's writer."""
    await asyncio.to_thread(http.create_channel, web, topic, CHANNEL, 5.0)
    adapter = NSQAdapter(topic, settings=NSQSettings(nsqd=tcp, nsqd_http=web))
    await adapter.open()
    try:
        await adapter.publish_batch([BODY] * n)
    finally:
        await adapter.close()


async def raw_pynsq(tcp: str, topic: str, n: int, max_in_flight: int) -> float:
    done = asyncio.Event()
    count = 0

    def handler(message: nsq.Message) -> bool:
        nonlocal count
        count += 1
        if count == n:
            done.set()
        return True

    start = time.perf_counter()
    reader = nsq.Reader(
        topic=topic, channel=CHANNEL, message_handler=handler, nsqd_tcp_addresses=[tcp],
        max_in_flight=max_in_flight, max_tries=0,
    )  # fmt: skip
    await done.wait()
    elapsed = time.perf_counter() - start
    reader.close()  # it would reconnect in 15 s (pynsq#196); each round has its own topic
    return elapsed


async def stalk_nsq(tcp: str, topic: str, n: int, max_in_flight: int) -> float:
    async def handler(body: bytes) -> None:
        return None

    start = time.perf_counter()
    adapter = NSQAdapter(topic, settings=NSQSettings(nsqd=tcp, nsqd_http=""))
    collector = BaseCollector(adapter, handler, CollectorOptions(concurrency=max_in_flight))
    return await drain_seconds(collector, n, start)


async def raw_ansq(tcp: str, topic: str, n: int, max_in_flight: int) -> float:
    from ansq import open_connection

    host, _, port = tcp.rpartition(":")
    start = time.perf_counter()
    conn = await open_connection(host, int(port))
    await conn.subscribe(topic, CHANNEL, max_in_flight)
    count = 0
    async for message in conn.messages():
        await message.fin()
        count += 1
        if count == n:
            break
    elapsed = time.perf_counter() - start
    await conn.close()
    return elapsed


def contenders() -> dict[str, Drain]:
    found: dict[str, Drain] = {"raw pynsq": raw_pynsq, "stalk nsq": stalk_nsq}
    if importlib.util.find_spec("ansq") is not None:
        found["raw ansq"] = raw_ansq
    return found


async def measure(
    tcp: str, web: str, n: int, levels: list[int], repeat: int
) -> dict[tuple[str, int], float]:
    """Return median msg/s per (contender, max_in_flight)."""
    rates: dict[tuple[str, int], list[float]] = {}
    for level in levels:
        for _ in range(repeat):
            for name, drain in contenders().items():
                topic = f"stalk-bench-{uuid.uuid4().hex[:8]}"
                await fill(tcp, web, topic, n)
                seconds = await drain(tcp, topic, n, level)
                rates.setdefault((name, level), []).append(n / seconds)
    return {key: statistics.median(values) for key, values in rates.items()}


def table(rates: dict[tuple[str, int], float], n: int, repeat: int) -> str:
    lines = [
        f"NSQ drain, {n} 100-byte messages, median of {repeat}, same nsqd 1.3.0:",
        "",
        "| contender | max_in_flight | msg/s | vs raw pynsq |",
        "|---|---:|---:|---:|",
    ]
    for (name, level), rate in rates.items():
        raw = rates[("raw pynsq", level)]
        lines.append(f"| {name} | {level} | {rate:,.0f} | {rate / raw:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nsq", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--max-in-flight", default="1,10,100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nsqd", default="")
    parser.add_argument("--nsqd-http", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # Raw pynsq logs IntegrityError('failed to unpack size') at ERROR on every clean close.
    logging.getLogger("nsq").setLevel(logging.CRITICAL)
    levels = [int(p) for p in args.max_in_flight.split(",")]
    if args.nsqd:
        web = args.nsqd_http or NSQSettings(nsqd=args.nsqd).http_address()
        rates = asyncio.run(measure(args.nsqd, web, args.messages, levels, args.repeat))
    else:
        with own_nsqd() as (tcp, web):
            rates = asyncio.run(measure(tcp, web, args.messages, levels, args.repeat))
    print(table(rates, args.messages, args.repeat))


if __name__ == "__main__":
    main()
