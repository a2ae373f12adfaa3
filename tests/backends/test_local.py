"""The local backend's own behaviour on real files: leases, fences, limits, topics, bad input."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, fatal
from stalk.collectors.local import LocalAdapter, LocalSettings
from stalk.errors import ConfigError, MessageTooLarge, QueueFull, QueueNotFound
from stalk.message import ATTR_REASON, ATTR_SOURCE, Failure
from stalk.ops.redrive import ATTR_REDRIVEN_AT, redrive, redrive_by_name
from stalk.testing.harness import FAST_OPTIONS


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def opened(
    path: Path, source: str = "q", lease_s: float = 30.0, **settings: Any
) -> LocalAdapter:
    adapter = LocalAdapter(source, settings=LocalSettings(path=str(path), **settings))
    adapter.bind(source, None, lease_s)
    await adapter.open()
    return adapter


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "stalk.db"


# ---------------------------------------------------------------------- file and lifecycle
def test_open_creates_private_directory_and_file(db: Path) -> None:
    async def scenario() -> None:
        adapter = await opened(db)
        await adapter.publish(b"x")
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{db}{suffix}").st_mode) == 0o600, suffix
        await adapter.close()
        await adapter.close()  # idempotent

    run(scenario())
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_path_comes_from_environment(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    monkeypatch.setenv("STALK_LOCAL_PATH", str(db))
    adapter = LocalAdapter.from_options("q", None, {})
    assert adapter.path == db
    assert LocalAdapter.from_options("q", None, {"path": "x.db"}).path == Path("x.db")


def test_unknown_option_and_bad_durability_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no option 'colour'"):
        LocalAdapter.from_options("q", None, {"colour": "red"})
    with pytest.raises(ConfigError, match="durability"):
        LocalAdapter.from_options("q", None, {"durability": "sometimes"})


def test_publish_survives_reopen(db: Path) -> None:
    async def scenario() -> None:
        first = await opened(db, durability="full")
        await first.publish(b"kept", {"k": "v"})
        await first.close()
        second = await opened(db)
        [message] = await second.get_messages(10, 0)
        assert (message.body, message.attributes, message.attempt) == (b"kept", {"k": "v"}, 1)
        await second.close()

    run(scenario())


# ---------------------------------------------------------------------- leases and fences
def test_lease_hides_message_until_it_expires_then_redelivers(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db, lease_s=0.3)
        b = await opened(db, lease_s=30)
        await a.publish(b"m")
        [first] = await a.get_messages(10, 0)
        assert await b.get_messages(10, 0) == [], "a leased message was delivered twice"
        await asyncio.sleep(0.4)
        [again] = await b.get_messages(10, 0)
        assert again.id == first.id and again.attempt == 2
        await a.ack([first])  # stale: its lease lapsed and b holds it now
        assert (await b.backlog()).in_flight == 1, "a stale ack deleted another worker's lease"
        await a.retry_later(first, 0)
        await a.extend(first, 60)
        await b.ack([again])
        assert (await b.backlog()).in_flight == 0
        await a.close()
        await b.close()

    run(scenario())


def test_retry_later_sets_visible_at_and_keeps_attributes(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db)
        await a.publish(b"m")
        [m] = await a.get_messages(1, 0)
        m.attributes["note"] = "saved"
        await a.retry_later(m, 0.3)
        backlog = await a.backlog()
        assert (backlog.ready, backlog.delayed, backlog.in_flight) == (0, 1, 0)
        assert await a.get_messages(1, 0) == []
        await asyncio.sleep(0.35)
        [again] = await a.get_messages(1, 0)
        assert (again.attempt, again.attributes["note"]) == (2, "saved")
        await a.release(again)
        [third] = await a.get_messages(1, 0)
        assert third.attempt == 2, "release counted an unhandled delivery"
        await a.close()

    run(scenario())


def test_poll_waits_for_a_message_falling_due_within_wait(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db)
        await a.publish(b"soon", delay_s=0.2)
        await a.publish(b"much later", delay_s=3600)
        assert await a.get_messages(10, 0) == []
        assert [m.body for m in await a.get_messages(10, 5.0)] == [b"soon"]
        assert await a.get_messages(10, 0.05) == []
        await a.close()

    run(scenario())


def test_delayed_publish_and_backlog_counts(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db)
        await a.publish_batch([b"1", b"2", b"3"])
        await a.publish(b"later", delay_s=60)
        await a.get_messages(1, 0)
        backlog = await a.backlog()
        assert (backlog.ready, backlog.delayed, backlog.in_flight, backlog.errors) == (2, 1, 1, 0)
        assert backlog.oldest_age_s is not None and backlog.oldest_age_s >= 0
        await a.close()

    run(scenario())


def test_publish_error_moves_row_with_failure_metadata(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db)
        await a.publish(b"bad", {"trace": "t1"})
        [m] = await a.get_messages(1, 0)
        await a.publish_error(m, Failure.build(m, "fatal", ValueError("nope")))
        await a.ack([m])  # what the engine does next: must be a quiet no-op
        assert (await a.backlog()).errors == 1
        errors = await opened(db, "q-errors")
        [dead] = await errors.get_messages(1, 0)
        assert dead.body == b"bad" and dead.attributes["trace"] == "t1"
        assert dead.attributes[ATTR_REASON] == "fatal" and dead.attributes[ATTR_SOURCE] == "q"
        await a.close()
        await errors.close()

    run(scenario())


# ---------------------------------------------------------------------- limits
def test_body_over_limit_raises_and_publishes_nothing(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db, max_message_bytes=10)
        with pytest.raises(MessageTooLarge, match="max_message_bytes=10"):
            await a.publish_batch([b"small", b"x" * 11])
        assert (await a.backlog()).ready == 0
        await a.close()

    run(scenario())


def test_queue_full_raises(db: Path) -> None:
    async def scenario() -> None:
        a = await opened(db, max_queue_length=3)
        await a.publish_batch([b"1", b"2"])
        with pytest.raises(QueueFull, match="max_queue_length is 3"):
            await a.publish_batch([b"3", b"4"])
        await a.publish(b"3")
        [m] = await a.get_messages(1, 0)
        await a.ack([m])
        await a.publish(b"4")  # room again after an ack
        await a.close()

    run(scenario())


def test_expired_message_goes_to_error_topic_with_reason_expired(db: Path) -> None:
    """The adapter reports ``expires_at``; the engine's policy routes (and counts) the expiry."""

    async def scenario() -> None:
        a = await opened(db, message_ttl_s=0.1)
        await a.publish(b"stale")
        await asyncio.sleep(0.15)
        await a.publish(b"fresh")
        got = await a.get_messages(10, 0)
        assert [m.body for m in got] == [b"stale", b"fresh"]
        assert got[0].expires_at is not None and got[0].expires_at <= time.time()
        assert got[1].expires_at is not None and got[1].expires_at > time.time()
        for message in got:
            await a.release(message)
        await a.close()
        handled: list[bytes] = []
        consumer = LocalAdapter("q", settings=LocalSettings(path=str(db)))
        collector = BaseCollector(
            consumer, lambda body: handled.append(body), CollectorOptions(**FAST_OPTIONS)
        )
        await collector.serve(until_empty=True)
        assert handled == [b"fresh"]
        assert collector.stats.errored["expired"] == 1
        errors = await opened(db, "q-errors")
        [dead] = await errors.get_messages(10, 0)
        assert dead.body == b"stale" and dead.attributes[ATTR_REASON] == "expired"
        await errors.close()

    run(scenario())


