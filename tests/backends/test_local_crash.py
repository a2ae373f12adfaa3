"""Crash safety of the local backend with real processes: SIGKILL mid-batch, torn WAL tails,
and four processes draining one file.

Consumers run as ``python -m tests.backends.test_local_crash worker ...`` (this module doubles as
the worker), record each delivery as ``body attempt`` before returning, and so before the ack.
Waits are bounded to fail instead of hang; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stalk.collectors.local import LocalAdapter, LocalSettings

ROOT = Path(__file__).resolve().parents[2]
#: Longest a worker process may run before the test gives up on it (a hang guard, not a check).
PROCESS_LIMIT_S = 120


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _adapter(path: Path, source: str = "q", **settings: Any) -> LocalAdapter:
    adapter = LocalAdapter(source, settings=LocalSettings(path=str(path), **settings))
    adapter.bind(source, None)
    await adapter.open()
    return adapter


async def _publish(path: Path, bodies: list[bytes]) -> None:
    adapter = await _adapter(path)
    for start in range(0, len(bodies), 1000):
        await adapter.publish_batch(bodies[start : start + 1000])
    await adapter.close()


def _worker(
    path: Path,
    out: Path,
    *,
    lease_s: float,
    concurrency: int,
    sleep_s: float,
    until_empty: bool,
    prefetch: int | None = None,
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "tests.backends.test_local_crash",
        "worker",
        str(path),
        str(out),
        str(lease_s),
        str(concurrency),
        str(sleep_s),
        "1" if until_empty else "0",
        "default" if prefetch is None else str(prefetch),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE)


def _records(*outs: Path) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    for out in outs:
        if out.exists():
            for line in out.read_text().splitlines():
                body, attempt = line.split()
                rows.append((body, int(attempt)))
    return rows


def _finish(process: subprocess.Popen[bytes]) -> None:
    _, err = process.communicate(timeout=PROCESS_LIMIT_S)
    assert process.returncode == 0, f"worker failed:\n{err.decode()[-3000:]}"
    assert b"locked" not in err, f"a lock error reached the worker:\n{err.decode()[-3000:]}"


def test_sigkill_mid_batch_loses_nothing(tmp_path: Path) -> None:
    path, bodies = tmp_path / "stalk.db", [f"m{i}".encode() for i in range(400)]
    run(_publish(path, bodies))
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"
    first = _worker(path, first_out, lease_s=1.0, concurrency=8, sleep_s=0.005, until_empty=False)
    deadline = time.monotonic() + PROCESS_LIMIT_S
    while len(_records(first_out)) < 100:
        assert first.poll() is None, "the first worker exited before it was killed"
        assert time.monotonic() < deadline, "the first worker handled nothing"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=PROCESS_LIMIT_S)
    second = _worker(path, second_out, lease_s=30, concurrency=4, sleep_s=0, until_empty=True)
    _finish(second)
    seen = {body for body, _ in _records(first_out, second_out)}
    lost = {b.decode() for b in bodies} - seen
    assert not lost, f"lost {len(lost)} messages, e.g. {sorted(lost)[:10]}"
    redelivered = [body for body, attempt in _records(second_out) if attempt > 1]
    assert redelivered, "nothing was in flight when the first worker died: not mid-batch"
    backlog = run(_backlog(path))
    assert (backlog.ready, backlog.delayed, backlog.in_flight) == (0, 0, 0)


def test_sigkill_with_prefetched_unstarted_messages_loses_nothing(tmp_path: Path) -> None:
    """A worker holding a prefetch buffer (leased, not started) is SIGKILLed: the buffered
    messages come back when their lease lapses and another worker handles every one."""
    path, bodies = tmp_path / "stalk.db", [f"m{i}".encode() for i in range(300)]
    run(_publish(path, bodies))
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"
    first = _worker(
        path, first_out, lease_s=3.0, concurrency=1, sleep_s=0.02, until_empty=False, prefetch=100
    )
    deadline = time.monotonic() + PROCESS_LIMIT_S
    while len(_records(first_out)) < 10:
        assert first.poll() is None, "the first worker exited before it was killed"
        assert time.monotonic() < deadline, "the first worker handled nothing"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=PROCESS_LIMIT_S)
    held = run(_backlog(path)).in_flight
    handled_first = len(_records(first_out))
    assert held is not None and held > 20, f"only {held} leased at the kill: no prefetch buffer"
    second = _worker(path, second_out, lease_s=30, concurrency=4, sleep_s=0, until_empty=True)
    _finish(second)
    seen = {body for body, _ in _records(first_out, second_out)}
    lost = {b.decode() for b in bodies} - seen
    assert not lost, f"lost {len(lost)} messages, e.g. {sorted(lost)[:10]}"
    redelivered = {body for body, attempt in _records(second_out) if attempt > 1}
    assert len(redelivered) >= held - 2, (
        f"{held} were leased by the dead worker ({handled_first} handled), "
        f"but only {len(redelivered)} came back as redeliveries"
    )


async def _backlog(path: Path) -> Any:
    adapter = await _adapter(path)
    try:
        return await adapter.backlog()
    finally:
        await adapter.close()


def test_four_processes_drain_one_file_without_loss(tmp_path: Path) -> None:
    path, total = tmp_path / "stalk.db", 20_000
    run(_publish(path, [f"m{i}".encode() for i in range(total)]))
    outs = [tmp_path / f"out{i}.txt" for i in range(4)]
    workers = [
        _worker(path, out, lease_s=30, concurrency=8, sleep_s=0, until_empty=True) for out in outs
    ]
    for worker in workers:
        _finish(worker)
    records = _records(*outs)
    counts = collections.Counter(body for body, _ in records)
    assert len(counts) == total, f"lost {total - len(counts)} messages"
    duplicates = {body for body, n in counts.items() if n > 1}
    relet = {body for body, attempt in records if attempt > 1}
    print(f"4 processes: {len(records)} deliveries, {len(duplicates)} duplicates")
    assert duplicates <= relet, "a message was delivered twice within one lease"
    assert all(len(_records(out)) > 0 for out in outs), "a process never got a message"


# ---------------------------------------------------------------------- torn WAL tails
_WRITER = """
import asyncio, os, sys
from stalk.collectors.local import LocalAdapter, LocalSettings
async def main():
    adapter = LocalAdapter("q", settings=LocalSettings(path=sys.argv[1], durability="full"))
    adapter.bind("q", None)
    await adapter.open()
    for i in range(50):
        await adapter.publish(f"m{i}".encode() * 50)
    os._exit(0)  # a crash: no close, no checkpoint; the WAL holds every commit
