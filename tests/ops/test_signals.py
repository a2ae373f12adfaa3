"""Signals on a real ``python -m stalk run`` process over the local file backend."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.ops._proc import Stalk, http, local_send, local_stats, wait_until

RUN = ("run", "--backend", "local", "--source", "jobs", "--http-port", "0", "--quiet")


def run_args(db: Path, handler: str, *extra: str) -> tuple[str, ...]:
    return (*RUN[:1], f"tests.ops.handlers:{handler}", *RUN[1:], "--option", f"path={db}", *extra)


def test_sigterm_drains_in_flight_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", *[f"m{i}" for i in range(20)])
    stalk = Stalk(*run_args(db, "slow", "--concurrency", "2"), env={"STALK_TEST_SLEEP_S": "0.3"})
    port = stalk.port()
    wait_until(lambda: stalk.status(port)["counts"]["handled"] >= 2, "two handled messages")
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert "SIGTERM: draining" in stalk.stderr
    left = local_stats(db, "jobs")
    handled = int(stalk.stdout.split(" handled")[0].rsplit(" ", 1)[-1])
    assert left["in_flight"] == 0
    assert handled + left["ready"] == 20  # every message either acked or back on the queue


def test_second_sigterm_stops_at_once_and_releases(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "long")
    stalk = Stalk(*run_args(db, "slow"), env={"STALK_TEST_SLEEP_S": "600"})
    port = stalk.port()
    wait_until(lambda: stalk.status(port)["in_flight"] == 1, "the message in flight")
    stalk.signal(signal.SIGTERM)
    stalk.wait_line("draining")
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert "second SIGTERM" in stalk.stderr
    left = local_stats(db, "jobs")
    assert (left["ready"], left["in_flight"]) == (1, 0)


def test_ttin_ttou_scale_and_usr1_usr2_sleep_wake(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "warm-up")
    stalk = Stalk(*run_args(db, "quick", "--concurrency", "2"))
    port = stalk.port()
    wait_until(lambda: stalk.status(port)["state"] == "awake", "awake")
    for wanted in (3, 4):  # one at a time: the kernel merges a signal sent twice while pending
        stalk.signal(signal.SIGTTIN)
        wait_until(lambda w=wanted: stalk.status(port)["concurrency"] == w, f"concurrency {wanted}")
    stalk.signal(signal.SIGTTOU)
    wait_until(lambda: stalk.status(port)["concurrency"] == 3, "concurrency 3 after TTOU")
    stalk.signal(signal.SIGUSR1)
    wait_until(lambda: stalk.status(port)["state"] == "asleep", "asleep after USR1")
    local_send(db, "jobs", "while-asleep")
    assert stalk.status(port)["counts"]["received"] == 1
    stalk.signal(signal.SIGUSR2)
    wait_until(lambda: stalk.status(port)["counts"]["handled"] == 2, "handled after USR2")
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr


def test_port_conflict_is_reported_and_consuming_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "a", "b", "c")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        args = [a if a != "0" else str(busy) for a in run_args(db, "quick", "--until-empty")]
        stalk = Stalk(*args)
        assert stalk.wait() == 0, stalk.stderr
    conflict = [line for line in stalk.lines if "cannot listen on" in line]
    assert len(conflict) == 1, stalk.stderr
    assert f"127.0.0.1:{busy}" in conflict[0]
    assert "3 handled" in stalk.stdout


def test_healthz_turns_503_while_draining(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "long")
    stalk = Stalk(*run_args(db, "slow", "--shutdown-grace", "30"), env={"STALK_TEST_SLEEP_S": "3"})
    port = stalk.port()
    assert http(port, "/healthz")[0] == 200
    wait_until(lambda: stalk.status(port)["in_flight"] == 1, "the message in flight")
    stalk.signal(signal.SIGTERM)
    _code, body, _ = wait_until(
        lambda: (lambda r: r if r[0] == 503 else None)(http(port, "/healthz")), "503 on /healthz"
    )
    assert body.decode().strip() == "draining"
    assert stalk.wait() == 0, stalk.stderr
