"""The handlers the chaos suite runs with ``python -m stalk run tests.chaos.handler:NAME``.

``handle`` records every call in a SQLite file of its own process (``$CHAOS_DIR/calls-PID.db``,
WAL, one commit per statement): a row when the call starts and its outcome before it returns, so
an ok is on disk before stalk acks it, and a call whose process was SIGKILLed shows as a row
without an outcome. ``synchronous=NORMAL`` keeps a commit through the death of the process (the
failure this suite inflicts); only a power loss could undo one.

Bodies are ``chaos <id> <kind> <filler>`` (:func:`body_of`): ``ok`` is acked, ``retry`` asks for
one delayed retry on its first delivery, ``poison`` kills the process (``os._exit(1)``) every time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from stalk import Message, Result, retry

KINDS = ("ok", "retry", "poison")
#: Schema of every calls file; ``outcome`` is NULL while the handler runs.
CALLS = (
    "CREATE TABLE IF NOT EXISTS calls (id INTEGER, attempt INTEGER, started REAL,"
    " finished REAL, outcome TEXT)"
)
ERRORS = "CREATE TABLE IF NOT EXISTS errors (id INTEGER, body BLOB, attributes TEXT)"


def body_of(number: int, kind: str) -> bytes:
    """Return the body of message ``number``: unique, self-describing, deterministic."""
    filler = (f"{number * 2654435761 % 2**32:08x}" * (1 + number % 7))[: 8 + number % 41]
    return f"chaos {number:07d} {kind} {filler}".encode()


def parse(body: bytes) -> tuple[int, str]:
    """Return (id, kind) of a body made by :func:`body_of`."""
    _, number, kind, _ = body.decode().split(" ", 3)
    return int(number), kind


class _Store:
    """One SQLite connection per process (reopened after a fork), shared by handler threads."""

    def __init__(self, prefix: str, schema: str) -> None:
        self.prefix, self.schema = prefix, schema
        self.lock = threading.Lock()
        self.pid = -1
        self.conn: sqlite3.Connection | None = None

    def db(self) -> sqlite3.Connection:
        if self.conn is None or self.pid != os.getpid():
            self.pid = os.getpid()
            path = Path(os.environ["CHAOS_DIR"]) / f"{self.prefix}-{self.pid}.db"
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(self.schema)
            self.conn = conn
        return self.conn

    def execute(self, sql: str, *args: object) -> int:
        with self.lock:
            cursor = self.db().execute(sql, args)
            return int(cursor.lastrowid or 0)


_calls = _Store("calls", CALLS)
_errors = _Store(os.environ.get("CHAOS_ERRORS_PREFIX", "errors"), ERRORS)
_SLEEP_S = float(os.environ.get("CHAOS_SLEEP_S", "0"))
_RETRY_DELAY_S = float(os.environ.get("CHAOS_RETRY_DELAY_S", "2"))


def handle(body: bytes, message: Message) -> Result | None:
    """Record the call; then ack, retry once with a delay, or die, as the body says."""
    number, kind = parse(body)
    row = _calls.execute(
        "INSERT INTO calls (id, attempt, started) VALUES (?, ?, ?)",
        number,
        message.attempt,
        time.time(),
    )
    if kind == "poison":
        os._exit(1)
    if _SLEEP_S:
        time.sleep(_SLEEP_S)
    outcome = "retry" if kind == "retry" and message.attempt == 1 else "ok"
    _calls.execute(
        "UPDATE calls SET finished = ?, outcome = ? WHERE rowid = ?", time.time(), outcome, row
    )
    if outcome == "retry":
        return retry("chaos: one delayed retry", delay=_RETRY_DELAY_S)
    return None


def collect(body: bytes, message: Message) -> None:
    """Record an error-topic copy: its body, byte for byte, and its attributes."""
    try:
        number = parse(body)[0]
    except (UnicodeDecodeError, ValueError):
        number = -1
    _errors.execute(
        "INSERT INTO errors (id, body, attributes) VALUES (?, ?, ?)",
        number,
        body,
        json.dumps(dict(message.attributes)),
    )
