"""The local backend against its SQLite floor, and beside persist-queue and litequeue.

Usage: ``python -m benchmarks.local [--messages N] [--repeat R] [--publish]``
(``--publish`` adds the publish table and the competitors, which need the ``bench`` extra:
``pip install persist-queue litequeue``; a missing one is skipped).

The drain table (durability ``normal``, rounds interleaved, medians), each row as a ratio of:
- ``raw SQLite floor``: the same schema and statements with the ``sqlite3`` module alone, one
  lease of 100 and one delete of 100 per transaction: what any consumer of this file costs.

Rows of the publish table:
- ``local`` through stalk: publish one message per call (one commit each) and 1,000 per
  ``publish_batch`` commit; drain = :class:`stalk.BaseCollector` with a no-op handler and
  ``serve(until_empty=True)``, at each durability and concurrency.
- ``local raw loop``: the adapter alone, lease 100 + ack 100 per round, no engine: the ceiling
  the engine works under (the drain table adds the same loop with each ack riding on the next
  lease, ``ack_and_get_messages``, one call per round, as the engine sends them).
- persist-queue ``SQLiteAckQueue`` and ``litequeue``: their own loop (``put``; ``get``+``ack`` /
  ``pop``+``done``), one message at a time, in-process, with their default settings.
Bodies are 100 bytes. Each figure is the median of ``--repeat`` runs on a fresh file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import stalk
from stalk import BaseCollector, CollectorOptions, Message
from stalk.collectors.local import LocalAdapter, LocalSettings, sql

BODY = b"x" * 100
#: Bodies per ``publish_batch`` commit.
BATCH = 1000


def sync_noop(body: bytes) -> None:
    return None


async def async_noop(body: bytes) -> None:
    return None


async def _opened(path: Path, durability: str) -> LocalAdapter:
    adapter = LocalAdapter(
        "bench",
        settings=LocalSettings(path=str(path), durability=durability, max_queue_length=None),
    )
    await adapter.open()
    return adapter


def local_publish(path: Path, durability: str, n: int, batch: int) -> float:
    """Return publish msg/s: ``n`` bodies, ``batch`` per commit."""

    async def go() -> float:
        adapter = await _opened(path, durability)
        start = time.perf_counter()
        for _ in range(0, n, batch):
            await adapter.publish_batch([BODY] * batch)
        elapsed = time.perf_counter() - start
        await adapter.close()
        return n / elapsed

    return asyncio.run(go())


def local_drain(
    path: Path,
    durability: str,
    n: int,
    concurrency: int,
    handler: Callable[..., object],
    prefetch: int | None = None,
) -> float:
    """Return drain msg/s of stalk (default options but the polling period) over ``n``."""
    local_publish(path, durability, n, BATCH)
    options = CollectorOptions(
        concurrency=concurrency,
        prefetch=prefetch,
        polling_period_s=0.001,
        max_polling_period_s=0.01,
    )
    adapter = LocalAdapter("bench", settings=LocalSettings(path=str(path), durability=durability))
    collector = BaseCollector(adapter, handler, options)
    start = time.perf_counter()
    asyncio.run(collector.serve(until_empty=True))
    elapsed = time.perf_counter() - start
    assert collector.stats.acked == n, collector.stats
    return n / elapsed


def sqlite_floor(path: Path, n: int, batch: int = 100) -> float:
    """Return msg/s of a bare ``sqlite3`` loop on the same schema: lease ``batch`` rows in one
    ``UPDATE … RETURNING``, delete them in one transaction, as stalk's statements do."""
    local_publish(path, "normal", n, BATCH)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    while True:
        now = time.time()
        rows = conn.execute(sql.LEASE, (now + 30, "bench", now, batch)).fetchall()
        if not rows:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql.DELETE, [(row[0], row[6]) for row in rows])
        conn.execute(sql.COUNT, ("bench", -len(rows)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


@stalk.batch(max_size=100, max_wait_s=0.05)
def batch_noop(messages: list[Message]) -> None:
    return None


def local_raw(path: Path, n: int, batch: int = 100) -> float:
    """Return msg/s of the adapter alone: lease ``batch``, ack ``batch``, no engine."""
    local_publish(path, "normal", n, BATCH)

    async def go() -> float:
        adapter = await _opened(path, "normal")
        start = time.perf_counter()
        while messages := await adapter.get_messages(batch, 0):
            await adapter.ack(messages)
        elapsed = time.perf_counter() - start
        await adapter.close()
        return n / elapsed

    return asyncio.run(go())


def local_riding(path: Path, n: int, batch: int = 100) -> float:
    """Return msg/s of the adapter alone with each ack riding on the next lease
    (``ack_and_get_messages``: one call and one transaction per round), as the engine does."""
    local_publish(path, "normal", n, BATCH)

    async def go() -> float:
        adapter = await _opened(path, "normal")
        start = time.perf_counter()
        messages = await adapter.get_messages(batch, 0)
        while messages:
            messages = await adapter.ack_and_get_messages(messages, batch)
        elapsed = time.perf_counter() - start
        await adapter.close()
        return n / elapsed

    return asyncio.run(go())


def persist_queue(path: Path, n: int) -> tuple[float, float]:
    """Return (put msg/s, get+ack msg/s) of persist-queue's SQLiteAckQueue with its defaults."""
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(str(path))
    start = time.perf_counter()
    for _ in range(n):
        queue.put(BODY)
    put = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        queue.ack(queue.get(block=False))
    return put, n / (time.perf_counter() - start)


def litequeue_(path: Path, n: int) -> tuple[float, float]:
    """Return (put msg/s, pop+done msg/s) of litequeue with its defaults."""
    import litequeue

    queue = litequeue.LiteQueue(str(path))
    text = BODY.decode()
    start = time.perf_counter()
    for _ in range(n):
        queue.put(text)
    put = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        message = queue.pop()
        queue.done(message.message_id)
    return put, n / (time.perf_counter() - start)


def median(repeat: int, measure: Callable[[Path], float]) -> float:
    """Return the median of ``repeat`` measurements, each on a fresh file."""
    values = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            values.append(measure(Path(tmp) / "bench.db"))
    return statistics.median(values)


def drain_table(n: int, repeat: int) -> None:
    """Print the drain rows as ratios of the SQLite floor, rounds interleaved."""
    rows: list[tuple[str, Callable[[Path], float]]] = [
        ("raw SQLite floor (lease 100 + delete 100 per txn)", lambda p: sqlite_floor(p, n)),
        ("the local adapter alone, lease/ack 100, no engine", lambda p: local_raw(p, n)),
        (
            "the local adapter alone, ack riding on the next lease of 100",
            lambda p: local_riding(p, n),
        ),
    ]
    for c in (1, 8, 64):
        rows.append(
            (
                f"stalk sync no-op, concurrency {c}",
                lambda p, c=c: local_drain(p, "normal", n, c, sync_noop),
            )
        )
    for c in (1, 8):
        rows.append(
            (
                f"stalk async no-op, concurrency {c}",
                lambda p, c=c: local_drain(p, "normal", n, c, async_noop),
            )
        )
    rows.append(
        (
            "stalk sync, concurrency 8, prefetch 0 (free slots only)",
            lambda p: local_drain(p, "normal", n, 8, sync_noop, prefetch=0),
        )
    )
    rows.append(
        (
            "stalk batch handler of 100, concurrency 1",
            lambda p: local_drain(p, "normal", n, 1, batch_noop),
        )
    )
    results: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeat):
        for name, measure in rows:
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(measure(Path(tmp) / "bench.db"))
    floor = statistics.median(results[rows[0][0]])
    print(f"drain of {n} x 100 B, durability normal, median of {repeat} interleaved rounds\n")
    print("| what | msg/s | x raw SQLite floor |")
    print("|---|---|---|")
    for name, _ in rows:
        value = statistics.median(results[name])
        print(f"| {name} | {value:,.0f} | {value / floor:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="drained per run")
    parser.add_argument("--single", type=int, default=2_000, help="published one per commit")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--publish", action="store_true", help="also publish and competitors")
    args = parser.parse_args()
    n, single, r = args.messages, args.single, args.repeat
    drain_table(n, r)
    if not args.publish:
        return
    print()
    print(
        f"{n} messages drained, {single} published one per call, 100-byte bodies, "
        f"median of {r} runs\n"
    )
    print(
        "| system | durability | handler | concurrency | publish msg/s (1 per commit) "
        f"| publish msg/s ({BATCH} per commit) | drain msg/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for durability in ("full", "normal"):
        one = median(r, lambda p, d=durability: local_publish(p, d, single, 1))
        many = median(r, lambda p, d=durability: local_publish(p, d, n, BATCH))
        for handler in (sync_noop, async_noop):
            kind = "sync" if handler is sync_noop else "async"
            for concurrency in (1, 8, 64):
                drain = median(
                    r, lambda p, d=durability, c=concurrency, h=handler: local_drain(p, d, n, c, h)
                )
                print(
                    f"| stalk local | {durability} | {kind} no-op | {concurrency} | {one:,.0f} "
                    f"| {many:,.0f} | {drain:,.0f} |",
                    flush=True,
                )
    raw = median(r, lambda p: local_raw(p, n))
    print(
        f"| local raw loop (lease 100 + ack 100, no engine) | normal | inline | 1 | | | "
        f"{raw:,.0f} |"
    )
    others = (
        ("persist-queue SQLiteAckQueue", "persistqueue", persist_queue),
        ("litequeue", "litequeue", litequeue_),
    )
    for label, module, bench in others:
        if importlib.util.find_spec(module) is None:
            print(f"| {label} | not installed (pip install 'stalk[bench]') | | | | | |")
            continue
        put, drain = (
            statistics.median(x)
            for x in zip(
                *(bench(Path(tempfile.mkdtemp()) / "bench", single) for _ in range(r)), strict=True
            )
        )
        print(f"| {label} | its default | inline | 1 | {put:,.0f} | | {drain:,.0f} |")


if __name__ == "__main__":
    main()
