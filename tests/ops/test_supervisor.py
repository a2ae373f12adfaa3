"""``--processes``: supervised worker processes, restarts, recycling, signal forwarding."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.ops._proc import Stalk, http, local_send, local_stats, wait_until


def args(db: Path, handler: str, *extra: str) -> tuple[str, ...]:
    return (
        "run", f"tests.ops.handlers:{handler}", "--backend", "local", "--source", "jobs",
        "--option", f"path={db}", "--http-port", "0", "--quiet", *extra,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_crashed_worker_is_restarted_and_work_finishes(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", *[f"m{i}" for i in range(10)])
    stalk = Stalk(
        *args(db, "crash_once", "--processes", "2", "--visibility-timeout", "2"),
        env={"STALK_TEST_MARKER": str(tmp_path / "crashed")},
    )
    port = stalk.port()
    stalk.wait_line(r"worker \d exited with code 17; restarting in 1\.0s", "the crash logged")
    status = wait_until(
        lambda: (lambda s: s if s["counts"]["handled"] >= 10 and s["healthy"] else None)(
            stalk.status(port)
        ),
        "all messages handled by the restarted workers",
    )
    assert sum(w["restarts"] for w in status["workers"]) == 1
    assert [w["last_exit"] for w in status["workers"] if w["restarts"]] == [17]
    assert http(port, "/healthz")[0] == 200
    pids = [w["pid"] for w in status["workers"]]
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert not any(alive(pid) for pid in pids)
    assert local_stats(db, "jobs")["ready"] == 0


def test_max_messages_per_child_recycles_without_losing_counts(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", *[f"m{i}" for i in range(12)])
    stalk = Stalk(
        *args(db, "slow", "--max-messages-per-child", "4"), env={"STALK_TEST_SLEEP_S": "0.05"}
    )
    port = stalk.port()
    status = wait_until(
        lambda: (lambda s: s if s["counts"]["acked"] >= 12 else None)(stalk.status(port)),
        "12 acked across recycled workers",
    )
    assert status["processes"] == 1
    assert status["workers"][0]["recycles"] >= 2
    assert status["counts"]["acked"] == 12  # the exited workers' final counts are kept
    _code, body, _ = http(port, "/metrics")
    samples = {
        s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }
    assert samples["stalk_messages_acked_total"] == 12
    assert samples["stalk_worker_recycles_total"] >= 2
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr


def test_max_memory_per_child_recycles(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "a")
    stalk = Stalk(*args(db, "quick", "--max-memory-per-child", "1M"))
    stalk.wait_line(r"worker recycling: resident memory \d+ MiB over 1 MiB", "a memory recycle")
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr


def test_ttin_adds_a_worker_usr1_sleeps_them_all(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk = Stalk(*args(db, "quick", "--processes", "2"))
    port = stalk.port()
    wait_until(lambda: stalk.status(port)["healthy"], "two healthy workers")
    stalk.signal(signal.SIGTTIN)
    status = wait_until(
        lambda: (lambda s: s if s["healthy"] and len(s["workers"]) == 3 else None)(
            stalk.status(port)
        ),
        "a third worker",
    )
    assert status["processes"] == 3
    stalk.signal(signal.SIGUSR1)
    wait_until(lambda: stalk.status(port)["state"] == "asleep", "every worker asleep")
    code, _body, _ = http(port, "/wake", "POST")
    assert code == 200
    wait_until(lambda: stalk.status(port)["state"] == "awake", "every worker awake")
    code, _body, _ = http(port, "/scale?concurrency=3", "POST")
    assert code == 200
    wait_until(lambda: stalk.status(port)["concurrency"] == 9, "3 slots in each of 3 workers")
    stalk.signal(signal.SIGTTOU)
    wait_until(lambda: len(stalk.status(port)["workers"]) == 2, "back to two workers")
    stalk.signal(signal.SIGTERM)
    assert stalk.wait() == 0, stalk.stderr
    assert stalk.stderr.count("collector stopped") == 3  # one retired by TTOU, two at the end


def test_usage_error_in_workers_is_not_restarted(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk = Stalk(*args(db, "no_such_handler", "--processes", "2"))
    assert stalk.wait() == 2, stalk.stderr
    assert "usage error" in stalk.stderr


def test_until_empty_workers_finish_and_the_supervisor_exits_zero(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", *[f"m{i}" for i in range(6)])
    stalk = Stalk(*args(db, "quick", "--processes", "2", "--until-empty"))
    assert stalk.wait() == 0, stalk.stderr
    assert local_stats(db, "jobs")["ready"] == 0
    assert stalk.stderr.count("finished") == 2
    assert "stalk.collector/w0" in stalk.stderr and "stalk.collector/w1" in stalk.stderr
    assert "supervisor done: {'received': 6, 'attempts': 6, 'acked': 6" in stalk.stderr