# ---------------------------------------------------------------------- fan-out
def test_topic_copies_to_each_subscription_and_late_one_starts_empty(db: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(QueueNotFound, match="no subscriptions"):
            producer = await opened(db, "producer", topic="orders")
            await producer.unsubscribe("orders")
            await producer.publish(b"nowhere")
        billing = await opened(db, "billing", topic="orders")
        audit = await opened(db, "audit", topic="orders")
        await billing.publish(b"o1")
        late = await opened(db, "late", topic="orders")
        await late.publish(b"o2")
        assert [m.body for m in await billing.get_messages(10, 0)] == [b"o1", b"o2"]
        assert [m.body for m in await audit.get_messages(10, 0)] == [b"o1", b"o2"]
        assert [m.body for m in await late.get_messages(10, 0)] == [b"o2"]
        stats = await audit.topic_stats()
        assert sorted(stats) == ["audit", "billing", "late"]
        assert stats["late"].in_flight == 1 and stats["late"].errors == 0
        for adapter in (producer, billing, audit, late):
            await adapter.close()

    run(scenario())


# ---------------------------------------------------------------------- redrive
def test_redrive_moves_errors_back_with_attempts_reset_and_metadata_kept(db: Path) -> None:
    async def scenario() -> None:
        source = await opened(db, "jobs")
        await source.publish_batch([b"a", b"b", b"c"])
        await source.close()
        options = CollectorOptions(source="jobs", polling_period_s=0.01, max_polling_period_s=0.05)
        settings = LocalSettings(path=str(db))
        collector = BaseCollector(LocalAdapter(settings=settings), lambda b: fatal("no"), options)
        await collector.serve(until_empty=True)
        errors, jobs = await opened(db, "jobs-errors"), await opened(db, "jobs")
        assert await redrive(errors, jobs, limit=2) == 2
        moved = await jobs.get_messages(10, 0)
        assert sorted(m.body for m in moved) == [b"a", b"b"]
        assert all(m.attempt == 1 and m.attributes[ATTR_REASON] == "fatal" for m in moved)
        assert all(ATTR_REDRIVEN_AT in m.attributes for m in moved)
        with pytest.raises(ConfigError, match="same place"):
            await redrive(jobs, jobs)
        await errors.close()
        await jobs.close()
        assert await redrive_by_name(LocalAdapter, {"path": str(db)}, "jobs-errors", "jobs") == 1

    run(scenario())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name", ["a/b", "../etc/passwd", "a\\b", "a\x00b", "with space", "", "x" * 10_000]
)
def test_bad_queue_name_is_a_clear_error(db: Path, name: str) -> None:
    async def scenario() -> None:
        adapter = LocalAdapter(name or None, settings=LocalSettings(path=str(db)))
        adapter.source = name
        with pytest.raises(ConfigError, match=r"not a valid name|needs a source") as info:
            await adapter.open()
        assert len(str(info.value)) < 300, "the error repeats 10 kB of junk"

    run(scenario())


