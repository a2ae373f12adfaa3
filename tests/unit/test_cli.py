"""CLI errors: one line, the right exit code, no traceback; run through a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def stalk(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
        input=stdin,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stalk:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_unknown_backend_exits_2() -> None:
    proc = stalk("run", "workers.app:handler", "--backend", "kafkaa", "--source", "q")
    assert_one_line_error(proc, 2, "unknown backend 'kafkaa'", "memory")


def test_cli_bad_handler_path_exits_2() -> None:
    proc = stalk("run", "workers.nope:handler", "--backend", "memory", "--source", "q")
    assert_one_line_error(proc, 2, "cannot import module 'workers.nope'")
    proc = stalk("run", "workers.app:nohandler", "--backend", "memory", "--source", "q")
    assert_one_line_error(proc, 2, "no attribute 'nohandler'")


def test_cli_bad_option_values_exit_2() -> None:
    assert_one_line_error(
        stalk(
            "run",
            "workers.app:handler",
            "--backend",
            "memory",
            "--source",
            "q",
            "--concurrency",
            "0",
        ),
        2,
        "concurrency",
    )
    assert_one_line_error(
        stalk(
            "run",
            "workers.app:handler",
            "--backend",
            "memory",
            "--source",
            "q",
            "--option",
            "colour=blue",
        ),
        2,
        "no option 'colour'",
    )
    proc = stalk(
        "run", "workers.app:handler", "--backend", "memory", "--source", "q", "--option", "novalue"
    )
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_cli_backends_lists_memory() -> None:
    proc = stalk("backends")
    assert proc.returncode == 0
    assert any(line.startswith("memory") and "ok" in line for line in proc.stdout.splitlines())


def test_cli_run_until_empty_exits_0_on_memory() -> None:
    proc = stalk(
        "run",
        "workers.app:handler",
        "--backend",
        "memory",
        "--source",
        "q",
        "--until-empty",
        "--log-format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_third_party_adapter_by_entry_point(tmp_path: Path) -> None:
    """A distribution with a 'stalk.collectors' entry point works with --backend NAME."""
    (tmp_path / "stalk_fakeq.py").write_text(
        textwrap.dedent(
            """
        from stalk.collectors.memory import MemoryAdapter

        class FakeQAdapter(MemoryAdapter):
            name = "fakeq"

            async def open(self):
                await super().open()
                for body in (b'{"order": 1}', b"not json"):
                    await self.publish(body)
        """
        )
    )
    dist = tmp_path / "stalk_fakeq-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stalk-fakeq\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stalk.collectors]\nfakeq = stalk_fakeq:FakeQAdapter\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    listed = stalk("backends", env=env)
    assert "fakeq" in listed.stdout and "entry point" in listed.stdout
    proc = stalk(
        "run",
        "workers.app:handler",
        "--backend",
        "fakeq",
        "--source",
        "q",
        "--until-empty",
        "--allow-errors",
        "--polling-period",
        "0.01",
        "--max-polling-period",
        "0.05",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "order 1 handled" in proc.stderr
    assert "to error topic (fatal)" in proc.stderr


def test_cli_json_logs_are_json_per_line() -> None:
    import json

    proc = stalk(
        "run",
        "workers.app:handler",
        "--backend",
        "memory",
        "--source",
        "q",
        "--until-empty",
        "--log-format",
        "json",
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(isinstance(json.loads(ln), dict) for ln in lines)


@pytest.mark.parametrize("url", ["amqp://guest:s3cret@host/", "https://u:s3cret@example.com/x"])
def test_redact_hides_url_passwords(url: str) -> None:
    from stalk.ops.logs import redact

    assert "s3cret" not in redact(f"cannot reach {url} now")


def test_cli_send_stats_redrive_on_local(tmp_path: Path) -> None:
    env = {"STALK_LOCAL_PATH": str(tmp_path / "q.db")}
    assert (
        stalk("send", "--source", "jobs", "-", env=env, stdin='not json\n{"order": 7}\n').returncode
        == 0
    )
    run = stalk("run", "workers.app:handler", "--source", "jobs", "--until-empty", env=env)
    assert run.returncode == 3, run.stderr  # a message went to the error topic
    assert "1 to error topic jobs-errors (fatal: 1)" in run.stdout
    table = stalk("stats", "--source", "jobs-errors", env=env)
    assert table.stdout.splitlines()[0].split()[:3] == ["source", "ready", "delayed"]
    assert table.stdout.splitlines()[1].split()[:2] == ["jobs-errors", "1"]
    moved = stalk("redrive", "--from", "jobs-errors", "--to", "jobs", env=env)
    assert moved.returncode == 0 and "moved 1" in moved.stdout
    as_json = json.loads(stalk("stats", "--source", "jobs", "--json", env=env).stdout)
    assert (as_json["source"], as_json["ready"]) == ("jobs", 1)


def test_cli_stats_per_subscription_of_a_topic(tmp_path: Path) -> None:
    env = {"STALK_LOCAL_PATH": str(tmp_path / "t.db")}
    for sub in ("billing", "audit"):  # running a subscriber creates its subscription
        proc = stalk(
            "run",
            "workers.app:handler",
            "--source",
            sub,
            "--option",
            "topic=orders",
            "--until-empty",
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
    assert (
        stalk("send", "--source", "billing", "--option", "topic=orders", "{}", env=env).returncode
        == 0
    )
    out = json.loads(
        stalk("stats", "--source", "billing", "--option", "topic=orders", "--json", env=env).stdout
    )
    ready = {row["source"]: row["ready"] for row in out["subscriptions"]}
    assert ready == {"audit": 1, "billing": 1}
