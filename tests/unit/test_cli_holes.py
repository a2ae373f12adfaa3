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
