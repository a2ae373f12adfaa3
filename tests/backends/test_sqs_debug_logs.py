"""Hole 4 of issue 14: with SQS credentials from a profile file (so not in the environment,
where the log redaction looks for secret values), ``--log-level DEBUG`` printed botocore's
request dumps and with them the session token, in text and in JSON."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.brokers.sqs import FAKE_AWS_ENV, create_queue
from tests.ops._proc import PORT_LINE, http

pytestmark = pytest.mark.broker("sqs")

SECRET_KEY = "profileSecretKey0123456789abcdefEXAMPLE"
SESSION_TOKEN = "FQoGZXIvYXdzEXAMPLEsessionTOKEN0123456789abcdefghij"


def profile_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a stalk process whose SQS credentials come from a profile file only."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\n"
        "aws_access_key_id = AKIAPROFILEEXAMPLE01\n"
        f"aws_secret_access_key = {SECRET_KEY}\n"
        f"aws_session_token = {SESSION_TOKEN}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STALK_"))}
    env.update(
        {
            "AWS_DEFAULT_REGION": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    return env


def stalk_with_profile(
    endpoint: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args], env=profile_env(endpoint, tmp_path),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_debug_logs_show_no_profile_credentials(
    sqs_endpoint: str, tmp_path: Path, fmt: str
) -> None:
    queue = f"debug-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    create_queue(sqs_endpoint, f"{queue}-errors")
    common = ["--backend", "sqs", "--source", queue, "--log-format", fmt]
    sent = stalk_with_profile(sqs_endpoint, tmp_path, "send", *common, "--log-level", "debug", "x")
    assert sent.returncode == 0, sent.stderr
    ran = stalk_with_profile(sqs_endpoint, tmp_path, "run", "workers.app:handler", *common,
                             "--log-level", "debug", "--until-empty", "--polling-period", "0.1",
                             "--max-polling-period", "0.5")  # fmt: skip
    assert ran.returncode == 3, ran.stderr  # "x" is not JSON: the error topic
    for proc in (sent, ran):
        output = proc.stdout + proc.stderr
        assert SESSION_TOKEN not in output and SECRET_KEY not in output
        assert "botocore" not in proc.stderr, "SDK debug output without asking for it"
    assert "stalk.collector" in ran.stderr  # stalk's own lines are there


def test_sdk_debug_output_when_asked_by_name_is_redacted(sqs_endpoint: str, tmp_path: Path) -> None:
    """``--log-level debug,botocore`` turns botocore's debug output on, still without secrets."""
    queue = f"debug-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    sent = stalk_with_profile(sqs_endpoint, tmp_path, "send", "--backend", "sqs", "--source",
                              queue, "--log-level", "debug,botocore", "x")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert "botocore" in sent.stderr and "X-Amz-Security-Token" in sent.stderr
    assert SESSION_TOKEN not in sent.stderr and SECRET_KEY not in sent.stderr


def test_status_metrics_and_healthz_show_no_profile_credentials(
    sqs_endpoint: str, tmp_path: Path
) -> None:
    """Issue 14's security list: no secret in ``/status``, ``/metrics`` or ``/healthz`` of a
    running worker whose credentials come from a profile file, at DEBUG."""
    queue = f"status-{uuid.uuid4().hex[:10]}"
    create_queue(sqs_endpoint, queue)
    create_queue(sqs_endpoint, f"{queue}-errors")
    env = profile_env(sqs_endpoint, tmp_path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "stalk", "run", "workers.app:handler", "--backend", "sqs",
         "--source", queue, "--log-level", "debug", "--http-port", "0"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert worker.stderr is not None
        lines: list[str] = []
        port = None
        for line in worker.stderr:
            lines.append(line)
            match = PORT_LINE.search(line)
            if match:
                port = int(match.group(1))
                break
        assert port is not None, "".join(lines)
        answers = b"".join(http(port, path)[1] for path in ("/status", "/metrics", "/healthz"))
        assert b"stalk_" in answers  # the pages answered
        assert SECRET_KEY.encode() not in answers and SESSION_TOKEN.encode() not in answers
        assert b"AKIAPROFILEEXAMPLE01" not in answers
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