asyncio.run(main())
"""


def _damage(wal: Path, how: str) -> None:
    data = wal.read_bytes()
    if how == "truncate":
        wal.write_bytes(data[:-1000])
    elif how == "junk":
        wal.write_bytes(data[:-1000] + os.urandom(1000))
    else:
        wal.write_bytes(data + os.urandom(5000))


@pytest.mark.parametrize("how", ["truncate", "junk", "append"])
def test_torn_wal_tail_reopens_with_committed_messages_intact(tmp_path: Path, how: str) -> None:
    path = tmp_path / "stalk.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=PROCESS_LIMIT_S,
    )
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 50 * 4096, "the commits are not in the WAL"
    _damage(wal, how)

    async def read_back() -> list[bytes]:
        adapter = await _adapter(path)
        messages = await adapter.get_messages(100, 0)
        await adapter.close()
        return [m.body for m in messages]

    bodies = run(read_back())
    expected = [f"m{i}".encode() * 50 for i in range(50)]
    assert len(bodies) >= 49, f"only {len(bodies)} of 50 committed messages survived"
    assert bodies == expected[: len(bodies)], "a surviving message is not intact or out of order"
    if how == "append":
        assert len(bodies) == 50


# ---------------------------------------------------------------------- the worker process
def _worker_main(argv: list[str]) -> None:
    from stalk import BaseCollector, CollectorOptions

    path, out, lease_s, concurrency, sleep_s, until_empty, prefetch = argv
    lock = threading.Lock()
    options = CollectorOptions(
        concurrency=int(concurrency),
        visibility_timeout_s=float(lease_s),
        polling_period_s=0.01,
        max_polling_period_s=0.1,
        batch_size=int(concurrency),
        prefetch=None if prefetch == "default" else int(prefetch),
    )
    adapter = LocalAdapter("q", settings=LocalSettings(path=path, durability="normal"))
    # Line-buffered: each record reaches the OS at once, so it outlives a SIGKILL.
    with open(out, "a", buffering=1) as sink:

        def handler(body: bytes, message: Any) -> None:
            if float(sleep_s):
                time.sleep(float(sleep_s))
            with lock:
                sink.write(f"{body.decode()} {message.attempt}\n")

        collector = BaseCollector(adapter, handler, options)
        asyncio.run(collector.serve(until_empty=until_empty == "1"))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(sys.argv[2:])
