"""Holes of issue 14 driven through the real CLI (``python -m stalk``) on the local backend:
each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_cli_day_one import FAST, HANDLERS, peek_json, stalk


def test_an_async_handlers_own_cancelled_error_retries_then_reaches_the_error_topic(
    tmp_path: Path,
) -> None:
    """Hole 2: ``--until-empty`` ends (it used to hang with the message in flight) and the
    message is on the error topic after its retries, as any other exception would be."""
    db = tmp_path / "q.db"
    assert stalk("send", "--source", "q", "doomed", db=db).returncode == 0
    proc = stalk(
        "run", f"{HANDLERS}:cancels", "--source", "q", "--until-empty", "--max-retries", "2",
        "--allow-errors", *FAST, db=db,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (copy,) = peek_json(db, "q-errors")
    attributes = copy["attributes"]
    assert isinstance(attributes, dict)
    assert copy["body"] == "doomed"
    assert attributes["stalk-reason"] == "retries_exhausted"
    assert attributes["stalk-error-type"] == "CancelledError"
    assert attributes["stalk-attempts"] == "3"
    assert peek_json(db, "q") == []


def test_the_error_copy_hides_the_secrets_the_logs_hide(tmp_path: Path) -> None:
    """Hole 10: the log line said ``app:***@`` while ``stalk-error`` (and the traceback) kept
    the password verbatim on the error topic."""
    db = tmp_path / "q.db"
    secret_env = {"DB_PASSWORD": "s3cret-from-env"}
    assert stalk("send", "--source", "q", "x", db=db).returncode == 0
    proc = stalk(
        "run", f"{HANDLERS}:leaky", "--source", "q", "--until-empty", "--allow-errors", *FAST,
        db=db, env=secret_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pw-hunter2" not in proc.stderr and "app:***@" in proc.stderr
    (copy,) = peek_json(db, "q-errors")
    attributes = copy["attributes"]
    assert isinstance(attributes, dict)
    assert "postgres://app:***@db:5432/orders" in attributes["stalk-error"]
    assert "password=***" in attributes["stalk-error"]
    for name, value in attributes.items():
        assert "pw-hunter2" not in value and "s3cret-from-env" not in value, name
    assert "stalk-traceback" in attributes and "app:***@" in attributes["stalk-traceback"]
