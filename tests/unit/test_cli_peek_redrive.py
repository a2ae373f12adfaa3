"""``stalk peek`` and ``stalk redrive --dry-run --reason`` on the local backend, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_cli import assert_one_line_error
from tests.unit.test_cli_day_one import FAST, HANDLERS, peek_json, stalk


def _errors(db: Path, *bodies: str) -> None:
    assert stalk("send", "--source", "q", *bodies, db=db).returncode == 0
    ran = stalk("run", f"{HANDLERS}:refuse", "--source", "q", "--until-empty", "--allow-errors",
                *FAST, db=db)  # fmt: skip
    assert ran.returncode == 0, ran.stderr


def test_peek_shows_bodies_and_attributes_and_consumes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    _errors(db, "first", "second")
    text = stalk("peek", "--source", "q-errors", db=db)
    assert text.returncode == 0, text.stderr
    assert "body: first" in text.stdout and "stalk-reason: fatal" in text.stdout
    assert "stalk-error-type: Fatal" in text.stdout and "none consumed" in text.stdout
    again = peek_json(db, "q-errors")
    assert [m["body"] for m in again] == ["first", "second"]
    assert {m["attempt"] for m in again} == {1}  # peeking twice changed no attempt
    stats = json.loads(stalk("stats", "--source", "q-errors", "--json", db=db).stdout)
    assert stats["ready"] == 2


def test_peek_escapes_binary_and_truncates(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", "x" * 500, "ctl\x1b[2Jend", db=db)
    out = stalk("peek", "--source", "q", "--max-body", "20", db=db).stdout
    assert "x" * 20 + " ... (500 bytes)" in out
    assert "\\x1b[2J" in out and "\x1b" not in out  # no terminal escape reaches the screen


def test_peek_on_an_unreachable_nsqd_is_one_line() -> None:
    """nsq can peek (tests/backends/test_nsq.py); without an nsqd it says where it looked."""
    proc = stalk("peek", "--backend", "nsq", "--source", "t", "--option", "nsqd=127.0.0.1:1")
    assert_one_line_error(proc, 1, "cannot reach nsqd", "127.0.0.1:1")


def test_redrive_dry_run_moves_nothing_and_reason_filters(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    _errors(db, "a", "b")
    dry = stalk("redrive", "--from", "q-errors", "--to", "q", "--dry-run", db=db)
    assert dry.returncode == 0, dry.stderr
    assert "would move 2 message(s)" in dry.stdout and dry.stdout.count("fatal") == 2
    assert len(peek_json(db, "q-errors")) == 2
    none = stalk("redrive", "--from", "q-errors", "--to", "q", "--reason", "poison", db=db)
    assert "moved 0 message(s) with reason poison" in none.stdout
    assert len(peek_json(db, "q-errors")) == 2
    one = stalk("redrive", "--from", "q-errors", "--to", "q", "--reason", "fatal", "--limit", "1",
                db=db)  # fmt: skip
    assert "moved 1 message(s) with reason fatal" in one.stdout
    assert len(peek_json(db, "q-errors")) == 1 and len(peek_json(db, "q")) == 1
