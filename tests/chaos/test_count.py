"""The chaos suite's count can fail: a missing id, a changed body and a pill that went unrouted
or was delivered too often are each reported, from handler files written by hand."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.chaos.driver import Driver, Plan
from tests.chaos.handler import CALLS, ERRORS, body_of, parse


def _driver(tmp_path: Path) -> Driver:
    driver = Driver(Plan("local", messages=4, pills=1, max_retries=1), tmp_path, say=print)
    for number, kind in enumerate(["ok", "ok", "retry", "ok", "poison"]):
        driver.kinds[number] = kind
        driver.expected[number] = body_of(number, kind)
    return driver


def _calls(directory: Path, pid: int, rows: list[tuple[int, float, str | None]]) -> None:
    conn = sqlite3.connect(directory / f"calls-{pid}.db", isolation_level=None)
    conn.execute(CALLS)
    conn.executemany("INSERT INTO calls (id, attempt, started, outcome) VALUES (?, 1, ?, ?)", rows)
    conn.close()


def _errors(directory: Path, copies: list[tuple[int, bytes, dict[str, str]]]) -> None:
    conn = sqlite3.connect(directory / "errors-1.db", isolation_level=None)
    conn.execute(ERRORS)
    conn.executemany(
        "INSERT INTO errors VALUES (?, ?, ?)", [(n, b, json.dumps(a)) for n, b, a in copies]
    )
    conn.close()


def test_a_clean_run_counts_zero_lost_and_its_duplicates(tmp_path: Path) -> None:
    driver = _driver(tmp_path)
    calls = driver.calls_dir
    _calls(calls, 10, [(0, 1.0, "ok"), (1, 1.0, None), (2, 1.1, "retry"), (4, 1.2, None)])
    _calls(calls, 11, [(1, 4.5, "ok"), (2, 4.6, "ok"), (3, 4.7, "ok"), (0, 4.8, "ok")])
    _errors(calls, [(4, body_of(4, "poison"), {"stalk-reason": "poison"})])
    driver.kills.append((2.0, [10]))
    driver._count()
    report = driver.report
    assert report.lost == [] and report.ok, report.table()
    assert report.duplicated == 1  # id 0 twice
    assert report.pills_routed == 1 and report.pill_deliveries == 1
    assert report.longest_redelivery_s == 2.5  # id 1: killed at 2.0, handled again at 4.5


def test_a_missing_id_a_changed_body_and_a_misrouted_pill_fail_the_count(tmp_path: Path) -> None:
    driver = _driver(tmp_path)
    calls = driver.calls_dir
    _calls(calls, 10, [(0, 1.0, "ok"), (4, 1.0, None), (4, 2.0, None), (4, 3.0, None)])
    _errors(
        calls,
        [
            (2, body_of(2, "retry") + b"!", {"stalk-reason": "error"}),
            (4, body_of(4, "poison"), {"stalk-reason": "error"}),
        ],
    )
    driver._count()
    report = driver.report
    assert report.lost == [1, 2, 3], report.table()  # 2's copy is not byte-identical
    assert report.pills_routed == 0
    problems = "\n".join(report.problems)
    assert "lost 3" in problems and "pill 4" in problems and "delivered 3 times" in problems


def test_a_pill_routed_twice_counts_as_routed_and_duplicated(tmp_path: Path) -> None:
    """An error copy published again after a failed ack (at-least-once) is a duplicate, not a
    misroute; a second copy with another reason or another body still fails the count."""
    healthy_done = [(number, 1.0, "ok") for number in range(4)]
    pill = (4, body_of(4, "poison"), {"stalk-reason": "poison"})
    driver = _driver(tmp_path)
    _calls(driver.calls_dir, 10, healthy_done)
    _errors(driver.calls_dir, [pill, pill])
    driver._count()
    assert driver.report.pills_routed == 1 and driver.report.ok, driver.report.table()
    assert driver.report.duplicated == 1

    other = _driver(tmp_path / "other")
    _calls(other.calls_dir, 10, healthy_done)
    _errors(other.calls_dir, [pill, (4, body_of(4, "poison") + b"!", {"stalk-reason": "poison"})])
    other._count()
    assert other.report.pills_routed == 0
    assert any("pill 4" in problem for problem in other.report.problems)


def test_bodies_are_unique_and_parse_back() -> None:
    bodies = {body_of(n, "ok") for n in range(10_000)}
    assert len(bodies) == 10_000
    assert parse(body_of(1234, "poison")) == (1234, "poison")
