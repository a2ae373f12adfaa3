"""The headline commands on SQS, as a user types them, with boto3's own AWS_ENDPOINT_URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.backends.test_sqs import raw_receive
from tests.brokers.sqs import FAKE_AWS_ENV, REGION, create_queue

pytestmark = pytest.mark.broker("sqs")


def stalk(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_send_then_run_until_empty_with_aws_endpoint_url(sqs_endpoint: str) -> None:
    queue = f"cli-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    error_url = create_queue(sqs_endpoint, f"{queue}-errors")
    common = ["--backend", "sqs", "--source", queue]
    sent = stalk(sqs_endpoint, "send", *common, '{"order": 1}', '{"order": 2, "flaky": true}',
                 "not json")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert len(sent.stdout.split()) == 3, "one message id per body"
    ran = stalk(sqs_endpoint, "run", "workers.app:handler", *common, "--until-empty",
                "--polling-period", "0.1", "--max-polling-period", "0.5")  # fmt: skip
    assert ran.returncode == 3, ran.stderr  # "not json" went to the error topic
    (dead,) = raw_receive(sqs_endpoint, error_url, VisibilityTimeout=0)
    assert dead["Body"] == "not json"
    stats = stalk(sqs_endpoint, "stats", *common, "--json")
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert counts["ready"] == 0 and counts["in_flight"] == 0
    moved = stalk(sqs_endpoint, "redrive", "--backend", "sqs", "--from", f"{queue}-errors",
                  "--to", queue)  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    (back,) = raw_receive(sqs_endpoint, create_queue(sqs_endpoint, queue))
    assert back["Body"] == "not json"
    assert back["MessageAttributes"]["stalk-reason"]["StringValue"] == "fatal"


def test_missing_queue_is_one_clear_line_and_exit_1(sqs_endpoint: str) -> None:
    ran = stalk(sqs_endpoint, "run", "workers.app:handler", "--backend", "sqs",
                "--source", "nowhere-queue", "--until-empty")  # fmt: skip
    assert ran.returncode == 1
    assert "'nowhere-queue' does not exist" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_peek_reads_an_error_queue_without_consuming_it(sqs_endpoint: str) -> None:
    queue = f"peek-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    create_queue(sqs_endpoint, f"{queue}-errors")
    common = ["--backend", "sqs", "--source", queue]
    assert stalk(sqs_endpoint, "send", *common, "not json").returncode == 0
    fast = ["--polling-period", "0.1", "--max-polling-period", "0.5"]
    ran = stalk(sqs_endpoint, "run", "workers.app:handler", *common, "--until-empty",
                "--allow-errors", *fast)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    for _ in range(2):  # visibility goes back to 0: the second peek sees it again
        peeked = stalk(sqs_endpoint, "peek", "--backend", "sqs", "--source", f"{queue}-errors",
                       "--json")  # fmt: skip
        assert peeked.returncode == 0, peeked.stderr
        (message,) = [json.loads(line) for line in peeked.stdout.splitlines()]
        assert message["body"] == "not json"
        assert message["attributes"]["stalk-reason"] == "fatal"


def test_aws_region_works_as_the_error_message_says(sqs_endpoint: str) -> None:
    """botocore reads only AWS_DEFAULT_REGION; stalk passes AWS_REGION through."""
    queue = f"region-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION")}
    env.update({k: v for k, v in FAKE_AWS_ENV.items() if k != "AWS_DEFAULT_REGION"})
    env["AWS_ENDPOINT_URL"] = sqs_endpoint

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stalk", *args], env={**env, **extra}, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip

    missing = run("stats", "--backend", "sqs", "--source", queue)
    assert missing.returncode == 2 and "AWS_REGION" in missing.stderr, missing.stderr
    given = run("stats", "--backend", "sqs", "--source", queue, "--json", AWS_REGION=REGION)
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["ready"] == 0