def test_non_sqlite_file_is_a_clear_error(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is a shopping list, not a database\n" * 100)
    with pytest.raises(ConfigError, match="not a SQLite database"):
        run(opened(db))
    assert db.read_bytes().startswith(b"this is a shopping list"), "the file was overwritten"


def test_database_of_another_program_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE invoices (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(ConfigError, match="another program"):
        run(opened(db))


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory no write reaches: chmod for users, ``chattr +i`` for root (who ignores modes)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(
            ["chattr", "+i", str(directory)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("running as root without chattr +i: cannot make a directory read-only")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)


def test_read_only_directory_is_a_clear_error(read_only_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot create .*writable location"):
        run(opened(read_only_dir / "stalk.db"))
    with pytest.raises(ConfigError, match="cannot create"):
        run(opened(read_only_dir / "deeper" / "stalk.db"))


def test_existing_file_in_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    run(_publish_and_close(directory / "stalk.db"))
    if os.geteuid() == 0:
        if (
            shutil.which("chattr") is None
            or subprocess.run(
                ["chattr", "+i", str(directory)], capture_output=True, check=False
            ).returncode
        ):
            pytest.skip("running as root without chattr +i")
    else:
        directory.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"cannot be written|writable"):
            run(opened(directory / "stalk.db"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=False)
        directory.chmod(0o755)


async def _publish_and_close(path: Path) -> None:
    adapter = await opened(path)
    await adapter.publish(b"x")
    await adapter.close()


def test_ack_and_get_messages_acks_fenced_then_leases_the_next_in_one_call(tmp_path: Path) -> None:
    async def scenario() -> None:
        adapter = LocalAdapter("q", settings=LocalSettings(path=str(tmp_path / "s.db")))
        await adapter.open()
        try:
            await adapter.publish_batch([b"m0", b"m1", b"m2"])
            first = await adapter.get_messages(2, 0)
            adapter.visibility_timeout_s = 0.0  # the next lease lapses at once: a stale token
            stale = await adapter.get_messages(1, 0)
            adapter.visibility_timeout_s = 30.0
            again = await adapter.get_messages(1, 0)  # the same row, leased anew
            assert again[0].id == stale[0].id and again[0].attempt == 2
            await adapter.publish_batch([b"m3", b"m4"])
            nxt = await adapter.ack_and_get_messages([*first, *stale], 10)
            assert [m.body for m in nxt] == [b"m3", b"m4"]  # ids in order; acked rows gone
            assert all(m.attempt == 1 for m in nxt)
            backlog = await adapter.backlog()
            assert backlog.in_flight == 3  # the stale ack was refused: m2 is still held
            assert await adapter.ack_and_get_messages([*again, *nxt], 10) == []
            assert (await adapter.backlog()).in_flight == 0
        finally:
            await adapter.close()

    asyncio.run(scenario())
