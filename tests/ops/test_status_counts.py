"""One vocabulary of counts (summary line, stop log, ``/status``), the backlog's age, and
``--processes`` reporting per-process and total concurrency that agree."""

from __future__ import annotations

import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.ops._proc import Stalk, http, local_send, wait_until

VOCABULARY = {"received", "attempts", "acked", "retried", "errors", "dropped", "released"}


def args(db: Path, *extra: str) -> tuple[str, ...]:
    return (
        "run", "workers.app:handler", "--backend", "local", "--source", "jobs",
        "--option", f"path={db}", "--http-port", "0", "--quiet", "--retry-interval", "0.01",
        *extra,
    )  # fmt: skip


def test_status_summary_and_stop_log_use_the_same_counts(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", '{"order": 1}', '{"order": 2, "flaky": true}', "not json")
    stalk = Stalk(*args(db))
    port = stalk.port()
    status = wait_until(
        lambda: (lambda s: s if s["messages"]["attempts"] >= 4 else None)(stalk.status(port)),
        "four attempts",
    )
    messages = status["messages"]
    assert set(messages) == VOCABULARY
    assert (messages["acked"], messages["retried"], messages["errors"]) == (2, 1, {"fatal": 1})
    # The backlog is read now and then, so an early reading may still count the two messages
    # handled since; wait for one taken after the drain.
    aged = wait_until(
        lambda: (
            lambda s: s if s["backlog_age_s"] is not None and s["backlog"]["ready"] == 0 else None
        )(stalk.status(port)),
        "a backlog reading, with its age, taken after the drain",
    )
    assert 0 <= aged["backlog_age_s"] < 60
    _code, body, _ = http(port, "/metrics")
    metrics = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.labels.get("reason") in (None, "fatal")
    }
    assert metrics["stalk_messages_acked_total"] == 2  # the same word, the same number
    assert metrics["stalk_messages_errored_total"] == 1
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert "2 acked, 1 retried, 1 to error topic jobs-errors (fatal: 1)" in stalk.stdout
    stop = [line for line in stalk.lines if "collector stopped" in line]
    assert "'acked': 2" in stop[0] and "'errors': {'fatal': 1}" in stop[0], stop


def test_processes_report_total_and_per_worker_concurrency(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk = Stalk(*args(db, "--processes", "2", "--concurrency", "3"))
    port = stalk.port()
    status = wait_until(
        lambda: (lambda s: s if s["healthy"] and s["concurrency"] == 6 else None)(
            stalk.status(port)
        ),
        "two workers of three slots",
    )
    assert [w["concurrency"] for w in status["workers"]] == [3, 3]
    assert set(status["messages"]) == VOCABULARY
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert "stalk: 0 received" in stalk.stdout  # --processes prints the summary too
