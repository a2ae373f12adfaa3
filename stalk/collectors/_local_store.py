"""The local backend's file: one SQLite database in WAL mode, many queues, short transactions.

Everything here is synchronous and runs on the adapter's database thread, which owns the
connection (:mod:`stalk.collectors.local` is the asyncio face). Every state change is a single
write transaction, so several processes may share the file: SQLite's write lock serialises them,
and a row leased by one cannot be leased by another until its lease ends. The statements and the
fencing rule are in :mod:`stalk.collectors._local_sql`.

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

from stalk.collectors import _local_sql as sql
from stalk.collectors.base import Backlog
from stalk.errors import BackendError, BackendUnavailable, ConfigError, QueueFull
from stalk.message import Failure, Message

T = TypeVar("T")

#: SQLite primary result codes that mean "another connection holds the lock: wait and retry".
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
#: Longest pause between two tries at a lock the busy handler did not wait for.
_MAX_LOCK_PAUSE_S = 0.05


def encode_attributes(attributes: Mapping[str, str] | None) -> str | None:
    """Return attributes as JSON text, or ``None`` for none (most messages: no JSON work)."""
    return json.dumps(dict(attributes), separators=(",", ":")) if attributes else None


class LocalStore:
    """One connection to a stalk file; each method is one transaction (or one read).

    Args:
        path: the database file; its directory is created 0700 and the file 0600 when missing.
        full_sync: publish with ``synchronous=FULL`` (survives power loss) rather than NORMAL.
        lock_timeout_s: how long to wait for another process's write lock before giving up.

    Raises:
        ConfigError: the path cannot be created or written, or is not a stalk file.
    """

    def __init__(self, path: Path, *, full_sync: bool, lock_timeout_s: float) -> None:
        self.path = path
        self.full_sync = full_sync
        self.lock_timeout_s = lock_timeout_s
        self._create_file()
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=lock_timeout_s)
        try:
            self._retry(self._prepare)
        except BaseException:
            self.conn.close()
            raise

    def _create_file(self) -> None:
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

    def _prepare(self) -> None:
        conn = self.conn
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        self.write(self._init_schema, retry=False)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id == sql.APPLICATION_ID:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > sql.SCHEMA_VERSION:
                raise ConfigError(f"{self.path} was written by a newer stalk (schema {version})")
            return
        if app_id != 0 or conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise ConfigError(
                f"{self.path} is a SQLite database of another program, not a stalk file; "
                "choose another --option path=..."
            )
        for statement in sql.SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {sql.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")

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
            return ConfigError(f"{where} cannot be written ({exc}); check that the directory "
                               "and the file are writable by this user")
        if code == 13:  # SQLITE_FULL
            return BackendError(f"{where}: disk full ({exc})")
        if code in _BUSY_CODES:
            return BackendUnavailable(f"{where} stayed locked by another process for "
                                      f"{self.lock_timeout_s:g}s; is a process stuck?")
        return BackendUnavailable(f"{where}: {exc}")

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, waiting out ``database is locked`` up to ``lock_timeout_s``.

        SQLite's busy handler covers most waits; a few busy cases skip it (WAL recovery by
        another process, a stale snapshot), so this loop retries those too. ``fn`` must be one
        whole transaction: a failed try left nothing behind.
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
            pause = min(pause * 2, _MAX_LOCK_PAUSE_S)

    def write(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False, retry: bool = True
    ) -> T:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked.

        ``durable`` commits with fsync when the store is ``full_sync``.
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
            return self._retry(attempt) if retry else attempt()
        finally:
            if full:
                conn.execute("PRAGMA synchronous = NORMAL")

    def _read(self, statement: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        """Run one read (its own snapshot; WAL readers never wait for writers)."""
        return self._retry(lambda: self.conn.execute(statement, params).fetchall())

    # ------------------------------------------------------------------ consuming
    def lease(self, queue: str, limit: int, lease_s: float, error_queue: str) -> list[Message]:
        """Lease up to ``limit`` due messages; move expired ones to ``error_queue`` instead.

        The lease is one ``UPDATE … RETURNING`` statement, so one implicit transaction.
        """
        now = time.time()
        rows = self._read(sql.LEASE, (now + lease_s, queue, now, limit))
        out: list[Message] = []
        expired: list[Message] = []
        for id_, body, attrs, attempts, enqueued_at, expires_at, token in rows:
            message = Message(str(id_), body, json.loads(attrs) if attrs else {},
                              attempts, enqueued_at, queue, token)
            if expires_at is not None and expires_at <= now:
                expired.append(message)
            else:
                out.append(message)
        if expired:
            self.write(lambda conn: [self._move(conn, m, error_queue, Failure.build(
                m, "expired", "message_ttl_s elapsed before it was handled"), now)
                for m in expired])
        out.sort(key=lambda m: int(m.id))
        return out

    def ack(self, messages: Sequence[Message]) -> int:
        """Delete the rows these deliveries still hold; return how many were deleted."""
        by_queue: dict[str, list[tuple[int, Any]]] = {}
        for m in messages:
            by_queue.setdefault(m.source, []).append((int(m.id), m.receipt))

        def run(conn: sqlite3.Connection) -> int:
            total = 0
            for queue, params in by_queue.items():
                deleted = conn.executemany(sql.DELETE, params).rowcount
                conn.execute(sql.COUNT, (queue, -deleted))
                total += deleted
            return total

        return self.write(run)

    def requeue(self, message: Message, delay_s: float, counted: bool) -> bool:
        """Make a leased message due in ``delay_s``; uncount the delivery if not ``counted``."""
        params = (time.time() + delay_s, 0 if counted else 1,
                  encode_attributes(message.attributes), int(message.id), message.receipt)
        return self.write(lambda conn: conn.execute(sql.REQUEUE, params).rowcount) > 0

    def extend(self, message: Message, seconds: float) -> bool:
        """Push the lease of ``message`` to ``seconds`` from now, if it still holds it."""
        params = (time.time() + seconds, int(message.id), message.receipt)
        return self.write(lambda conn: conn.execute(sql.EXTEND, params).rowcount) > 0

    def to_error(self, message: Message, error_queue: str, failure: Failure) -> bool:
        """Move the leased row to ``error_queue``; copy it there if the lease was lost.

        Returns True when the row itself moved (the engine's following ack has nothing to do).
        """
        return self.write(lambda conn: self._move(conn, message, error_queue, failure,
                                                  time.time()))

    @staticmethod
    def _move(conn: sqlite3.Connection, message: Message, error_queue: str, failure: Failure,
              now: float) -> bool:
        attrs = encode_attributes({**message.attributes, **failure.to_attributes()})
        moved = conn.execute(sql.MOVE, (error_queue, attrs, now, now, int(message.id),
                                        message.receipt)).rowcount > 0
        if moved:
            conn.execute(sql.COUNT, (message.source, -1))
        else:
            conn.execute(sql.INSERT, (error_queue, message.body, attrs, now, now, None)).fetchall()
        conn.execute(sql.COUNT, (error_queue, 1))
        return moved

    # ------------------------------------------------------------------ producing
    def insert(
        self,
        queues: Sequence[str],
        bodies: Sequence[bytes],
        attributes: Mapping[str, str] | None,
        delay_s: float,
        ttl_s: float | None,
        max_length: int | None,
    ) -> list[str]:
        """Insert every body into every queue (a topic's subscriptions) in one durable commit.

        Returns the ids of the copies in the first queue.

        Raises:
            QueueFull: a queue would pass ``max_length``; nothing was inserted.
        """
        attrs = encode_attributes(attributes)

        def run(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            expires = now + ttl_s if ttl_s is not None else None
            ids: list[str] = []
            for name in queues:
                if max_length is not None:
                    row = conn.execute(sql.LENGTH, (name,)).fetchone()
                    held = row[0] if row else 0
                    if held + len(bodies) > max_length:
                        raise QueueFull(f"queue {name!r} holds {held} messages and "
                                        f"max_queue_length is {max_length}; nothing was published")
                for body in bodies:
                    row = conn.execute(sql.INSERT, (name, body, attrs, now, now + delay_s,
                                                    expires)).fetchone()
                    if name == queues[0]:
                        ids.append(str(row[0]))
                conn.execute(sql.COUNT, (name, len(bodies)))
            return ids

        return self.write(run, durable=True)

    # ------------------------------------------------------------------ topics and counts
    def subscribe(self, topic: str, queue: str) -> None:
        """Make ``queue`` receive a copy of every later publish to ``topic``. Idempotent."""
        self.write(lambda c: c.execute(sql.SUBSCRIBE, (topic, queue, time.time())), durable=True)

    def unsubscribe(self, topic: str, queue: str) -> None:
        """Stop copying ``topic`` into ``queue``; what the queue holds stays. Idempotent."""
        self.write(lambda c: c.execute(sql.UNSUBSCRIBE, (topic, queue)), durable=True)

    def subscriptions(self, topic: str) -> list[str]:
        """Return the queues subscribed to ``topic``, oldest first."""
        return [row[0] for row in self._read(sql.SUBSCRIPTIONS, (topic,))]

    def backlog(self, queue: str, error_queue: str | None) -> Backlog:
        """Count ready, delayed and leased messages of ``queue`` and the depth of its errors."""
        now = time.time()
        ready, delayed, in_flight, oldest = self._read(sql.BACKLOG, {"now": now, "queue": queue})[0]
        errors = self.length(error_queue) if error_queue else None
        age = max(0.0, now - oldest) if oldest is not None else None
        return Backlog(ready, delayed, in_flight, errors, age)

    def length(self, queue: str) -> int:
        """Return how many messages ``queue`` holds in every state (a counter: O(1))."""
        rows = self._read(sql.LENGTH, (queue,))
        return int(rows[0][0]) if rows else 0
