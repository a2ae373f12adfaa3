"""What a new user hits in the first hour (issue 15) and the clear-error holes of issue 14 (5, 6,
12): every check drives the real CLI in a subprocess (``python -m stalk``), on the local backend
unless a broker is the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cli import ROOT, assert_one_line_error

HANDLERS = "tests.unit.cli_handlers"


def stalk(
    *args: str | bytes,
    db: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STALK_")}
    full_env["PYTHONPATH"] = str(ROOT)
    if db is not None:
        full_env["STALK_LOCAL_PATH"] = str(db)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "stalk", *args],
        capture_output=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
        input=stdin,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def peek_json(db: Path, source: str) -> list[dict[str, object]]:
    proc = stalk("peek", "--source", source, "--json", "--limit", "50", db=db)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


FAST = ("--polling-period", "0.01", "--max-polling-period", "0.05", "--retry-interval", "0.01")


# ---------------------------------------------------------------------- --source, usage errors
def test_run_without_source_names_the_flag_and_env_works(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    assert_one_line_error(stalk("run", "workers.app:handler", db=db), 2, "--source", "STALK_SOURCE")
    assert_one_line_error(stalk("send", "x", db=db), 2, "--source")
    assert stalk("send", "{}", db=db, env={"STALK_SOURCE": "orders"}).returncode == 0
    ran = stalk(
        "run", "workers.app:handler", "--until-empty", db=db, env={"STALK_SOURCE": "orders"}
    )
    assert ran.returncode == 0, ran.stderr
    assert "1 received" in ran.stdout and "local:orders" in ran.stdout


def test_source_given_twice_is_an_error() -> None:
    proc = stalk("run", "workers.app:handler", "--source", "a", "--source", "b")
    assert_one_line_error(proc, 2, "--source given twice", "--help")


def test_backend_names_are_case_insensitive_and_typos_suggest(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    assert stalk("send", "--backend", "LOCAL", "--source", "q", "{}", db=db).returncode == 0
    proc = stalk("run", "workers.app:handler", "--backend", "Local", "--source", "q",
                 "--until-empty", db=db)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_one_line_error(
        stalk("run", "workers.app:handler", "--backend", "sqz", "--source", "q"),
        2,
        "did you mean 'sqs'?",
    )


def test_misspelt_flag_suggests_the_real_one_in_one_line() -> None:
    proc = stalk("run", "workers.app:handler", "--source", "q", "--concurency", "4")
    assert_one_line_error(
        proc, 2, "--concurency", "did you mean --concurrency?", "stalk run --help"
    )
    assert "usage:" not in proc.stderr
    assert_one_line_error(stalk("sned", "x"), 2, "did you mean send?")
    assert_one_line_error(stalk("send", "--source", "q", "--dely", "5", "x"), 2, "--delay?")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("run", "workers.app:handler", "--source", "q", "--log-level", "verbose"), ["log level"]),
        (("send", "--source", "q", "--delay", "-5", "x"), ["--delay", ">= 0"]),
        (("send", "--source", "q", "--delay", "nan", "x"), ["--delay"]),
        (("run", "workers.app:handler", "--source", "q", "--concurrency", "x"), ["invalid int"]),
    ],
)
def test_bad_values_are_one_line_exit_2(args: tuple[str, ...], words: list[str]) -> None:
    assert_one_line_error(stalk(*args), 2, *words)


def test_fatal_exception_accepts_module_colon_class(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", "not json", db=db)
    proc = stalk("run", f"{HANDLERS}:parse", "--source", "q", "--until-empty", "--allow-errors",
                 "--fatal-exception", "json:JSONDecodeError", *FAST, db=db)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "0 retried, 1 to error topic q-errors (fatal: 1)" in proc.stdout


# ---------------------------------------------------------------------- --until-empty exit code
def test_until_empty_exits_3_when_messages_went_to_the_error_topic(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", "{}", "oops", db=db)
    proc = stalk("run", f"{HANDLERS}:refuse", "--source", "q", "--until-empty", *FAST, db=db)
    assert proc.returncode == 3, proc.stderr
    assert "2 message(s) went to the error topic q-errors" in proc.stderr
    stalk("send", "--source", "q", "again", db=db)
    allowed = stalk("run", f"{HANDLERS}:refuse", "--source", "q", "--until-empty",
                    "--allow-errors", *FAST, db=db)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    clean = stalk("run", "workers.app:handler", "--source", "q", "--until-empty", db=db)
    assert clean.returncode == 0, clean.stderr


def test_until_empty_exit_3_with_processes_and_a_summary(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", "a", "b", "c", db=db)
    proc = stalk("run", f"{HANDLERS}:refuse", "--source", "q", "--until-empty", "--processes",
                 "2", *FAST, db=db)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "3 to error topic q-errors (fatal: 3)" in proc.stdout


# ---------------------------------------------------------------------- failures are debuggable
def test_a_raising_handler_logs_type_message_and_traceback(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", '{"order": 1}', db=db)
    proc = stalk("run", f"{HANDLERS}:lookup", "--source", "q", "--until-empty", "--max-retries",
                 "1", *FAST, db=db)  # fmt: skip
    assert proc.returncode == 3
    assert "KeyError: 'customer'" in proc.stderr
    assert proc.stderr.count("Traceback (most recent call last)") == 2  # the retry, the route
    assert 'return order["customer"]' in proc.stderr  # the line that failed
    copy = peek_json(db, "q-errors")[0]
    attributes = copy["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["stalk-error-type"] == "KeyError"
    assert "cli_handlers.py" in attributes["stalk-traceback"]
    assert "KeyError: 'customer'" in attributes["stalk-traceback"]


def test_json_logs_put_the_failure_in_fields(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", '{"order": 1}', db=db)
    proc = stalk("run", f"{HANDLERS}:lookup", "--source", "q", "--until-empty", "--max-retries",
                 "0", "--log-format", "json", *FAST, db=db)  # fmt: skip
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    routed = [r for r in records if r.get("outcome") == "error:retries_exhausted"]
    assert len(routed) == 1, proc.stderr
    assert routed[0]["error_type"] == "KeyError"
    assert routed[0]["error"] == "'customer'"
    assert "Traceback" in routed[0]["traceback"] and "_customer" in routed[0]["traceback"]


def test_fatal_text_records_a_useful_error_type(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    stalk("send", "--source", "q", "x", db=db)
    stalk("run", f"{HANDLERS}:refuse", "--source", "q", "--until-empty", *FAST, db=db)
    attributes = peek_json(db, "q-errors")[0]["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["stalk-error-type"] == "Fatal"
    assert attributes["stalk-error"] == "no such product"
    assert "stalk-traceback" not in attributes  # nothing was raised


def test_import_failures_name_file_line_and_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import os\n\nVALUE = 1 / 0\n\ndef handler(body): pass\n")
    (tmp_path / "needsdep.py").write_text("import requestz\n\ndef handler(body): pass\n")
    (tmp_path / "typo.py").write_text("def handler(body)\n    pass\n")
    db = tmp_path / "q.db"
    proc = stalk("run", "broken:handler", "--source", "q", db=db, cwd=tmp_path)
    assert_one_line_error(proc, 2, "broken.py:3", "ZeroDivisionError")
    assert "--traceback" in proc.stderr
    whole = stalk("run", "broken:handler", "--source", "q", "--traceback", db=db, cwd=tmp_path)
    assert whole.returncode == 2 and "Traceback (most recent call last)" in whole.stderr
    debug = stalk("run", "broken:handler", "--source", "q", "--log-level", "debug", db=db,
                  cwd=tmp_path)  # fmt: skip
    assert debug.returncode == 2 and 'broken.py", line 3' in debug.stderr
    dep = stalk("run", "needsdep:handler", "--source", "q", db=db, cwd=tmp_path)
    assert_one_line_error(dep, 2, "'requestz'", "not installed", "needsdep.py:1", "dependency")
    assert "run from the directory" not in dep.stderr
    syntax = stalk("run", "typo:handler", "--source", "q", db=db, cwd=tmp_path)
    assert_one_line_error(syntax, 2, "syntax error", "typo.py:1")


# ---------------------------------------------------------------------- URLs and secrets
@pytest.mark.parametrize(
    ("backend", "option", "words"),
    [
        ("amqp", "url=amqpx://guest:guest@127.0.0.1/", ["unknown scheme", "amqpx://"]),
        ("amqp", "url=127.0.0.1:5672", ["no scheme"]),
        ("sqs", "endpoint_url=127.0.0.1:5000", ["endpoint_url", "scheme"]),
    ],
)
def test_a_broker_url_with_a_wrong_scheme_is_exit_2_one_line(
    backend: str, option: str, words: list[str]
) -> None:
    pytest.importorskip("aio_pika" if backend == "amqp" else "boto3")
    for command in (("run", "workers.app:handler", "--until-empty"), ("send", "x")):
        proc = stalk(*command, "--backend", backend, "--source", "q", "--option", option)
        assert_one_line_error(proc, 2, *words)
        assert "guest:guest" not in proc.stderr


def test_option_values_come_from_files(tmp_path: Path) -> None:
    pytest.importorskip("aio_pika")
    secret = tmp_path / "amqp-url"
    secret.write_text("amqpx://app:s3cret-pw@127.0.0.1/\n")
    proc = stalk("send", "--backend", "amqp", "--source", "q", "--option", f"url=@{secret}", "x")
    assert_one_line_error(proc, 2, "unknown scheme")  # read from the file
    assert "s3cret-pw" not in proc.stderr
    missing = stalk("send", "--backend", "amqp", "--source", "q", "--option", "url=@/nonexistent/x",
                    "x")  # fmt: skip
    assert_one_line_error(missing, 2, "url=@/nonexistent/x", "cannot read")
    path_file = tmp_path / "path"
    path_file.write_text(str(tmp_path / "from-file.db"))
    assert stalk("send", "--source", "q", "--option", f"path=@{path_file}", "x").returncode == 0
    assert (tmp_path / "from-file.db").exists()
    helps = stalk("run", "--help").stdout
    assert "@PATH" in helps and "ps" in stalk("--help").stdout


# ---------------------------------------------------------------------- clear errors (issue 14.12)
def test_send_passes_invalid_utf8_bodies_byte_exact(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    body = b"\xff\xfeok\x80"  # argv cannot carry NUL; any other byte goes
    proc = stalk("send", "--source", "q", os.fsdecode(body), db=db)
    assert proc.returncode == 0, proc.stderr
    (copy,) = peek_json(db, "q")
    import base64

    assert base64.b64decode(str(copy["body_base64"])) == body


def test_invalid_utf8_in_names_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    bad = os.fsdecode(b"orders\xff")
    assert_one_line_error(stalk("send", "--source", bad, "x", db=db), 2, "--source", "UTF-8")
    proc = stalk("send", "--source", "q", "--attribute", f"k={bad}", "x", db=db)
    assert_one_line_error(proc, 2, "--attribute", "UTF-8")


@pytest.mark.parametrize(
    ("name", "words"),
    [("caf\u00e9", ["characters", "'\u00e9'"]), ("a\tb", ["'\\t'"]), ("q" * 300, ["at most"])],
)
def test_amqp_queue_names_the_client_refuses_are_one_line(name: str, words: list[str]) -> None:
    pytest.importorskip("aio_pika")
    for command in (("send", "x"), ("run", "workers.app:handler")):
        proc = stalk(*command, "--backend", "amqp", "--source", name)
        assert_one_line_error(proc, 2, *words)


def test_send_stdin_sends_blank_looking_lines_and_says_what_it_skipped(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    proc = stalk("send", "--source", "q", "-", db=db, stdin=b"one\n\n   \ntwo\r\n\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 3  # "one", "   ", "two"
    assert "skipped 2 empty line(s)" in proc.stderr
    bodies = sorted(str(m["body"]) for m in peek_json(db, "q"))
    assert bodies == ["   ", "one", "two"]


def test_the_traceback_on_an_error_copy_is_bounded() -> None:
    from stalk.message import MAX_TRACEBACK_TEXT, TRACEBACK_FRAMES, Failure, Message

    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("x" * 10_000)
        deep(n - 1)

    try:
        deep(50)
    except RuntimeError as exc:
        error = exc
    failure = Failure.build(Message("1", b""), "retries_exhausted", error)
    text = failure.to_attributes()["stalk-traceback"]
    assert len(text) <= MAX_TRACEBACK_TEXT
    assert text.count("in deep") <= TRACEBACK_FRAMES
    short = Failure.build(Message("1", b""), "fatal", _raised(KeyError("customer")))
    assert short.traceback.count("\n  File ") <= TRACEBACK_FRAMES
    assert short.traceback.endswith("KeyError: 'customer'")


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught
