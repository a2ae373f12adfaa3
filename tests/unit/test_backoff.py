"""stalk.backoff: the one doubling, and the four waits that use it.

Each user is checked against the hand-written loop it replaced, step for step, so the switch to
:class:`Backoff` changed no wait. No test sleeps: the sleeps are recorded, not taken.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stalk.backoff import Backoff, exponential_ceiling
from stalk.collectors.local import file as local_file
from stalk.collectors.local.file import SQLiteFile
from stalk.collectors.memory import MemoryAdapter
from stalk.ops import supervisor as sup
from stalk.ops.config import OpsConfig
from stalk.ops.fleet import Worker


def old_doubling(first_s: float, max_s: float, steps: int) -> list[float]:
    """The loop the four users each wrote by hand: wait, then ``min(wait * 2, max)``."""
    waits, wait = [], first_s
    for _ in range(steps):
        waits.append(wait)
        wait = min(wait * 2, max_s)
    return waits


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(1.0, 10.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_current_is_what_next_returns() -> None:
    b = Backoff(0.5, 4.0)
    for _ in range(5):
        expected = b.current_s
        assert b.next() == expected


def test_backoff_reset_goes_back_to_the_first_wait() -> None:
    b = Backoff(0.25, 2.0)
    for _ in range(10):
        b.next()
    b.reset()
    assert b.current_s == 0.25
    assert [b.next() for _ in range(3)] == [0.25, 0.5, 1.0]


def test_backoff_first_wait_is_not_cut_to_the_cap() -> None:
    # AMQP's connect pause starts at 0.5 s even when reconnect_interval_s is shorter.
    b = Backoff(0.5, 0.1)
    assert [b.next() for _ in range(3)] == [0.5, 0.1, 0.1]


def test_backoff_does_not_overflow_after_many_uses() -> None:
    b = Backoff(1e-3, 60.0)
    for _ in range(10_000):
        b.next()
    assert b.current_s == 60.0


@pytest.mark.parametrize(
    ("first_s", "max_s"),
    [(0.1, 5.0), (0.5, 2.0), (0.5, 0.1), (0.001, 0.05), (1.0, 30.0), (0.3, 0.3), (0.07, 1e9)],
)
def test_backoff_matches_the_hand_written_doubling(first_s: float, max_s: float) -> None:
    b = Backoff(first_s, max_s)
    assert [b.next() for _ in range(80)] == old_doubling(first_s, max_s, 80)


def test_poll_backoff_doubles_to_its_cap() -> None:
    b = Backoff(0.1, 0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def supervisor() -> sup.Supervisor:
    return sup.Supervisor(OpsConfig(), MemoryAdapter("q"), until_empty=False, command=["true"])


def test_supervisor_restart_delay_doubles_per_crash_in_a_row() -> None:
    s = supervisor()
    worker = Worker(0, started_at=time.monotonic() + 3600)  # crashed at once, every time
    delays = [s._delay(worker, 1) for _ in range(8)]
    old = [
        min(sup.MAX_RESTART_BACKOFF_S, sup.RESTART_BACKOFF_S * 2.0 ** (n - 1)) for n in range(1, 9)
    ]
    assert delays == old == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_supervisor_restart_delay_starts_afresh_after_a_stable_run_or_a_recycle() -> None:
    s = supervisor()
    worker = Worker(0, started_at=time.monotonic() + 3600)
    for _ in range(4):
        s._delay(worker, 1)
    worker.started_at = time.monotonic() - sup.STABLE_AFTER_S - 1
    assert s._delay(worker, 1) == sup.RESTART_BACKOFF_S
    assert s._delay(worker, sup.EXIT_RECYCLE) == 0.0
    worker.started_at = time.monotonic() + 3600
    assert s._delay(worker, 1) == sup.RESTART_BACKOFF_S


def test_supervisor_restart_delay_is_the_shared_ceiling() -> None:
    for crashes in range(1, 200):
        assert exponential_ceiling(1.0, crashes, 30.0) == min(30.0, 2.0 ** (crashes - 1))


def busy() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = 5  # type: ignore[attr-defined]
    return exc


def test_lock_retry_pauses_double_to_the_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = SQLiteFile(tmp_path / "q.db", full_sync=False, lock_timeout_s=3600)
    pauses: list[float] = []
    monkeypatch.setattr(
        local_file, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append)
    )
    tries = iter(range(12))

    def fn() -> str:
        if next(tries) < 11:
            raise busy()
        return "done"

    try:
        assert db.retry(fn) == "done"
    finally:
        db.conn.close()
    assert pauses == old_doubling(0.001, 0.05, 11)
    assert pauses[-1] == 0.05


def test_amqp_connect_pauses_double_to_the_reconnect_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("aio_pika")
    from stalk.collectors.amqp import broker
    from stalk.collectors.amqp.settings import AMQPSettings

    pauses: list[float] = []

    class Done(Exception):
        pass

    async def sleep(delay: float) -> None:
        pauses.append(delay)
        if len(pauses) == 8:
            raise Done

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("refused")

    monkeypatch.setattr(broker.aio_pika, "connect_robust", refuse)
    monkeypatch.setattr(broker, "asyncio", SimpleNamespace(sleep=sleep))
    settings = AMQPSettings(url="amqp://127.0.0.1:1/", connect_wait_s=3600, reconnect_interval_s=3)
    with pytest.raises(Done):
        asyncio.run(broker.connect(settings, "test"))
    assert pauses == old_doubling(0.5, 3.0, 8) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0]
