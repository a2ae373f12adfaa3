"""The SQL of the local backend: one SQLite file in WAL mode, many queues, short transactions.

Everything here is synchronous and runs on the adapter's single database thread, which owns the
connection; :mod:`stalk.collectors.local` wraps it for asyncio. Every state change is one
``BEGIN IMMEDIATE`` transaction, so several processes may share the file: SQLite's write lock
serialises them, and a row leased by one cannot be leased by another until its lease expires.

A message row is leased by moving its ``visible_at`` to the end of the lease and bumping its
``lease_token``; the token is the fence: an ack, retry or extend from a worker whose lease lapsed
and was taken by another no longer matches, and changes nothing.

Durability: a publish is what a caller is told "success" for, so with ``full`` it commits with
``synchronous=FULL`` (fsync). Consumer-side changes (lease, ack, retry, error move) commit with
``NORMAL``: WAL frames carry cumulative checksums, so power loss can only cut a suffix of
transactions, and losing a suffix of those changes means a redelivery, never a lost message.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stalk.collectors.base import Backlog
from stalk.errors import BackendError, BackendUnavailable, ConfigError, QueueFull, QueueNotFound
from stalk.message import Failure, Message

T = TypeVar("T")

#: ``PRAGMA application_id`` of a stalk file ("STLK"): tells ours from someone else's database.
APPLICATION_ID = 0x53544C4B
#: ``PRAGMA user_version`` of the schema below; bump with a migration when it changes.
SCHEMA_VERSION = 1

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS stalk_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- the seqno; never reused, so fences hold
    queue       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    attributes  TEXT,                               -- JSON object, NULL when empty
    attempts    INTEGER NOT NULL DEFAULT 0,         -- leases taken (deliveries)
    enqueued_at REAL    NOT NULL,
    visible_at  REAL    NOT NULL,                   -- due time, or end of the current lease
    expires_at  REAL,                               -- message_ttl_s; NULL = never
    leased      INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0
)
""",
    """
CREATE INDEX IF NOT EXISTS stalk_messages_due ON stalk_messages (queue, visible_at)
""",
    """
CREATE TABLE IF NOT EXISTS stalk_queues (
    name   TEXT PRIMARY KEY,
    length INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID
""",
    """
CREATE TABLE IF NOT EXISTS stalk_subscriptions (
    topic      TEXT NOT NULL,
    queue      TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (topic, queue)
) WITHOUT ROWID
""",
    """
CREATE TRIGGER IF NOT EXISTS stalk_count_insert AFTER INSERT ON stalk_messages BEGIN
    INSERT INTO stalk_queues (name, length) VALUES (NEW.queue, 1)
    ON CONFLICT (name) DO UPDATE SET length = length + 1;
END
""",
    """
CREATE TRIGGER IF NOT EXISTS stalk_count_delete AFTER DELETE ON stalk_messages BEGIN
    UPDATE stalk_queues SET length = length - 1 WHERE name = OLD.queue;
END
""",
    """
CREATE TRIGGER IF NOT EXISTS stalk_count_move AFTER UPDATE OF queue ON stalk_messages
WHEN OLD.queue <> NEW.queue BEGIN
    UPDATE stalk_queues SET length = length - 1 WHERE name = OLD.queue;
    INSERT INTO stalk_queues (name, length) VALUES (NEW.queue, 1)
    ON CONFLICT (name) DO UPDATE SET length = length + 1;
END
""",
)

LEASE = """
UPDATE stalk_messages
SET visible_at = ?, attempts = attempts + 1, leased = 1, lease_token = lease_token + 1
WHERE id IN (SELECT id FROM stalk_messages WHERE queue = ? AND visible_at <= ?
             ORDER BY visible_at LIMIT ?)
RETURNING id, body, attributes, attempts, enqueued_at, expires_at, lease_token
"""
INSERT = """
INSERT INTO stalk_messages (queue, body, attributes, enqueued_at, visible_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?) RETURNING id
"""
DELETE = "DELETE FROM stalk_messages WHERE id = ? AND lease_token = ?"
REQUEUE = """
UPDATE stalk_messages SET visible_at = ?, leased = 0, lease_token = lease_token + 1,
    attempts = attempts - ?, attributes = ?
WHERE id = ? AND lease_token = ?
"""
EXTEND = "UPDATE stalk_messages SET visible_at = ? WHERE id = ? AND lease_token = ? AND leased = 1"
MOVE = """
UPDATE stalk_messages SET queue = ?, attributes = ?, attempts = 0, enqueued_at = ?,
    visible_at = ?, expires_at = NULL, leased = 0, lease_token = lease_token + 1
WHERE id = ? AND lease_token = ?
"""
COUNTS = """
SELECT COALESCE(SUM(visible_at <= :now), 0),
       COALESCE(SUM(visible_at > :now AND leased = 0), 0),
       COALESCE(SUM(visible_at > :now AND leased = 1), 0),
       MIN(CASE WHEN visible_at <= :now THEN enqueued_at END)
FROM stalk_messages WHERE queue = :queue
"""

