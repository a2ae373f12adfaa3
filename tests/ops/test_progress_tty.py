"""The progress line in a real terminal (a pseudo-terminal whose foreground is ``stalk run``):
it is there after the log lines, with the backlog left and a bar under ``--until-empty``."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

from tests.ops._proc import ROOT, local_send

CLEAR = "\r\x1b[K"


def run_in_terminal(args: list[str], env: dict[str, str], limit_s: float = 60.0) -> str:
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, it is the foreground group
        os.chdir(ROOT)
        os.execvpe(sys.executable, [sys.executable, "-m", "stalk", *args], env)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child exited and closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_line_survives_log_lines_and_shows_a_bar(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", *[f"m{i}" for i in range(40)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STALK_")}
    env.update({"PYTHONPATH": str(ROOT), "STALK_LOCAL_PATH": str(db), "COLUMNS": "200"})
    out = run_in_terminal(
        ["run", "tests.unit.cli_handlers:chatty", "--source", "jobs", "--until-empty"], env
    )
    assert "40 received" in out, out
    logged = [i for i in range(40) if f"handling m{i}" in out]
    assert len(logged) == 40
    # after most log lines the progress line is drawn again before anything else is written
    pieces = out.split("handling m")[1:]
    redrawn = [p for p in pieces if "done" in p.split("\n", 1)[-1].split("handling", 1)[0]]
    assert len(redrawn) >= 30, out[-2000:]
    assert "] " in out and "left" in out and "/s" in out  # the bar, the backlog, the rate
