"""The local backend's SQLite file: creating it safely, opening it, and waiting out locks.

:class:`SQLiteFile` owns one connection and knows nothing of queues; :class:`LocalStore` in
:mod:`stalk.collectors.local.store` adds the queue operations. Everything runs on the adapter's
database thread.

Several processes may write the file: each change is one ``BEGIN IMMEDIATE`` transaction under
SQLite's write lock. ``database is locked`` never reaches a caller: SQLite's busy handler waits up
to ``lock_timeout_s``, and :meth:`SQLiteFile.retry` retries the busy cases it skips; past the
limit the caller gets :class:`~stalk.errors.BackendUnavailable` naming the file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stalk.backoff import Backoff
from stalk.collectors.local import sql as sql
from stalk.collectors.local.space import WAL_LIMIT_BYTES, disk_full_text
from stalk.errors import BackendError, BackendUnavailable, ConfigError

T = TypeVar("T")

#: SQLite primary result codes that mean "another connection holds the lock: wait and retry".
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
#: First pause before trying again at a lock the busy handler did not wait for; doubles from here.
_FIRST_LOCK_PAUSE_S = 0.001
#: Longest pause between two tries at a lock the busy handler did not wait for.
_MAX_LOCK_PAUSE_S = 0.05


class SQLiteFile:
    """One connection to a stalk file, in WAL mode, with the schema in place.

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
            self.retry(self._prepare)
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
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
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
            return ConfigError(
                f"{where} cannot be written ({exc}); check that the directory "
                "and the file are writable by this user"
            )
        if code == 13:  # SQLITE_FULL
            return BackendError(disk_full_text(self.path, exc))
        if code in _BUSY_CODES:
            return BackendUnavailable(
                f"{where} stayed locked by another process for "
                f"{self.lock_timeout_s:g}s; is a process stuck?"
            )
        return BackendUnavailable(f"{where}: {exc}")

    def retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, waiting out ``database is locked`` up to ``lock_timeout_s``.

        SQLite's busy handler covers most waits; a few busy cases skip it (WAL recovery by
        another process, a stale snapshot), so this loop retries those too. ``fn`` must be one
        whole transaction: a failed try left nothing behind.
        """
        deadline = time.monotonic() + self.lock_timeout_s
        pause = Backoff(_FIRST_LOCK_PAUSE_S, _MAX_LOCK_PAUSE_S)
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in _BUSY_CODES or time.monotonic() >= deadline:
                    raise self.translate(exc) from None
            time.sleep(pause.next())

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
            return self.retry(attempt) if retry else attempt()
        finally:
            if full:
                conn.execute("PRAGMA synchronous = NORMAL")

    def read(self, statement: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        """Run one read (its own snapshot; WAL readers never wait for writers)."""
        return self.retry(lambda: self.conn.execute(statement, params).fetchall())
