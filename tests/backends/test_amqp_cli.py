"""The day-one commands on RabbitMQ through the real CLI: peek, redrive, stats that creates
nothing, and ``--until-empty`` that ends at once on an empty queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.unit.test_cli import ROOT

pytestmark = pytest.mark.broker("amqp")

HANDLERS = "tests.unit.cli_handlers"


def stalk(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STALK_")}
    env.update({"PYTHONPATH": str(ROOT), "STALK_AMQP_URL": url, "STALK_BACKEND": "amqp"})
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def _queue_exists(url: str, name: str) -> bool:
    return stalk(url, "stats", "--source", name).returncode == 0


def test_amqp_peek_and_redrive_leave_or_move_messages(amqp_url: str) -> None:
    queue = f"day1-{uuid.uuid4().hex[:8]}"
    assert stalk(amqp_url, "send", "--source", queue, "a", "b", "c").returncode == 0
    ran = stalk(amqp_url, "run", f"{HANDLERS}:refuse", "--source", queue, "--until-empty")
    assert ran.returncode == 3, ran.stderr
    peeked = stalk(amqp_url, "peek", "--source", f"{queue}-errors", "--json")
    assert peeked.returncode == 0, peeked.stderr
    messages = [json.loads(line) for line in peeked.stdout.splitlines()]
    assert sorted(m["body"] for m in messages) == ["a", "b", "c"]
    assert {m["attributes"]["stalk-reason"] for m in messages} == {"fatal"}
    again = stalk(amqp_url, "peek", "--source", f"{queue}-errors", "--json")
    assert len(again.stdout.splitlines()) == 3  # peek consumed nothing
    dry = stalk(amqp_url, "redrive", "--from", f"{queue}-errors", "--to", queue, "--dry-run")
    assert "would move 3" in dry.stdout, dry.stderr
    moved = stalk(amqp_url, "redrive", "--from", f"{queue}-errors", "--to", queue, "--reason",
                  "fatal", "--limit", "2")  # fmt: skip
    assert "moved 2 message(s)" in moved.stdout, moved.stderr
    counts = json.loads(stalk(amqp_url, "stats", "--source", queue, "--json").stdout)
    assert counts["ready"] == 2 and counts["errors"] == 1


def test_amqp_stats_creates_no_queue(amqp_url: str) -> None:
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    proc = stalk(amqp_url, "stats", "--source", typo)
    assert proc.returncode == 1 and "no queue" in proc.stderr
    assert not _queue_exists(amqp_url, typo)
    queue = f"day1-{uuid.uuid4().hex[:8]}"
    stalk(amqp_url, "send", "--source", queue, "x")
    assert stalk(amqp_url, "stats", "--source", f"{queue}-errors").returncode == 0
    assert not _queue_exists(amqp_url, f"{queue}-errors-errors")


def test_amqp_until_empty_on_an_empty_queue_ends_without_the_quiet_period(amqp_url: str) -> None:
    """Not timed (no timing assertions here): the run must end through the drained check, which
    it reports, rather than after max_polling_period_s of quiet (set to an hour here)."""
    queue = f"day1-{uuid.uuid4().hex[:8]}"
    ran = stalk(amqp_url, "run", "workers.app:handler", "--source", queue, "--until-empty",
                "--max-polling-period", "3600")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "0 received" in ran.stdout


def test_publisher_on_amqp_feeds_stalk_run(amqp_url: str) -> None:
    import asyncio

    from stalk import AsyncPublisher, Publisher

    queue = f"day1-{uuid.uuid4().hex[:8]}"
    with Publisher("amqp", source=queue, url=amqp_url) as orders:
        orders.publish(b'{"order": 1}', attributes={"tenant": "a"})
        orders.publish_batch(['{"order": 2}', '{"order": 3}'])

    async def more() -> str:
        async with AsyncPublisher("AMQP", source=queue, url=amqp_url) as events:
            return await events.publish('{"order": 4}')

    assert asyncio.run(more())
    peeked = stalk(amqp_url, "peek", "--source", queue, "--json")
    bodies = sorted(json.loads(line)["body"] for line in peeked.stdout.splitlines())
    assert bodies == [f'{{"order": {i}}}' for i in range(1, 5)]
    ran = stalk(amqp_url, "run", "workers.app:handler", "--source", queue, "--until-empty")
    assert ran.returncode == 0 and "4 acked" in ran.stdout, ran.stderr


def test_amqp_until_empty_waits_for_the_delay_queues_an_earlier_process_left(
    amqp_url: str,
) -> None:
    """Hole 8 of issue 14: messages waiting in ``<source>.stalk-delay.<ms>`` (here from ``send
    --delay``, as a stopped worker's pending retries would be) are part of the source: a fresh
    ``--until-empty`` run waits for them to come back and handles them, instead of exiting 0
    with the delay queue still full."""
    queue = f"day1-{uuid.uuid4().hex[:8]}"
    bodies = [f'{{"order": {i}}}' for i in range(5)]
    sent = stalk(amqp_url, "send", "--source", queue, "--delay", "2", *bodies)
    assert sent.returncode == 0, sent.stderr
    ran = stalk(amqp_url, "run", "workers.app:handler", "--source", queue, "--until-empty")
    assert ran.returncode == 0, ran.stderr
    assert "5 acked" in ran.stdout, ran.stdout
    counts = json.loads(stalk(amqp_url, "stats", "--source", queue, "--json").stdout)
    assert (counts["ready"], counts["delayed"]) == (0, 0)
