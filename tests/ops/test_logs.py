"""Log output of a real ``stalk run``: JSON per message outcome, and no credentials anywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stalk.ops.logs import JsonFormatter, redact, refresh_secrets
from tests.ops._proc import Stalk, local_send

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
URL_WORD = "pa55w0rd-in-a-url"


def test_json_logs_carry_outcome_fields_and_leak_no_secret(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "ok", "boom")
    stalk = Stalk(
        "run", "tests.ops.handlers:leaky", "--backend", "local", "--source", "jobs",
        "--option", f"path={db}", "--max-retries", "0", "--until-empty", "--allow-errors",
        "--log-format", "json", "--log-level", "DEBUG",
        env={"AWS_SECRET_ACCESS_KEY": AWS_SECRET, "STALK_TEST_WORD": URL_WORD},
    )  # fmt: skip
    assert stalk.wait() == 0, stalk.stderr
    everything = stalk.stderr + stalk.stdout
    assert AWS_SECRET not in everything
    assert URL_WORD not in everything
    records = [json.loads(line) for line in stalk.lines]  # every line is one JSON object
    outcomes = {r["outcome"]: r for r in records if "outcome" in r}
    assert set(outcomes) == {"ack", "error:retries_exhausted"}, records
    for record in outcomes.values():
        assert record["backend"] == "local"
        assert record["source"] == "jobs"
        assert record["attempt"] == 1
        assert record["message_id"]
        assert record["duration_s"] >= 0
    failed = outcomes["error:retries_exhausted"]
    assert "amqp://worker:***@broker" in failed["msg"]
    assert "aws_secret_access_key=***" in failed["msg"]


def test_no_per_message_line_at_info(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    local_send(db, "jobs", "ok", "ok")
    stalk = Stalk(
        "run", "tests.ops.handlers:quick", "--backend", "local", "--source", "jobs",
        "--option", f"path={db}", "--until-empty", "--log-format", "json",
    )  # fmt: skip
    assert stalk.wait() == 0, stalk.stderr
    assert not [line for line in stalk.lines if '"outcome"' in line]


def test_redact_forms(monkeypatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    refresh_secrets()
    text = (
        "url=https://u:p%40ss@host/x password=hunter2 "
        '"SecretAccessKey": "abc/def" Authorization token: xyz tok-1234567890 plain=kept'
    )
    out = redact(text)
    for secret in ("p%40ss", "hunter2", "abc/def", "xyz", "tok-1234567890"):
        assert secret not in out
    assert "plain=kept" in out and "https://u:***@host/x" in out
    monkeypatch.delenv("MY_API_TOKEN")
    refresh_secrets()


def test_redact_sdk_header_dumps_and_secrets_known_at_run_time() -> None:
    """Hole 4: botocore prints headers as bytes reprs, which the key=value rule missed; and a
    profile file's credentials are not in the environment, so the SQS adapter adds them."""
    from stalk.redaction import add_secrets

    dump = (
        "headers={'X-Amz-Security-Token': b'FQoGZXIvYXdzEXAMPLE', 'Authorization': "
        "b'AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261202/us-east-1/sqs/aws4_request, "
        "SignedHeaders=host, Signature=e5f945beb2969d7d'}\nx-amz-security-token:FQoGZXIvYXdz2"
    )
    out = redact(dump)
    for secret in ("FQoGZXIvYXdzEXAMPLE", "AKIDEXAMPLE", "e5f945beb2969d7d", "FQoGZXIvYXdz2"):
        assert secret not in out, out
    assert "SignedHeaders=host" in out
    add_secrets("from-a-profile-file-0123", None, "short")
    assert redact("echo from-a-profile-file-0123 short") == "echo *** short"


def test_json_formatter_redacts_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"msg": "to %s", "args": ("amqp://a:b@c/",), "levelno": 20, "levelname": "INFO"}
    )
    record.source = "https://user:secretpw@queue.example/q"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "to amqp://a:***@c/"
    assert line["source"] == "https://user:***@queue.example/q"


def test_sdk_loggers_stay_above_debug_unless_named() -> None:
    """Hole 4: ``--log-level debug`` is stalk's debug; an SDK's only when named after it."""
    from stalk.cli.parser import normalize_log_level
    from stalk.ops.logs import SDK_LOGGERS, configure

    assert normalize_log_level("debug, botocore") == "DEBUG,botocore"
    assert normalize_log_level("warn") == "WARNING"
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in SDK_LOGGERS}
    try:
        configure("text", "DEBUG")
        assert root.level == logging.DEBUG
        assert all(logging.getLogger(n).level == logging.WARNING for n in SDK_LOGGERS)
        configure("text", "DEBUG,botocore")
        assert logging.getLogger("botocore").level == logging.DEBUG
        assert logging.getLogger("aiormq").level == logging.WARNING
        configure("text", "ERROR")
        assert logging.getLogger("botocore").level == logging.ERROR
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
