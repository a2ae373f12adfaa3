"""Settings from flags, env, a config file and defaults, in that order, as ``--print-config``
shows and as ``stalk run`` then uses; driven through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import assert_one_line_error
from tests.unit.test_cli_day_one import stalk


def config_line(output: str, key: str) -> str:
    """Return the ``--print-config`` line of ``key``, its alignment spaces squeezed."""
    (line,) = [ln for ln in output.splitlines() if ln.startswith(f"{key} = ")]
    return " ".join(line.split())


def test_env_sets_run_flags_and_is_used(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    env = {"STALK_CONCURRENCY": "4", "STALK_SOURCE": "jobs", "STALK_MAX_RETRIES": "2"}
    shown = stalk("run", "workers.app:handler", "--print-config", db=db, env=env)
    assert shown.returncode == 0, shown.stderr
    assert config_line(shown.stdout, "concurrency") == "concurrency = 4 # env STALK_CONCURRENCY"
    assert "# env STALK_MAX_RETRIES" in config_line(shown.stdout, "max_retries")
    assert config_line(shown.stdout, "retry_interval_s").endswith("# default")
    ran = stalk("run", "workers.app:handler", "--until-empty", db=db, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "concurrency 4" in ran.stderr


def test_precedence_is_cli_then_env_then_file_then_default(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'x'\n\n[tool.stalk]\nsource = 'from-file'\nconcurrency = 2\n"
        "max-retries = 7\nretry-interval = 0.5\n\n[tool.stalk.options]\n"
        f"path = '{db}'\n"
    )
    env = {"STALK_CONCURRENCY": "3"}
    out = stalk("run", "workers.app:handler", "--print-config", "--max-retries", "1",
                cwd=tmp_path, env=env).stdout  # fmt: skip
    assert "# file" in config_line(out, "source") and "from-file" in config_line(out, "source")
    assert config_line(out, "concurrency") == "concurrency = 3 # env STALK_CONCURRENCY"
    assert config_line(out, "max_retries") == "max_retries = 1 # command line"
    assert config_line(out, "retry_interval_s").startswith("retry_interval_s = 0.5")
    assert str(db) in config_line(out, "option.path")
    stalk("send", "{}", cwd=tmp_path)  # the file's source and path serve send too
    ran = stalk("run", "workers.app:handler", "--until-empty", cwd=tmp_path)
    assert ran.returncode == 0 and "1 received" in ran.stdout, ran.stderr


def test_stalk_toml_and_config_flag(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    (tmp_path / "stalk.toml").write_text("source = 'toml-q'\n")
    other = tmp_path / "other.toml"
    other.write_text(f"source = 'other-q'\nconcurrency = 5\n[options]\npath = '{db}'\n")
    out = stalk("run", "workers.app:handler", "--print-config", cwd=tmp_path).stdout
    assert "toml-q" in config_line(out, "source")
    out = stalk("run", "workers.app:handler", "--print-config", "--config", str(other),
                cwd=tmp_path).stdout  # fmt: skip
    assert "other-q" in config_line(out, "source")
    assert config_line(out, "concurrency").startswith("concurrency = 5")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[tool.stalk]\nconcurency = 2\n", ["unknown setting 'concurency'", "concurrency"]),
        ("[tool.stalk\n", ["cannot read config file"]),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text: str, words: list[str]) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    proc = stalk("run", "workers.app:handler", "--source", "q", cwd=tmp_path)
    if text == "[tool.stalk\n":  # not TOML at all: not ours to read, not [tool.stalk] either
        proc = stalk("run", "workers.app:handler", "--config", str(tmp_path / "pyproject.toml"))
    assert_one_line_error(proc, 2, *words)


def test_bad_env_value_names_the_variable() -> None:
    proc = stalk("run", "workers.app:handler", "--source", "q", env={"STALK_CONCURRENCY": "many"})
    assert_one_line_error(proc, 2, "STALK_CONCURRENCY", "many")


def test_print_config_masks_secrets(tmp_path: Path) -> None:
    pytest.importorskip("aio_pika")
    env = {"STALK_AMQP_URL": "amqp://app:hunter2-pw@127.0.0.1/"}
    out = stalk("run", "workers.app:handler", "--backend", "amqp", "--source", "q",
                "--print-config", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "hunter2-pw" not in out.stdout + out.stderr
    assert "amqp://app:***@127.0.0.1/" in config_line(out.stdout, "option.url")


def test_print_config_works_before_the_settings_are_complete(tmp_path: Path) -> None:
    shown = stalk("run", "workers.app:handler", "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert config_line(shown.stdout, "source") == "source = null # default"
    assert config_line(shown.stdout, "unflagged_error").startswith(
        'unflagged_error = "error_topic"'
    )