#: SQLite primary result codes that mean "another connection holds the lock: wait and retry".
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED


def encode_attributes(attributes: Mapping[str, str] | None) -> str | None:
    """Return attributes as JSON text, or ``None`` for none (most messages: no JSON work)."""
    return json.dumps(dict(attributes), separators=(",", ":")) if attributes else None


class LocalStore:
    """One connection to a stalk file; every method is one transaction (or one read).

    Args:
        path: the database file; its directory is created 0700 and the file 0600 when missing.
        full_sync: publish with ``synchronous=FULL`` (survives power loss) rather than NORMAL.
        lock_timeout_s: how long to wait for another process's write lock before giving up.
    """

    def __init__(self, path: Path, *, full_sync: bool, lock_timeout_s: float) -> None:
        self.path = path
        self.full_sync = full_sync
        self.lock_timeout_s = lock_timeout_s
        self.conn = self._connect()

    # ------------------------------------------------------------------ opening
    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
                path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        except OSError as exc:
            raise ConfigError(
                f"local backend cannot create {path} ({exc.strerror}); choose a writable "
                "location with --option path=... or STALK_LOCAL_PATH"
            ) from None
        if path.is_dir():
            raise ConfigError(f"local backend path {path} is a directory; name a file in it")
        conn = sqlite3.connect(path, isolation_level=None, timeout=self.lock_timeout_s)
        try:
            self._retry(lambda: self._prepare(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._init_schema(conn)
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id == APPLICATION_ID:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} was written by a newer stalk (schema {version}); upgrade stalk"
                )
            return
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != 0 or tables:
            raise ConfigError(
                f"{self.path} is a SQLite database of another program, not a stalk file; "
                "choose another --option path=..."
            )
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (the last one out checkpoints and removes the WAL)."""
        self.conn.close()

    # ------------------------------------------------------------------ plumbing
    def translate(self, exc: sqlite3.Error) -> Exception:
        """Turn a sqlite3 error into one of stalk's, naming the file and what to do."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        where = f"local backend file {self.path}"
        if code == 26:  # SQLITE_NOTADB
            return ConfigError(f"{where} is not a SQLite database; point --option path= elsewhere")
        if code == 11:  # SQLITE_CORRUPT
            return BackendError(f"{where} is damaged ({exc}); move it aside or restore a backup")
        if code in (3, 8, 14):  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN
            return ConfigError(f"{where} cannot be written ({exc}); check the directory and "
                               "file are writable by this user")
        if code == 13:  # SQLITE_FULL
            return BackendError(f"{where}: disk full ({exc})")
        if code in _BUSY_CODES:
            return BackendUnavailable(f"{where} stayed locked by another process for "
                                      f"{self.lock_timeout_s:.0f}s; is a process stuck?")
        return BackendUnavailable(f"{where}: {exc}")

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, waiting out ``database is locked`` up to ``lock_timeout_s``.

        SQLite's own busy handler covers most waits; a few busy cases skip it (WAL recovery by
        another process, a stale snapshot), so this loop retries those too.
        """
        deadline = time.monotonic() + self.lock_timeout_s
        pause = 0.001
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in _BUSY_CODES or time.monotonic() >= deadline:
                    raise self.translate(exc) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked.

        ``fn`` must have no effect outside the database: on a lock it runs again from scratch.
        """
        conn = self.conn
        full = durable and self.full_sync

        def attempt() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        if full:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            return self._retry(attempt)
        finally:
            if full:
                conn.execute("PRAGMA synchronous = NORMAL")

    # ------------------------------------------------------------------ consuming
    def lease(
        self, queue: str, limit: int, lease_s: float, error_queue: str
    ) -> list[Message]:
        """Lease up to ``limit`` due messages; route expired ones to ``error_queue`` instead."""

        def run(conn: sqlite3.Connection) -> list[Message]:
            now = time.time()
            rows = conn.execute(LEASE, (now + lease_s, queue, now, limit)).fetchall()
            out: list[Message] = []
            for id_, body, attrs, attempts, enqueued_at, expires_at, token in rows:
                message = Message(str(id_), body, json.loads(attrs) if attrs else {},
                                  attempts, enqueued_at, queue, token)
                if expires_at is not None and expires_at <= now:
                    failure = Failure.build(message, "expired", "message_ttl_s elapsed before "
                                            "it was delivered")
                    self._move(conn, message, error_queue, failure, now)
                else:
                    out.append(message)
            out.sort(key=lambda m: int(m.id))
            return out

        return self.write(run)

    def ack(self, messages: Sequence[Message]) -> int:
        """Delete the messages still leased by these deliveries; return how many were."""
        params = [(int(m.id), m.receipt) for m in messages]
        return self.write(lambda conn: conn.executemany(DELETE, params).rowcount)

    def requeue(self, message: Message, delay_s: float, counted: bool) -> bool:
        """Make a leased message due in ``delay_s``; uncount the delivery if not ``counted``."""
        params = (time.time() + delay_s, 0 if counted else 1,
                  encode_attributes(message.attributes), int(message.id), message.receipt)
        return self.write(lambda conn: conn.execute(REQUEUE, params).rowcount) > 0

    def extend(self, message: Message, seconds: float) -> bool:
        """Push the lease of ``message`` to ``seconds`` from now, if it still holds it."""
        params = (time.time() + seconds, int(message.id), message.receipt)
        return self.write(lambda conn: conn.execute(EXTEND, params).rowcount) > 0

    def to_error(self, message: Message, error_queue: str, failure: Failure) -> bool:
        """Move the leased row to ``error_queue`` (one transaction); copy it if the lease was lost.

        Returns True when the row moved, so the engine's following ack has nothing to delete.
        """
        return self.write(lambda conn: self._move(conn, message, error_queue, failure, time.time()))

    @staticmethod
    def _move(conn: sqlite3.Connection, message: Message, error_queue: str, failure: Failure,
              now: float) -> bool:
        attrs = encode_attributes({**message.attributes, **failure.to_attributes()})
        moved = conn.execute(MOVE, (error_queue, attrs, now, now, int(message.id),
                                    message.receipt)).rowcount > 0
        if not moved:
            conn.execute(INSERT, (error_queue, message.body, attrs, now, now, None)).fetchall()
        return moved

    # ------------------------------------------------------------------ producing
    def insert(
        self,
        queues: Sequence[str] | str,
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None,
        delay_s: float,
        ttl_s: float | None,
        max_length: int | None,
    ) -> list[str]:
        """Insert each body into each of ``queues`` in one durable transaction.

        ``queues`` is one queue, or a topic's subscriptions (each gets its own copy). Returns the
        ids of the copies in the first queue.

        Raises:
            QueueFull: a queue would pass ``max_length``; nothing was inserted.
        """
        names = [queues] if isinstance(queues, str) else list(queues)
        attrs = encode_attributes(attributes)

        def run(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            if max_length is not None:
                for name in names:
                    row = conn.execute("SELECT length FROM stalk_queues WHERE name = ?",
                                       (name,)).fetchone()
                    if (row[0] if row else 0) + len(bodies) > max_length:
                        raise QueueFull(f"queue {name!r} holds {row[0] if row else 0} messages; "
                                        f"max_queue_length is {max_length}")
            expires = now + ttl_s if ttl_s is not None else None
            ids: list[str] = []
            for i, name in enumerate(names):
                for body in bodies:
                    row = conn.execute(INSERT, (name, body, attrs, now, now + delay_s,
                                                expires)).fetchone()
                    if i == 0:
                        ids.append(str(row[0]))
            return ids

        return self.write(run, durable=True)

    # ------------------------------------------------------------------ topics and counts
    def subscribe(self, topic: str, queue: str) -> None:
        """Make ``queue`` receive a copy of every later publish to ``topic``. Idempotent."""
        self.write(lambda conn: conn.execute(
            "INSERT OR IGNORE INTO stalk_subscriptions VALUES (?, ?, ?)",
            (topic, queue, time.time())), durable=True)

    def unsubscribe(self, topic: str, queue: str) -> None:
        """Stop copying ``topic`` into ``queue``; what it holds stays. Idempotent."""
        self.write(lambda conn: conn.execute(
            "DELETE FROM stalk_subscriptions WHERE topic = ? AND queue = ?", (topic, queue)),
            durable=True)

    def subscriptions(self, topic: str) -> list[str]:
        """Return the queues subscribed to ``topic``, oldest first."""
        return [r[0] for r in self._read(
            "SELECT queue FROM stalk_subscriptions WHERE topic = ? ORDER BY created_at, queue",
            (topic,))]

    def subscribed_queues(self, topic: str) -> list[str]:
        """Return the subscriptions of ``topic``, or raise when there are none (nowhere to go)."""
        queues = self.subscriptions(topic)
        if not queues:
            raise QueueNotFound(
                f"topic {topic!r} has no subscriptions, so a publish would go nowhere; start a "
                f"consumer with --option topic={topic} --source SUBSCRIPTION first"
            )
        return queues

    def backlog(self, queue: str, error_queue: str | None) -> Backlog:
        """Count ready, delayed and leased messages of ``queue`` and the depth of its errors."""
        now = time.time()
        rows = self._read(COUNTS, {"now": now, "queue": queue})
        ready, delayed, in_flight, oldest = rows[0]
        errors = self.length(error_queue) if error_queue else None
        return Backlog(ready, delayed, in_flight, errors,
                       max(0.0, now - oldest) if oldest is not None else None)

    def length(self, queue: str) -> int:
        """Return how many messages ``queue`` holds in all states (kept by triggers: O(1))."""
        rows = self._read("SELECT length FROM stalk_queues WHERE name = ?", (queue,))
        return int(rows[0][0]) if rows else 0

    def _read(self, sql: str, params: Sequence[object] | Mapping[str, object]) -> list[Any]:
        """Run one read (its own snapshot; never blocked by writers in WAL mode)."""
        return self._retry(lambda: self.conn.execute(sql, params).fetchall())
